"""Pruning chapter: accuracy vs FLOPs of token, head and joint pruning, every selector and peer.

One sweep (`run`) evaluates, on the same images and without fine-tuning:
- token-only pruning at symmetric keep ratios (and at extra FLOPs targets) with each drop selector,
  the EViT and ToMe peers matched to the same FLOPs, and the HEART oracle (per-input HVPs, on a
  subset of the images because of its cost, which is reported separately);
- head-only pruning at FLOPs targets, heads ranked by calibration scores of several methods;
- joint pruning (heads + tokens) at FLOPs targets;
- paired comparisons at equal FLOPs of the declared primaries (claim C2): token-only against
  head-only, joint against token-only, on the same images;
- asymmetric schedules from loss budgets ε (predicted vs measured loss increase), and the same
  budgets with the prediction calibrated: a ratio measured/predicted fitted on the calibration
  images, applied to the evaluation images;
- batch-size-1 per-input budgets with the oracle.
Every row carries analytic FLOPs of what ran, accuracy with Wilson intervals, and the top-1 drop
against the unpruned model on the same images with a paired bootstrap interval.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from heart_lib.progress import progress

from heart_lib import catalogue, data, models, planning, results
from heart_lib import display as D
from heart_lib.budget import Calibration, fitted_ratio, predicted_loss, schedule_for_budget
from heart_lib.flops import base_shape, count_flops, counted_flops, vit_shape
from heart_lib.pruning import PruningConfig, prune, train_token_gate
from heart_lib.pruning.selectors import TokenGateSet, block_inputs, gate_rank_agreement
from heart_lib.stats import paired_difference, wilson_interval



def head_methods() -> tuple[str, ...]:
    """Scores that rank heads and are cheap enough for calibration (not one HVP per component)."""
    return tuple(n for n, e in catalogue.SCORES.items() if "heads" in e.acts_on and not e.per_component)


def token_selectors() -> tuple[str, ...]:
    """Drop selectors the sweep runs on every image (the oracle runs separately, see oracle_method)."""
    return tuple(n for n, e in catalogue.REDUCERS.items() if e.drops and "oracle" not in e.needs)


def _uses_gate(selector: str) -> bool:
    return "gate" in catalogue.reducer(selector).needs


def _uses_oracle(selector: str) -> bool:
    return "oracle" in catalogue.reducer(selector).needs


@dataclass(frozen=True)
class Params:
    model: str = "deit_tiny_patch16_224"
    weights: str = "mirror"
    dataset: str = "imagenet-val-1300"
    data_path: str | None = None
    limit: int | None = None  # evaluation images (None = all)
    calib_dataset: str = "imagenet-sample-1000"  # scores for heads, budgets and the gate come from here
    calib_limit: int = 64
    oracle_limit: int = 100  # evaluation images that also get the per-input HVP oracle
    batch_size: int = 64
    seed: int = 0
    num_classes: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    layers: list[int] = field(default_factory=lambda: [3, 6, 9])  # token pruning layers
    token_keeps: list[float] = field(default_factory=lambda: [0.8, 0.6])  # symmetric keep ratios
    # extra token-only FLOPs reductions: the paper's 49.4 % and the levels heads and joint are compared at
    flops_targets: list[float] = field(default_factory=lambda: [0.28, 0.40, 0.494, 0.6])
    token_selectors: list[str] = field(default_factory=lambda: ["gate", "cls_attention", "norm", "random"])
    peers: list[str] = field(default_factory=lambda: ["evit", "tome"])
    oracle_method: str = "heart"
    calib_method: str = "heart_hutchinson"  # token/head curvature on calibration images (gate, heads, budgets)
    probes: int = 4  # Hutchinson probes (calibration and, if chosen, the oracle)
    head_methods: list[str] = field(default_factory=lambda: ["heart", "taylor", "random"])
    head_targets: list[float] = field(default_factory=lambda: [0.07, 0.14, 0.21, 0.28])  # DeiT-Tiny: ≤ 28 %
    joint_targets: list[float] = field(default_factory=lambda: [0.40, 0.494])
    joint_head_share: float = 0.07  # FLOPs reduction taken by heads in the primary joint configs
    joint_head_share_grid: list[float] = field(default_factory=lambda: [0.035, 0.14, 0.21])  # secondary joint variants: every head ranking at these shares
    joint_selectors: list[str] = field(default_factory=lambda: ["gate", "cls_attention"])
    # Declared before results are read (joint configurations, equal-FLOPs comparisons of claim C2):
    primary_selector: str = "gate"  # HEART's token selector on every image: the gate trained on its curvature
    primary_head_method: str = "heart"  # HEART's head ranking
    budgets: list[float] = field(default_factory=lambda: [0.05, 0.2, 0.5])  # ε (nats) for asymmetric schedules
    per_input_budgets: list[float] = field(default_factory=lambda: [0.05, 0.2])
    gate_hidden: int = 64
    gate_epochs: int = 40
    reuse: bool = True  # reuse a finished sweep table with the same parameters

    def check(self) -> None:
        models.check_model_name(self.model)
        try:  # before any compute: tokens and heads are pruned in timm Vision Transformers only
            base_shape(self.model)
        except ValueError as err:
            raise ValueError(f"parameter 'model' = {self.model!r}: {err}") from None
        for name in ("dataset", "calib_dataset"):
            if getattr(self, name) not in data.DATASETS:
                raise ValueError(f"parameter {name!r} = {getattr(self, name)!r}: allowed values are {list(data.DATASETS)}")
        for name in ("batch_size", "calib_limit", "oracle_limit", "gate_hidden", "gate_epochs", "probes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"parameter {name!r} = {getattr(self, name)}: must be a positive integer")
        if not self.layers or sorted(set(self.layers)) != list(self.layers) or min(self.layers) < 1:
            raise ValueError(f"parameter 'layers' = {self.layers}: strictly increasing block indices ≥ 1")
        for keep in self.token_keeps:
            if not 0 < keep <= 1:
                raise ValueError(f"parameter 'token_keeps' has {keep}: ratios must lie in (0, 1]")
        for name in ("flops_targets", "head_targets", "joint_targets"):
            for t in getattr(self, name):
                if not 0 <= t < 1:
                    raise ValueError(f"parameter {name!r} has {t}: FLOPs reductions must lie in [0, 1)")
        allowed = token_selectors()
        bad = [s for s in self.token_selectors if s not in allowed]
        if bad:
            raise ValueError(f"parameter 'token_selectors' has {bad}: allowed {list(allowed)} "
                             "(the oracle runs separately, see oracle_method)")
        peers = catalogue.reducers(where="after_attention")
        if any(p not in peers for p in self.peers):
            raise ValueError(f"parameter 'peers' = {self.peers}: allowed {list(peers)}")
        oracles = catalogue.oracle_reducers()
        for name in ("calib_method", "oracle_method"):
            if getattr(self, name) not in oracles:
                raise ValueError(f"parameter {name!r} = {getattr(self, name)!r}: allowed {', '.join(oracles)}")
        if any(m not in head_methods() for m in self.head_methods):
            raise ValueError(f"parameter 'head_methods' = {self.head_methods}: allowed {list(head_methods())}")
        if self.primary_selector not in self.token_selectors:
            raise ValueError(f"parameter 'primary_selector' = {self.primary_selector!r}: must be one of "
                             f"token_selectors {self.token_selectors}")
        if self.primary_head_method not in self.head_methods:
            raise ValueError(f"parameter 'primary_head_method' = {self.primary_head_method!r}: must be one of "
                             f"head_methods {self.head_methods}")
        if any(s not in self.token_selectors + list(oracles) for s in self.joint_selectors):
            raise ValueError(f"parameter 'joint_selectors' = {self.joint_selectors}: must be among token_selectors "
                             f"or the oracles {list(oracles)}")
        for share in [self.joint_head_share, *self.joint_head_share_grid]:
            if not 0 <= share < min(self.joint_targets, default=1):
                raise ValueError(f"head share {share} (joint_head_share, joint_head_share_grid): must lie in "
                                 f"[0, the smallest joint target {min(self.joint_targets, default=1)})")
        if any(b < 0 for b in self.budgets + self.per_input_budgets):
            raise ValueError("budgets must be non-negative")

    def stage_params(self) -> dict[str, Any]:
        """What the sweep's numbers depend on (not `reuse`)."""
        return {k: v for k, v in asdict(self).items() if k != "reuse"}

    def key(self) -> str:
        """The cache key of the sweep: its parameters and the code it runs (`results.cache_key`)."""
        return results.cache_key("pruning", self.stage_params(), (__name__,))


