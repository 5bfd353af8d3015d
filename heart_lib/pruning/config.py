"""What to prune: a frozen, validated description of a token schedule, a selector and a head set.

Conventions (chosen here because the paper is silent; see book/method.md, 'From scores to a pruned model'):

- `layers` are 0-based block indices. For the *drop* selectors (heart, gate, cls_attention, norm,
  random) tokens are removed at the **input** of each listed block, so that block and every later
  one run on fewer tokens. The EViT and ToMe peers reduce tokens where their papers do: between the
  attention and the MLP of the listed block.
- `keep` is the fraction of the current non-prefix tokens kept at each listed layer (EViT's
  convention: ratios compound, 0.7 at three layers keeps 0.7**3 = 34 % of the patches after the
  third). The kept count is ceil(keep * n) so batches stay rectangular. Class, distillation and
  register tokens (timm's `num_prefix_tokens`) are never removed.
- `heads` maps a layer to the head indices removed there (physically, by slicing weights).
- `per_input_budget` (batch size 1 semantics): instead of a fixed count, each input keeps the fewest
  tokens whose dropped tokens' predicted loss increase stays under the budget (needs loss-unit
  scores: the HEART oracle).

Compact text form (the measurement harness's `--pruning`), `;`-separated `key=value` items:

    tokens=0.7@3,6,9                  same ratio at layers 3, 6, 9
    tokens=0.9,0.8,0.7@3,6,9          one ratio per layer
    selector=cls_attention            any token reducer of `heart_lib.catalogue` (heart, heart_hutchinson,
                                      heart_exact, gate, cls_attention, norm, random, evit, tome)
    heads=0:1,5:0  or  heads=0:1+2    layer:head pairs ('+' joins several heads of one layer)
    seed=0; probes=8; gate=path/to/gate.pt; budget=0.01; fuse=true
    variant=abs                       oracle scores: raw S (default), abs |S|, clamp max(S, 0)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from heart_lib import catalogue
from heart_lib.catalogue import VARIANTS

@dataclass(frozen=True)
class PruningConfig:
    """Token schedule, token selector and removed heads of one pruned model (see module docstring)."""

    layers: tuple[int, ...] = ()
    keep: tuple[float, ...] = ()
    selector: str = "cls_attention"
    heads: tuple[tuple[int, tuple[int, ...]], ...] = ()
    seed: int = 0
    probes: int = 8  # HVP probes of the HEART oracle (Hutchinson)
    gate: str | None = None  # path of a trained token gate (selector="gate")
    per_input_budget: float | None = None  # predicted-loss budget per input (batch size 1)
    fuse: bool = False  # drop selectors: fuse the dropped tokens into one (EViT's trick)
    variant: str = "raw"  # oracle scores: raw S, abs |S| or clamp max(S, 0) (S can be negative)

    def __post_init__(self) -> None:
        # Normalise container types so equal configs compare and hash equal.
        object.__setattr__(self, "layers", tuple(int(v) for v in self.layers))
        keep = tuple(float(v) for v in self.keep)
        if len(keep) == 1 and len(self.layers) > 1:
            keep = keep * len(self.layers)
        object.__setattr__(self, "keep", keep)
        heads = self.heads.items() if isinstance(self.heads, Mapping) else self.heads
        merged: dict[int, list[int]] = {}
        for layer, idx in heads:
            idx = (idx,) if isinstance(idx, int) else tuple(idx)
            merged.setdefault(int(layer), []).extend(int(i) for i in idx)
        for layer, idx in merged.items():
            if len(set(idx)) != len(idx):
                raise ValueError(f"heads: layer {layer} lists a head twice ({idx}); each head can be removed once")
        object.__setattr__(self, "heads", tuple(sorted((k, tuple(sorted(v))) for k, v in merged.items() if v)))
        self.check()

    # ------------------------------------------------------------------ validation

    def check(self, depth: int | None = None, num_heads: int | Mapping[int, int] | None = None) -> None:
        """Raise ValueError for an invalid config; with `depth`/`num_heads`, also check it fits a model."""
        entry = catalogue.reducer(self.selector)
        if len(self.keep) != len(self.layers):
            raise ValueError(f"tokens: {len(self.keep)} keep ratios for {len(self.layers)} layers {self.layers}; "
                             "give one ratio, or one per layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"tokens: duplicate pruning layers in {self.layers}; each layer may appear once")
        if list(self.layers) != sorted(self.layers):
            raise ValueError(f"tokens: pruning layers {self.layers} must be increasing")
        for layer in self.layers:
            if layer < 0:
                raise ValueError(f"tokens: layer {layer} is negative; layers are 0-based block indices")
        for ratio in self.keep:
            if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
                raise ValueError(f"tokens: keep ratio {ratio} is outside (0, 1]")
        for layer, idx in self.heads:
            if layer < 0:
                raise ValueError(f"heads: layer {layer} is negative; layers are 0-based block indices")
            if any(i < 0 for i in idx):
                raise ValueError(f"heads: layer {layer} has a negative head index in {idx}")
        if self.layers and self.layers[0] < entry.min_layer:
            raise ValueError(f"selector = {self.selector!r} cannot prune at layer {self.layers[0]} "
                             f"(needs layers >= {entry.min_layer}): {entry.min_layer_reason}")
        if "gate" in entry.needs and self.layers and not self.gate:
            raise ValueError(f"selector = {self.selector!r} needs gate=<path of a trained token gate>")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant = {self.variant!r}: allowed values are {list(VARIANTS)}")
        loss_unit = [n for n, e in catalogue.REDUCERS.items() if e.loss_units]
        if self.variant != "raw" and not entry.loss_units:
            raise ValueError(f"variant applies to the HEART oracle selectors {loss_unit}, not to {self.selector!r}")
        if self.probes < 1:
            raise ValueError(f"probes = {self.probes}: must be a positive integer")
        if self.per_input_budget is not None:
            if not self.per_input_budget >= 0:
                raise ValueError(f"budget = {self.per_input_budget}: must be a non-negative number")
            if not entry.loss_units:
                raise ValueError(f"budget (per-input) needs loss-unit scores: selector must be one of "
                                 f"{loss_unit}, got {self.selector!r}")
        if self.fuse and not entry.drops:
            raise ValueError(f"fuse applies to drop selectors; {self.selector!r} has its own reduction")
        if depth is not None:
            for layer in list(self.layers) + [layer for layer, _ in self.heads]:
                if layer >= depth:
                    raise ValueError(f"layer {layer} is out of range: the model has {depth} blocks (0..{depth - 1})")
        if num_heads is not None:
            for layer, idx in self.heads:
                total = num_heads[layer] if isinstance(num_heads, Mapping) else num_heads
                bad = [i for i in idx if i >= total]
                if bad:
                    raise ValueError(f"heads: layer {layer} has {total} heads (0..{total - 1}); cannot remove {bad}")
                if len(set(idx)) >= total:
                    raise ValueError(f"heads: removing all {total} heads of layer {layer} is not allowed "
                                     "(the attention would vanish); keep at least one")

    # ------------------------------------------------------------------ views

    @property
    def head_map(self) -> dict[int, tuple[int, ...]]:
        return dict(self.heads)

    @property
    def keep_map(self) -> dict[int, float]:
        return dict(zip(self.layers, self.keep))

    @property
    def prunes_tokens(self) -> bool:
        return any(r < 1.0 for r in self.keep) or (self.per_input_budget is not None and bool(self.layers))

    def replace(self, **changes: Any) -> "PruningConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layers"], out["keep"] = list(self.layers), list(self.keep)
        out["heads"] = {str(k): list(v) for k, v in self.heads}
        return out

    def to_string(self) -> str:
        """The compact text form; `PruningConfig.parse(c.to_string()) == c`."""
        items = []
        if self.layers:
            # repr is the shortest text that reads back as the same float: a parsed schedule keeps
            # (and merges) exactly the tokens this one does.
            ratios = sorted(set(self.keep))
            ratio_text = (repr(ratios[0]) if len(ratios) == 1 else ",".join(repr(r) for r in self.keep))
            items.append(f"tokens={ratio_text}@{','.join(str(v) for v in self.layers)}")
        defaults = PruningConfig()
        if self.layers or self.selector != defaults.selector:
            items.append(f"selector={self.selector}")
        if self.heads:
            items.append("heads=" + ",".join(f"{k}:{'+'.join(str(i) for i in v)}" for k, v in self.heads))
        for name in ("seed", "probes", "gate", "per_input_budget", "fuse", "variant"):
            value = getattr(self, name)
            if value != getattr(defaults, name):
                key = "budget" if name == "per_input_budget" else name
                items.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return ";".join(items)

    def __str__(self) -> str:
        return self.to_string()

    # ------------------------------------------------------------------ parsing

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruningConfig":
        """Build from a mapping (a parsed YAML/JSON file); unknown keys are an error."""
        data = dict(data)
        if "tokens" in data:  # allow the compact token syntax inside files too
            layers, keep = _parse_tokens(str(data.pop("tokens")))
            data.setdefault("layers", layers)
            data.setdefault("keep", keep)
        if "budget" in data:
            data["per_input_budget"] = data.pop("budget")
        if isinstance(data.get("heads"), str):
            data["heads"] = _parse_heads(data["heads"])
        if isinstance(data.get("keep"), (int, float)):
            data["keep"] = (data["keep"],)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown pruning config key(s) {unknown}; allowed: {sorted(names | {'tokens', 'budget'})}")
        heads = data.get("heads", ())
        if isinstance(heads, Mapping):
            data["heads"] = tuple((int(k), tuple(v) if isinstance(v, (list, tuple)) else (int(v),))
                                  for k, v in heads.items())
        return cls(**data)

    @classmethod
    def parse(cls, text_or_path: "str | os.PathLike | PruningConfig | Mapping[str, Any]") -> "PruningConfig":
        """Parse the compact string form, or read a YAML/JSON file (see module docstring)."""
        if isinstance(text_or_path, PruningConfig):
            return text_or_path
        if isinstance(text_or_path, Mapping):
            return cls.from_dict(text_or_path)
        text = os.fspath(text_or_path)
        path = Path(text).expanduser()
        if path.suffix.lower() in (".yaml", ".yml", ".json"):
            if not path.is_file():
                raise ValueError(f"pruning config file {path} does not exist")
            loaded = json.loads(path.read_text()) if path.suffix.lower() == ".json" else yaml.safe_load(path.read_text())
            if not isinstance(loaded, Mapping):
                raise ValueError(f"pruning config file {path}: expected a mapping of keys to values")
            return cls.from_dict(loaded)
        data: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(";"))):
            if "=" not in item:
                raise ValueError(f"pruning config item {item!r} is not key=value (text: {text!r})")
            key, value = (s.strip() for s in item.split("=", 1))
            if key in data:
                raise ValueError(f"pruning config key {key!r} given twice in {text!r}")
            data[key] = _parse_value(key, value)
        return cls.from_dict(data)


def _parse_value(key: str, value: str) -> Any:
    if key in ("tokens", "heads", "selector", "gate", "variant"):
        return value if key != "gate" or value.lower() not in ("none", "") else None
    if key in ("seed", "probes"):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key} = {value!r}: expected an integer") from None
    if key == "budget":
        try:
            return None if value.lower() == "none" else float(value)
        except ValueError:
            raise ValueError(f"budget = {value!r}: expected a number") from None
    if key == "fuse":
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"fuse = {value!r}: expected true or false")
        return value.lower() in ("true", "1")
    return value  # from_dict reports unknown keys


def _parse_tokens(text: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """'0.7@3,6,9' or '0.9,0.8,0.7@3,6,9' -> (layers, ratios)."""
    if "@" not in text:
        raise ValueError(f"tokens = {text!r}: expected <ratio(s)>@<layers>, e.g. 0.7@3,6,9")
    ratio_text, layer_text = text.split("@", 1)
    try:
        ratios = tuple(float(v) for v in ratio_text.split(",") if v.strip())
        layers = tuple(int(v) for v in layer_text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"tokens = {text!r}: ratios must be numbers and layers integers") from None
    if len(ratios) == 1:
        ratios = ratios * len(layers)
    return layers, ratios


def _parse_heads(text: str) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """'0:1,5:0' or '0:1+2' -> ((0, (1, 2)), ...) (pairs may repeat a layer)."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if ":" not in item:
            raise ValueError(f"heads item {item!r} is not layer:head (text: {text!r})")
        layer, heads = item.split(":", 1)
        try:
            pairs.append((int(layer), tuple(int(h) for h in heads.split("+"))))
        except ValueError:
            raise ValueError(f"heads item {item!r}: layer and heads must be integers") from None
    return tuple(pairs)