# ------------------------------------------------------------------------------------------ data


def _load(name: str, model, params: Params, limit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    image_size = model.patch_embed.img_size[0]
    dataset = data.image_dataset(name, data.model_transform(model), limit=limit, seed=seed, path=params.data_path,
                                 image_size=image_size, num_classes=model.num_classes)
    images, labels = [], []
    for x, y in progress(data.make_loader(dataset, params.batch_size), f"load {name}"):
        images.append(x)
        labels.append(torch.as_tensor(y))
    return torch.cat(images), torch.cat(labels)


@dataclass
class Context:
    """Everything the sweep shares: model, images, dense outputs, calibration scores, the gate."""

    params: Params
    model: torch.nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    calib_images: torch.Tensor
    calib_labels: torch.Tensor
    dense_logits: torch.Tensor
    dense_flops: int
    prefix_layer: int
    prefix_stream: torch.Tensor  # residual stream at the input of block prefix_layer (unpruned)
    calib_token_scores: dict[int, torch.Tensor]
    head_scores: dict[str, torch.Tensor]  # method -> [L, H] mean over calibration images
    calib_head_raw: torch.Tensor  # HEART head scores per calibration image [B, L, H]
    gate: Any
    gate_agreement: dict[int, float]
    oracle_index: torch.Tensor  # evaluation images that have oracle scores
    oracle_scores: dict[int, torch.Tensor]  # layer -> [n_oracle, N]
    costs: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self):
        return vit_shape(self.model)


@torch.no_grad()
def _logits(model, images: torch.Tensor, batch: int, **kw) -> torch.Tensor:
    out = []
    total = len(images) if images is not None else len(kw["tokens"])
    for start in range(0, total, batch):
        sl = slice(start, start + batch)
        extra = {k: (v[sl] if isinstance(v, torch.Tensor) else {l: s[sl] for l, s in v.items()} if isinstance(v, dict) else v)
                 for k, v in kw.items()}
        out.append(model(images[sl] if images is not None else None, **extra).float())
    return torch.cat(out)


def _scores_in_batches(model, images, labels, params: Params, layers, heads: bool, method: str, chunk: int = 16):
    from heart_lib import sensitivity

    tokens: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    head_parts = []
    for start in progress(range(0, len(images), chunk), f"{method} scores"):
        s = sensitivity.score_components(model, images[start:start + chunk], layers=tuple(layers) if layers else (),
                                         heads=heads, method=method, loss="pseudo", probes=params.probes,
                                         seed=params.seed)  # probes are drawn per image
        for l in layers:
            tokens[l].append(s.tokens[l])
        if heads:
            head_parts.append(s.heads)
    return ({l: torch.cat(v) for l, v in tokens.items()}, torch.cat(head_parts) if heads else None)


def _cache_folder(params: Params) -> Path:
    return results.cache_folder("pruning", params.stage_params(), (__name__,))