def kept_tokens(n_body: int, keep: float, selector: str | None = None, fuse: bool = False) -> int:
    """Non-prefix tokens left after one reduction of `n_body` tokens at keep ratio `keep`.

    The single source of truth for counts, shared by the pruned forward and the analytic FLOPs: the
    reducer's catalogue entry turns k = ceil(keep·n) into its count (selector None: plain k).
    """
    # round() first: 0.7 * 10 is 7.000000000000001 in floating point, and ceil would give 8.
    k = max(1, math.ceil(round(keep * n_body, 6)))
    if k >= n_body:
        return n_body
    return k if selector is None else catalogue.reducer(selector).kept(n_body, k, fuse)


def token_plan(config: PruningConfig, num_patches: int, depth: int, prefix: int) -> list[tuple[int, int]]:
    """Tokens (prefix included) entering each block's attention and MLP, for a fixed-count config."""
    config.check(depth=depth)
    keep = config.keep_map
    drops = catalogue.reducer(config.selector).drops
    n = num_patches
    plan = []
    for layer in range(depth):
        if layer in keep and drops:
            n = kept_tokens(n, keep[layer], config.selector, config.fuse)
        n_attn = n
        if layer in keep and not drops:
            n = kept_tokens(n, keep[layer], config.selector)
        plan.append((n_attn + prefix, n + prefix))
    return plan