def prepare(params: Params) -> Context:
    """Load model and images, score calibration images, train the gate, run the val oracle subset.

    The expensive parts (scores, dense outputs, gate) are cached under the data cache, keyed by the
    parameters, so an interrupted sweep resumes without re-running the HVPs."""
    torch.manual_seed(params.seed)
    model = models.create_model(params.model, params.weights, params.num_classes, seed=params.seed,
                                **params.model_kwargs)
    images, labels = _load(params.dataset, model, params, params.limit, params.seed)
    calib_images, calib_labels = _load(params.calib_dataset, model, params, params.calib_limit, params.seed + 1)
    cached = _cache_folder(params) / "prepare.pt"
    if cached.is_file():
        blob = torch.load(cached, weights_only=False)
        prefix_layer = min(params.layers) - 1
        stream = (block_inputs(model, images, (prefix_layer,), params.batch_size)[prefix_layer]
                  if prefix_layer > 0 else None)
        gate = TokenGateSet(blob["gate_dim"], tuple(params.layers), params.gate_hidden)
        gate.load_state_dict(blob["gate"])
        return Context(params, model, images, labels, calib_images, calib_labels, blob["dense_logits"],
                       count_flops(model), max(prefix_layer, 0), stream, blob["calib_tokens"], blob["head_scores"],
                       blob["calib_heads"], gate.eval(), blob["agreement"], blob["oracle_index"],
                       blob["oracle_scores"], blob["costs"])
    ctx = _prepare(params, model, images, labels, calib_images, calib_labels)
    with results.atomic_path(cached) as tmp:
        torch.save({"dense_logits": ctx.dense_logits, "calib_tokens": ctx.calib_token_scores,
                    "head_scores": ctx.head_scores, "calib_heads": ctx.calib_head_raw, "gate": ctx.gate.state_dict(),
                    "gate_dim": ctx.gate.dim, "agreement": ctx.gate_agreement, "oracle_index": ctx.oracle_index,
                    "oracle_scores": ctx.oracle_scores, "costs": ctx.costs}, tmp)
    return ctx


def _prepare(params: Params, model, images, labels, calib_images, calib_labels) -> Context:
    costs: dict[str, float] = {}
    t0 = time.perf_counter()
    dense_logits = _logits(model, images, params.batch_size)
    costs["dense_eval_seconds"] = time.perf_counter() - t0
    prefix_layer = min(params.layers) - 1
    stream = block_inputs(model, images, (prefix_layer,), params.batch_size)[prefix_layer] if prefix_layer > 0 else None

    layers = tuple(params.layers)
    t0 = time.perf_counter()
    calib_tokens, calib_heads = _scores_in_batches(model, calib_images, calib_labels, params, layers, True,
                                                   params.calib_method)
    costs["calib_heart_seconds_per_image"] = (time.perf_counter() - t0) / len(calib_images)
    # The head ranking named "heart" is the calibration curvature (calib_method), mean over images.
    head_scores = {"heart": calib_heads.nanmean(0)}
    for method in params.head_methods:
        if method not in head_scores:
            _, h = _scores_in_batches(model, calib_images, calib_labels, params, (), True, method)
            head_scores[method] = h.nanmean(0)

    # Gate: trained on 3/4 of the calibration images, agreement measured on the rest.
    feats = block_inputs(model, calib_images, layers, params.batch_size)
    split = max(1, (3 * len(calib_images)) // 4)
    prefix = model.num_prefix_tokens
    gate = train_token_gate({l: f[:split] for l, f in feats.items()}, {l: s[:split] for l, s in calib_tokens.items()},
                            prefix, hidden=params.gate_hidden, epochs=params.gate_epochs, seed=params.seed)
    held = slice(split, None) if split < len(calib_images) else slice(None)
    agreement = gate_rank_agreement(gate, {l: f[held] for l, f in feats.items()},
                                    {l: s[held] for l, s in calib_tokens.items()}, prefix)

    n_oracle = min(params.oracle_limit, len(images))
    oracle_index = torch.randperm(len(images), generator=torch.Generator().manual_seed(params.seed))[:n_oracle].sort().values
    t0 = time.perf_counter()
    oracle_scores, _ = _scores_in_batches(model, images[oracle_index], None, params, layers, False, params.oracle_method)
    costs["oracle_seconds_per_image"] = (time.perf_counter() - t0) / n_oracle
    costs["oracle_flops_per_image"] = _oracle_flops(model, images[:1], params)
    return Context(params, model, images, labels, calib_images, calib_labels, dense_logits, count_flops(model),
                   max(prefix_layer, 0), stream, calib_tokens, head_scores, calib_heads, gate, agreement,
                   oracle_index, oracle_scores, costs)


def _oracle_flops(model, image: torch.Tensor, params: Params) -> float:
    """FLOPs FlopCounterMode counts for the oracle on one image (forward, backward and HVP passes)."""
    from torch.utils.flop_counter import FlopCounterMode

    from heart_lib import sensitivity
    from heart_lib.flops import CPU_SDPA_MAPPING

    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_MAPPING) as counter:
        sensitivity.score_tokens(model, image, layers=list(params.layers), method=params.oracle_method,
                                 probes=params.probes, seed=params.seed)
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class Item:
    family: str  # token | head | joint | budget | per_input | dense
    method: str  # selector / head method / peer
    level: str  # the level's label (target)
    config: PruningConfig
    subset: bool = False  # evaluated on the oracle subset only
    target: float | None = None  # the FLOPs reduction it was matched to (None: a keep ratio or a budget)
    heads_by: str = ""  # joint configurations: the head ranking and the share of FLOPs its heads save
    head_share: float | None = None


def _reduction(ctx: Context, config: PruningConfig) -> float:
    return 1.0 - count_flops(config, base=ctx.model, gate_hidden=ctx.params.gate_hidden) / ctx.dense_flops


def _reduction_on(ctx: Context):
    return lambda config: _reduction(ctx, config)


def _match_keep(ctx: Context, target: float, selector: str, heads=(), **kw) -> PruningConfig:
    return planning.match_keep(_reduction_on(ctx), target, tuple(ctx.params.layers), selector, heads=heads, **kw)


def _heads_for(ctx: Context, scores: torch.Tensor, target: float) -> dict[int, tuple[int, ...]]:
    num_heads = {l: b.heads for l, b in enumerate(ctx.shape.blocks)}
    return planning.heads_for_target(scores, target, _reduction_on(ctx), num_heads)


def sweep_items(ctx: Context) -> list[Item]:
    """Every configuration of the sweep, FLOPs-matched (see module docstring)."""
    p = ctx.params
    items = [Item("dense", "unpruned", "0", PruningConfig())]
    levels = [(f"keep {k:g}", PruningConfig(layers=tuple(p.layers), keep=(k,), selector="cls_attention"), None)
              for k in p.token_keeps]
    levels += [(f"FLOPs -{100 * t:.1f} %", _match_keep(ctx, t, "cls_attention"), t) for t in p.flops_targets]
    for label, reference, asked in levels:
        target = _reduction(ctx, reference)
        for selector in p.token_selectors:
            items.append(Item("token", selector, label, reference.replace(selector=selector, gate="sweep-gate")
                              if _uses_gate(selector) else reference.replace(selector=selector), target=asked))
        items.append(Item("token", p.oracle_method, label, reference.replace(selector=p.oracle_method), subset=True))
        # HEART curvature is negative for about half the tokens: rank by |S| as well (book/method.md, 'Components, gates and the sensitivity score' variants)
        items.append(Item("token", f"{p.oracle_method} |S|", label,
                          reference.replace(selector=p.oracle_method, variant="abs"), subset=True))
        for peer in p.peers:
            schedule = catalogue.reducer(peer).schedule
            config = (planning.match_constant_merge(_reduction_on(ctx), target, ctx.shape.num_patches(),
                                                    len(ctx.shape.blocks), peer)
                      if schedule == "constant_merge" else _match_keep(ctx, target, peer))
            items.append(Item("token", peer, label, config))
    for target in p.head_targets:
        for method in p.head_methods:
            items.append(Item("head", method, f"FLOPs -{100 * target:.1f} %",
                              PruningConfig(heads=_heads_for(ctx, ctx.head_scores[method], target)), target=target))
    variants = [(selector, p.primary_head_method, p.joint_head_share) for selector in p.joint_selectors]
    variants += [(p.primary_selector, method, share) for share in sorted({p.joint_head_share, *p.joint_head_share_grid})
                 for method in p.head_methods if (p.primary_selector, method, share) not in variants]
    for target in p.joint_targets:
        for selector, method, share in variants:
            heads = _heads_for(ctx, ctx.head_scores[method], share)
            kw = {"gate": "sweep-gate"} if _uses_gate(selector) else {}
            config = _match_keep(ctx, target, selector, heads=heads, **kw)
            primary = method == p.primary_head_method and share == p.joint_head_share
            level = f"FLOPs -{100 * target:.1f} %" + ("" if primary else f", heads {D.label(method)} {100 * share:g} %")
            items.append(Item("joint", selector, level, config, subset=_uses_oracle(selector), target=target,
                              heads_by=method, head_share=share))
    return items


def _calibration_loss_increase(ctx: Context, config: PruningConfig) -> float:
    """Mean pseudo-label loss increase of `config` (oracle selector) on the calibration images, with
    their own calibration scores as the oracle."""
    p = ctx.params
    dense = _logits(ctx.model, ctx.calib_images, p.batch_size)
    pruned = prune(ctx.model, config)
    logits = _logits(pruned, ctx.calib_images, p.batch_size, oracle=ctx.calib_token_scores)
    target = dense.argmax(-1)
    return float((F.cross_entropy(logits, target, reduction="none")
                  - F.cross_entropy(dense, target, reduction="none")).mean())


def budget_items(ctx: Context) -> tuple[list[Item], dict[str, dict[str, float]]]:
    """Asymmetric schedules from loss budgets (oracle on the subset, gate on all), the same budgets
    with the calibrated prediction, and per-input budgets."""
    p = ctx.params
    calib = Calibration.from_scores(ctx.calib_token_scores, ctx.calib_head_raw, ctx.model.num_prefix_tokens)

    def schedule(eps: float):
        return schedule_for_budget(calib, ctx.shape, eps, layers=tuple(p.layers), selector=p.oracle_method)

    raw = {eps: schedule(eps) for eps in p.budgets}
    # The ratio is fitted on the calibration images only; the evaluation images then test it.
    ratio = fitted_ratio([raw[e].predicted["total"] for e in p.budgets],
                         [_calibration_loss_increase(ctx, raw[e].config.replace(variant="abs")) for e in p.budgets])
    items, predicted = [], {}
    for calibrated in (False, True):
        for eps in p.budgets:
            sched = schedule(eps / ratio) if calibrated and ratio > 0 else raw[eps]
            label = f"ε={eps:g}" + (", calibrated" if calibrated else "")
            scale = ratio if calibrated else 1.0
            predicted[label] = {**sched.predicted, "reduction": sched.reduction, "asked": eps,
                                "calibrated": calibrated, "ratio": ratio, "expected": scale * sched.predicted["total"]}
            items.append(Item("budget", f"{p.oracle_method} |S|", label, sched.config.replace(variant="abs"),
                              subset=True))
            for selector in filter(_uses_gate, p.token_selectors):
                items.append(Item("budget", selector, label, sched.config.replace(selector=selector, gate="sweep-gate")))
    for eps in p.per_input_budgets:
        config = PruningConfig(layers=tuple(p.layers), keep=(0.1,), selector=p.oracle_method, per_input_budget=eps,
                               variant="abs")
        items.append(Item("per_input", f"{p.oracle_method} |S|", f"ε={eps:g}", config, subset=True))
    return items, predicted


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_item(ctx: Context, item: Item) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Evaluate one configuration: (summary row, per-image loss, per-image correctness)."""
    p = ctx.params
    subset = item.subset and len(ctx.oracle_index) < len(ctx.images)  # an oracle on every image is no subset
    index = ctx.oracle_index if subset else torch.arange(len(ctx.images))
    pruned = prune(ctx.model, item.config, gate=ctx.gate if _uses_gate(item.config.selector) else None)
    kwargs: dict[str, Any] = {}
    if _uses_oracle(item.config.selector) and item.config.layers:
        kwargs["oracle"] = ctx.oracle_scores  # precomputed per input (cost reported separately)
    use_stream = (ctx.prefix_stream is not None and item.family != "dense"
                  and pruned.first_changed_block() >= ctx.prefix_layer)
    t0 = time.perf_counter()
    if item.family == "dense":
        logits = ctx.dense_logits[index]
    elif use_stream:
        logits = _logits(pruned, None, p.batch_size, tokens=ctx.prefix_stream[index], start_layer=ctx.prefix_layer,
                         **kwargs)
    else:
        logits = _logits(pruned, ctx.images[index], p.batch_size, **kwargs)
    seconds = time.perf_counter() - t0
    labels = ctx.labels[index]
    dense = ctx.dense_logits[index]
    loss = F.cross_entropy(logits, labels, reduction="none")
    pseudo = F.cross_entropy(logits, dense.argmax(-1), reduction="none")
    dense_loss = F.cross_entropy(dense, labels, reduction="none")
    dense_pseudo = F.cross_entropy(dense, dense.argmax(-1), reduction="none")
    correct = (logits.argmax(-1) == labels).numpy()
    hits, n = int(correct.sum()), len(correct)
    lo, hi = wilson_interval(hits, n)
    dense_correct = (dense.argmax(-1) == labels).numpy()
    drop, drop_lo, drop_hi = paired_difference(dense_correct, correct, seed=p.seed)
    if item.config.per_input_budget is not None:
        # FLOPs of each input from the token counts it actually ran with
        flops = float(np.mean([count_flops_from_counts(ctx, item.config, c) for c in pruned.record.counts]))
    else:
        flops = float(count_flops(pruned))
    row = {
        "family": item.family, "method": item.method, "level": item.level, "config": item.config.to_string(),
        "images": "oracle subset" if subset else "all", "n": n,
        "flops": flops, "gflops": flops / 1e9, "flops_reduction": 1 - flops / ctx.dense_flops,
        "top1": hits / n, "top1_lo": lo, "top1_hi": hi, "dense_top1_same_images": float(dense_correct.mean()),
        "top1_drop": drop, "top1_drop_lo": drop_lo, "top1_drop_hi": drop_hi,
        "loss": float(loss.mean()), "loss_increase": float((loss - dense_loss).mean()),
        "pseudo_loss_increase": float((pseudo - dense_pseudo).mean()),
        "agreement_with_dense": float((logits.argmax(-1) == dense.argmax(-1)).float().mean()),
        "heads_removed": sum(len(h) for _, h in item.config.heads), "heads_by": item.heads_by,
        "head_share": item.head_share, "eval_seconds": seconds,
    }
    return row, loss.numpy(), correct


def count_flops_from_counts(ctx: Context, config: PruningConfig, counts) -> float:
    from heart_lib.flops import analytic_flops

    return analytic_flops(ctx.shape.without_heads(config.head_map), config, counts=counts)["total"]


def flops_check(ctx: Context, items: list[Item]) -> pd.DataFrame:
    """Analytic vs FlopCounterMode FLOPs on one image, for every fixed-count configuration."""
    rows = []
    for item in items:
        if item.config.per_input_budget is not None:
            continue
        pruned = prune(ctx.model, item.config, gate=ctx.gate if _uses_gate(item.config.selector) else None)
        oracle = _uses_oracle(item.config.selector) and item.config.layers
        kwargs = {"oracle": {l: s[:1] for l, s in ctx.oracle_scores.items()}} if oracle else {}
        counted = counted_flops(pruned, images=ctx.images[ctx.oracle_index[:1]], **kwargs)
        analytic = count_flops(pruned)
        rows.append({"family": item.family, "method": item.method, "level": item.level,
                     "config": item.config.to_string(), "analytic": analytic, "counted": counted,
                     "relative_error": (analytic - counted) / counted})
    return pd.DataFrame(rows).drop_duplicates("config")


# ------------------------------------------------------------------------------------------ run


def run(params: Params, out: Path) -> dict[str, pd.DataFrame]:
    """The whole sweep; writes its tables under `out` and returns them. Reuses a finished sweep
    with identical parameters when `params.reuse` (the tables say which parameters made them)."""
    out = Path(out)
    meta_path = out / "sweep.meta.json"
    if params.reuse and meta_path.is_file() and results.read_json(meta_path).get("params_key") == params.key():
        return load_tables(out)
    ctx = prepare(params)
    items = sweep_items(ctx)
    b_items, predicted = budget_items(ctx)
    rows, outcomes = [], []
    folder = _cache_folder(params)
    for item in progress(items + b_items, "sweep"):
        name = hashlib.sha256(f"{item.family}|{item.method}|{item.level}|{item.config}|{item.subset}".encode()
                              ).hexdigest()[:16]
        path = folder / f"item-{name}.pt"
        if path.is_file():
            row, loss, correct = torch.load(path, weights_only=False)
        else:
            row, loss, correct = evaluate_item(ctx, item)
            with results.atomic_path(path) as tmp:
                torch.save((row, loss, correct), tmp)
        rows.append(row)
        outcomes.append((item, row, correct))
    sweep = pd.DataFrame(rows)
    comparisons = equal_flops_comparisons(params, outcomes)
    budget = _budget_table(ctx, sweep, predicted)
    checks = flops_check(ctx, items + b_items)
    costs = {**ctx.costs, "dense_flops": ctx.dense_flops, "oracle_images": len(ctx.oracle_index),
             "oracle_flops_over_dense_forward": ctx.costs["oracle_flops_per_image"] / ctx.dense_flops,
             "gate_params": sum(p.numel() for p in ctx.gate.parameters()),
             "heads_per_layer": sorted({b.heads for b in ctx.shape.blocks}),
             "max_head_flops_reduction": _reduction(ctx, PruningConfig(
                 heads={l: tuple(range(b.heads - 1)) for l, b in enumerate(ctx.shape.blocks) if b.heads > 1})),
             "gate_spearman_heldout": {str(k): v for k, v in ctx.gate_agreement.items()}}
    meta = {"params": asdict(params), "params_key": params.key()}
    results.write_table(out / "sweep.csv", sweep, meta=meta)
    results.write_table(out / "budget.csv", budget, meta=meta)
    results.write_table(out / "flops_check.csv", checks, meta=meta)
    results.write_table(out / "equal_flops.csv", comparisons, meta=meta)
    results.write_json(out / "costs.json", costs)
    # meta last: its presence marks a finished sweep
    results.write_json(meta_path, {**results.run_metadata(), **meta})
    return load_tables(out)


FAMILY_TITLES = {"token": "tokens only", "head": "heads only", "joint": "tokens and heads", "budget": "loss budgets"}
COMPARISON_COLUMNS = ["comparison", "target", "first", "second", "first_flops_reduction",
                      "second_flops_reduction", "n", "first_top1", "second_top1", "difference", "lo", "hi"]


def equal_flops_comparisons(params: Params, outcomes: list[tuple[Item, dict[str, Any], np.ndarray]]) -> pd.DataFrame:
    """Top-1 of one primary configuration minus another's at the same FLOPs target, on the same
    images, with a paired bootstrap interval: token-only (primary selector) against head-only (primary
    head ranking) wherever both were matched to one target, and joint against token-only likewise."""
    found = {(item.family, item.method, item.target): (row, correct) for item, row, correct in outcomes
             if item.target is not None and row["images"] == "all"
             and (item.family != "joint" or (item.heads_by == params.primary_head_method
                                             and item.head_share == params.joint_head_share))}
    pairs = [("tokens minus heads", ("token", params.primary_selector), ("head", params.primary_head_method)),
             ("joint minus tokens", ("joint", params.primary_selector), ("token", params.primary_selector))]
    rows = []
    for name, first, second in pairs:
        for target in sorted({t for (_, _, t) in found}):
            a, b = found.get((*first, target)), found.get((*second, target))
            if a is None or b is None:
                continue
            difference, lo, hi = paired_difference(a[1], b[1], seed=params.seed)
            rows.append({"comparison": name, "target": target, "first": f"{first[0]}: {first[1]}",
                         "second": f"{second[0]}: {second[1]}", "first_flops_reduction": a[0]["flops_reduction"],
                         "second_flops_reduction": b[0]["flops_reduction"], "n": len(a[1]),
                         "first_top1": a[0]["top1"], "second_top1": b[0]["top1"],
                         "difference": difference, "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def equal_flops_table(comparisons: pd.DataFrame):
    """The equal-FLOPs comparisons for the page: which family against which, FLOPs saved and top-1
    of both, and the paired difference (the primaries are named in the chapter's text)."""
    def family(text: str) -> str:  # "token: gate" -> "tokens only"
        return FAMILY_TITLES.get(text.split(": ", 1)[0], text)

    return D.table(comparisons, {
        "comparison": lambda t: [f"{family(a)} − {family(b)}" for a, b in zip(t["first"], t["second"])],
        "FLOPs target (%)": lambda t: t.target.map(D.percent),
        "FLOPs saved (%), each": lambda t: [f"{D.percent(a)} / {D.percent(b)}" for a, b in
                                            zip(t.first_flops_reduction, t.second_flops_reduction)],
        "top-1 (%), each": lambda t: [f"{D.percent(a)} / {D.percent(b)}" for a, b in zip(t.first_top1, t.second_top1)],
        "difference (points), paired 95 % CI": lambda t: [_points(d, lo, hi) for d, lo, hi in
                                                          zip(t.difference, t.lo, t.hi)],
    }, max_chars=40)


def declared(sweep: pd.DataFrame, primary_head_method: str, joint_head_share: float) -> pd.DataFrame:
    """The sweep without the secondary joint variants: a joint row stays only with the declared head
    ranking and head share (the variants have `joint_variants_table`)."""
    joint = sweep["family"] == "joint"
    own = (sweep["heads_by"] == primary_head_method) & ((sweep["head_share"] - joint_head_share).abs() < 1e-9)
    return sweep[~joint | own]


def _budget_table(ctx: Context, sweep: pd.DataFrame, predicted: dict[str, dict[str, float]]) -> pd.DataFrame:
    rows = []
    for label, pred in predicted.items():
        for _, r in sweep[(sweep.family == "budget") & (sweep.level == label)].iterrows():
            rows.append({"budget": label, "asked_epsilon": pred["asked"], "calibrated": pred["calibrated"],
                         "ratio": pred["ratio"], "expected_loss_increase": pred["expected"],
                         "selector": r["method"], "images": r["images"], "config": r["config"],
                         "predicted_loss_increase": pred["total"], "predicted_tokens": pred["tokens"],
                         "predicted_heads": pred["heads"], "measured_pseudo_loss_increase": r["pseudo_loss_increase"],
                         "measured_loss_increase": r["loss_increase"], "flops_reduction": r["flops_reduction"],
                         "top1": r["top1"], "top1_lo": r["top1_lo"], "top1_hi": r["top1_hi"],
                         "held": bool(r["pseudo_loss_increase"] <= pred["asked"])})
    return pd.DataFrame(rows)


def load_tables(out: Path) -> dict[str, pd.DataFrame]:
    out = Path(out)
    tables = {name: results.read_table(out / f"{name}.csv")
              for name in ("sweep", "budget", "flops_check", "equal_flops")}
    tables["costs"] = results.read_json(out / "costs.json")
    return tables


# ------------------------------------------------------------------------------------------ display


def _primary_joint(sweep: pd.DataFrame) -> pd.Series:
    """Rows that are not secondary joint variants (their level names a head ranking and share)."""
    return ~((sweep.family == "joint") & sweep.level.astype(str).str.contains(", heads "))


def accuracy_table(sweep: pd.DataFrame, family: str):
    """One family's rows for the page: method, level, FLOPs, top-1 with its 95 % Wilson interval
    (joint: the primary head ranking and share; the variants are `joint_variants_table`)."""

    rows = sweep[sweep.family.isin([family, "dense"]) & _primary_joint(sweep)]
    return D.table(rows, {
        "method": lambda t: [D.label(m) + (" †" if i != "all" else "") for m, i in zip(t.method, t.images)],
        "level": lambda t: ["–" if l == "0" else l for l in t.level],
        "FLOPs saved (%)": lambda t: t.flops_reduction.map(D.percent),
        "top-1 (%), 95 % CI": lambda t: [D.with_interval(a, lo, hi) for a, lo, hi in zip(t.top1, t.top1_lo, t.top1_hi)],
        "unpruned top-1, same images (%)": lambda t: t.dense_top1_same_images.map(D.percent),
        "drop (points), paired 95 % CI": lambda t: [_points(d, lo, hi) for d, lo, hi in
                                                    zip(t.top1_drop, t.top1_drop_lo, t.top1_drop_hi)],
        "Δloss (nats)": lambda t: t.loss_increase.map(lambda v: f"{v:+.3f}"),
        "configuration": "config",
    })


def joint_variants_table(sweep: pd.DataFrame):
    """Joint pruning with the primary token selector and every head ranking and head share: top-1
    (95 % Wilson interval) per FLOPs target, one row per variant."""
    joint = sweep[(sweep.family == "joint") & (sweep.images == "all") & sweep.heads_by.notna()
                  & (sweep.heads_by.astype(str) != "")].copy()
    if joint.empty:
        return D.table(joint, {})
    joint["target"] = joint.level.str.extract(r"FLOPs -([0-9.]+) %", expand=False).astype(float)
    first = joint.sort_values("target").groupby(["method", "heads_by", "head_share"], sort=False)
    rows = [{"tokens": D.label(m), "heads ranked by": D.label(h), "head share (%)": f"{100 * s:g}",
             **{f"top-1 at −{t:g} % FLOPs": D.with_interval(r.top1, r.top1_lo, r.top1_hi)
                for r, t in zip(g.itertuples(), g.target)}} for (m, h, s), g in first]
    frame = pd.DataFrame(rows).sort_values(["tokens", "heads ranked by", "head share (%)"])
    return D.table(frame)


def _points(value: float, lo: float, hi: float) -> str:
    """A difference of two accuracies in percentage points with its interval."""
    return f"{100 * value:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


SUBSET_NOTE = "† on the oracle subset of the images (see the column \"unpruned top-1, same images\")."


def budget_table(budget: pd.DataFrame):
    """Budget schedules: asked ε, the prediction (raw or calibrated), the measured loss increase,
    whether ε held, FLOPs saved and top-1."""

    return D.table(budget, {
        "asked ε (nats)": lambda t: t.asked_epsilon.map(lambda v: f"{v:g}"),
        "prediction": lambda t: [f"calibrated (× {r:.2f})" if c else "raw" for c, r in zip(t.calibrated, t.ratio)],
        "tokens chosen by": lambda t: [D.label(m) + (" †" if i != "all" else "") for m, i in zip(t.selector, t.images)],
        "expected ΔL (nats)": lambda t: t.expected_loss_increase.map(lambda v: f"{v:.3f}"),
        "measured ΔL, pseudo-label (nats)": lambda t: t.measured_pseudo_loss_increase.map(lambda v: f"{v:+.3f}"),
        "ε held": lambda t: t.held.map(lambda v: "yes" if v else "no"),
        "measured ΔL, true label (nats)": lambda t: t.measured_loss_increase.map(lambda v: f"{v:+.3f}"),
        "FLOPs saved (%)": lambda t: t.flops_reduction.map(D.percent),
        "top-1 (%), 95 % CI": lambda t: [D.with_interval(a, lo, hi) for a, lo, hi in zip(t.top1, t.top1_lo, t.top1_hi)],
    })


def head_limit_line(costs: dict[str, Any]) -> str:
    """What a model with few heads per layer can say about head redundancy."""
    heads = "/".join(str(h) for h in costs["heads_per_layer"])
    return (f"This model has {heads} heads per layer and one must stay in every layer, so heads alone can save at "
            f"most {D.percent(costs['max_head_flops_reduction'])} % of the FLOPs; the head-only curve stops there. With "
            "so few heads, removing one takes a large share of a layer's attention at once: these results say "
            "little about the finer head redundancy of models with 12 heads per layer (ViT-B, DeiT-B).")


def oracle_cost_line(costs: dict[str, Any]) -> str:
    """One sentence on what the HEART oracle's rows cost beyond their FLOPs column."""
    return (f"The HEART oracle's rows cost more than their FLOPs column says: scoring an image takes "
            f"{costs['oracle_seconds_per_image']:.2f} s here, {costs['oracle_flops_over_dense_forward']:.1f}× the "
            f"FLOPs of an unpruned forward pass, before the pruned forward runs "
            f"({costs['oracle_images']:,} images scored). The edge chapter times it end to end.")


def costs_markdown(costs: dict[str, Any], flops_check: pd.DataFrame) -> str:
    """The oracle's and the gate's costs and the FLOPs check, in three sentences from the results."""
    layers = ", ".join(f"layer {k}: {v:.2f}" for k, v in costs["gate_spearman_heldout"].items())
    return (f"* HEART oracle: {costs['oracle_seconds_per_image']:.2f} s per image, "
            f"{costs['oracle_flops_over_dense_forward']:.1f}× the FLOPs of an unpruned forward pass\n"
            f"* learned gate: {costs['gate_params']:,} parameters; held-out Spearman with HEART scores per layer: "
            f"{layers}\n"
            f"* FLOPs check: the analytic count differs from `FlopCounterMode` by at most "
            f"{100 * flops_check.relative_error.abs().max():.2g} % over {len(flops_check)} configurations "
            f"(FLOPs here are 2 × multiply-accumulates, the convention of `FlopCounterMode`)")


def pareto_figure(sweep: pd.DataFrame, families: tuple[str, ...] = ("token", "head", "joint", "budget")):
    """Top-1 (95 % Wilson bars) against FLOPs saved: one panel per family on shared axes, one colour and
    marker per method (the same in every panel), the unpruned model as a dashed line."""
    from heart_lib import plots
    import matplotlib.pyplot as plt

    plots.use_style()
    families = [f for f in families if f in set(sweep.family)]
    part = sweep[sweep.family.isin(families)]
    names = [D.label(m) + (" (oracle subset)" if i != "all" else "") for m, i in zip(part.method, part.images)]
    style = plots.styles(sorted(set(names)))
    cols = min(2, len(families))
    rows = -(-len(families) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(plots.COLUMN_WIDTH, 2.9 * rows + 0.9), sharex=True, sharey=True,
                             squeeze=False)
    dense = sweep[sweep.family == "dense"].iloc[0]
    for ax, family in zip(axes.flat, families):
        for (method, images), group in sweep[sweep.family == family].groupby(["method", "images"]):
            group = group.sort_values("flops_reduction")
            name = D.label(method) + (" (oracle subset)" if images != "all" else "")
            ax.errorbar(100 * group.flops_reduction, 100 * group.top1,
                        yerr=[100 * (group.top1 - group.top1_lo), 100 * (group.top1_hi - group.top1)],
                        capsize=2, ms=5, lw=1.2, label=name, **style[name])
        ax.axhline(100 * dense.top1, color="grey", ls="--", lw=1)
        ax.set_title(FAMILY_TITLES.get(family, family))
    for ax in axes.flat[len(families):]:
        ax.remove()
    for ax in axes[-1]:
        ax.set_xlabel("FLOPs saved (%)")
    for ax in axes[:, 0]:
        ax.set_ylabel("top-1 (%)")
    handles = [plt.Line2D([], [], ls="-", **style[n], label=n) for n in style]
    handles.append(plt.Line2D([], [], color="grey", ls="--", label="unpruned"))
    fig.legend(handles=handles, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0), frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.17 / fig.get_figheight() * (-(-len(handles) // 2)), 1, 1))  # 0.17 in per legend row
    return fig


def families_figure(sweep: pd.DataFrame, selector: str, head_method: str):
    """Claim C2 on one axis: top-1 against FLOPs saved for token-only (`selector`), head-only
    (`head_method`) and joint pruning (both, the declared head share), on all images, with 95 %
    Wilson bars; the unpruned model as a dashed line."""
    from heart_lib import plots
    import matplotlib.pyplot as plt

    plots.use_style()
    rows = sweep[(sweep.images == "all") & _primary_joint(sweep)]
    curves = {"tokens only": rows[(rows.family == "token") & (rows.method == selector)],
              "heads only": rows[(rows.family == "head") & (rows.method == head_method)],
              "tokens and heads": rows[(rows.family == "joint") & (rows.method == selector)]}
    style = plots.styles(list(curves))
    fig, ax = plt.subplots(figsize=(0.75 * plots.COLUMN_WIDTH, 3.6))
    for name, group in curves.items():
        group = group.sort_values("flops_reduction")
        ax.errorbar(100 * group.flops_reduction, 100 * group.top1,
                    yerr=[100 * (group.top1 - group.top1_lo), 100 * (group.top1_hi - group.top1)],
                    capsize=2, ms=5, lw=1.2, label=name, **style[name])
    ax.axhline(100 * sweep[sweep.family == "dense"].iloc[0].top1, color="grey", ls="--", lw=1, label="unpruned")
    ax.set(xlabel="FLOPs saved (%)", ylabel="top-1 (%)")
    ax.set_title(f"tokens: {D.label(selector)}; heads: {D.label(head_method)}", fontsize=8)
    ax.legend(fontsize=7)
    return fig


def budget_figure(budget: pd.DataFrame):
    """Measured pseudo-label loss increase against the asked budget ε, with the raw prediction
    (dashed) and the calibrated one (solid): a schedule that keeps its promise lies on or below the
    diagonal."""
    from heart_lib import plots
    import matplotlib.pyplot as plt

    plots.use_style()
    fig, ax = plt.subplots(figsize=(0.75 * plots.COLUMN_WIDTH, 4))
    names = {k: D.label(s) + (" (oracle subset)" if i != "all" else "") for k, (s, i) in
             ((k, k) for k in dict.fromkeys(zip(budget.selector, budget.images)))}
    style = plots.styles(list(names.values()))
    for (selector, images, calibrated), group in budget.groupby(["selector", "images", "calibrated"]):
        name = names[(selector, images)]
        group = group.sort_values("asked_epsilon")
        ax.plot(group.asked_epsilon, group.measured_pseudo_loss_increase, ls="-" if calibrated else "--",
                mfc=None if calibrated else "white", **style[name],
                label=f"{name}, {'calibrated' if calibrated else 'raw'} prediction")
    top = float(max(budget.asked_epsilon.max(), 1e-3))
    ax.plot([0, top], [0, top], color="grey", ls=":", label="measured = asked ε")
    ax.set(xlabel="asked budget ε (nats)", ylabel="measured ΔL, pseudo-label (nats)")
    ax.legend(fontsize=7)
    return fig
