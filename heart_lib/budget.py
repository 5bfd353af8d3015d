"""Loss budget -> pruning schedule: per-layer token keep ratios and a head set (book/method.md, 'From scores to a pruned model').

Predicted loss increase (HEART: gradient term dropped, curvature clamped at 0):
    removing token c at layer l:  ½·max(S_c, 0)  (per image, from HEART scores at l's input)
    removing head h of layer l:   ½·max(S_h, 0)  (mean over calibration images)
and removals add up (cross terms ignored: that is what the measured loss checks).

Tokens at layer l: the wrapper keeps the best-scored survivors, so the tokens a reduction from
n_in to n_out removes are approximated by the ranks [N - n_in, N - n_out) of the layer's ascending
scores; its predicted cost is the mean over images of their summed ½·S.

`schedule_for_budget` is a greedy knapsack: starting from the unpruned model, it repeatedly takes
the move (one layer one step down the ratio grid, or one more head of a layer) with the most FLOPs
saved per unit of predicted loss, while the total predicted loss stays ≤ ε.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from heart_lib.flops import ViTShape, analytic_flops
from heart_lib import catalogue
from heart_lib.pruning.config import PruningConfig, token_plan

DEFAULT_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(15))  # 1.0, 0.95, ..., 0.3


@dataclass(frozen=True)
class Calibration:
    """Predicted-loss tables from calibration images.

    token_cost[l][k]: mean over images of the summed predicted ΔL of the k lowest-scored
    non-prefix tokens at layer l (k = 0..N). head_cost: [L, H] predicted ΔL of removing each head.
    """

    token_cost: dict[int, np.ndarray]
    head_cost: np.ndarray
    num_patches: int
    images: int

    @classmethod
    def from_scores(cls, token_scores: Mapping[int, torch.Tensor], head_scores: torch.Tensor | None,
                    prefix: int, depth: int | None = None, num_heads: int | None = None) -> "Calibration":
        """Build from HEART scores: tokens {l: [B, N]} (prefix included), heads [B, L, H]."""
        cost = {}
        for layer, s in token_scores.items():
            loss = catalogue.predicted_loss(s[:, prefix:].double())
            ordered = loss.sort(dim=1).values.cumsum(dim=1)
            cost[int(layer)] = np.concatenate([[0.0], ordered.mean(dim=0).numpy()])
        if head_scores is None:
            head = np.zeros((depth or 0, num_heads or 0))
        else:
            head = catalogue.predicted_loss(head_scores.double()).nanmean(dim=0).numpy()
        any_scores = next(iter(token_scores.values()), None)
        patches = int(any_scores.shape[1] - prefix) if any_scores is not None else 0
        images = int(any_scores.shape[0]) if any_scores is not None else int(head_scores.shape[0])
        return cls(cost, head, patches, images)

    def token_loss(self, layer: int, n_in: int, n_out: int) -> float:
        """Predicted ΔL of reducing layer `layer`'s non-prefix tokens from n_in to n_out."""
        table = self.token_cost[layer]
        n = len(table) - 1
        return float(table[n - n_out] - table[n - n_in])

    def head_loss(self, heads: Mapping[int, Sequence[int]]) -> float:
        return float(sum(self.head_cost[l, list(h)].sum() for l, h in heads.items()))


def predicted_loss(calibration: Calibration, config: PruningConfig, shape: ViTShape) -> dict[str, float]:
    """Predicted loss increase of `config` (tokens + heads) from calibration tables."""
    plan = token_plan(config, shape.num_patches(), len(shape.blocks), shape.prefix)
    tokens = 0.0
    n_in = shape.num_patches()
    peer = not catalogue.reducer(config.selector).drops
    for layer, (n_attn, n_mlp) in enumerate(plan):
        n_out = (n_mlp if peer else n_attn) - shape.prefix
        if layer in config.keep_map and n_out < n_in:
            if layer not in calibration.token_cost:
                raise ValueError(f"no calibration scores for token layer {layer} (have {sorted(calibration.token_cost)})")
            tokens += calibration.token_loss(layer, n_in, n_out)
        n_in = n_mlp - shape.prefix
    heads = calibration.head_loss(config.head_map)
    return {"tokens": tokens, "heads": heads, "total": tokens + heads}


@dataclass
class Schedule:
    config: PruningConfig
    predicted: dict[str, float]
    flops: int
    dense_flops: int
    steps: list[dict] = field(default_factory=list)

    @property
    def reduction(self) -> float:
        return 1.0 - self.flops / self.dense_flops


def schedule_for_budget(calibration: Calibration, shape: ViTShape, epsilon: float, *, layers: Sequence[int],
                        selector: str = "heart", grid: Sequence[float] = DEFAULT_GRID, heads: bool = True,
                        max_head_fraction: float = 0.75, **config_kw) -> Schedule:
    """Greedy: maximise FLOPs saved subject to predicted ΔL ≤ `epsilon` (see module docstring)."""
    if not epsilon >= 0:
        raise ValueError(f"epsilon = {epsilon}: must be a non-negative number")
    grid = tuple(sorted(set(float(g) for g in grid), reverse=True))
    if not grid or grid[0] != 1.0 or any(not 0 < g <= 1 for g in grid):
        raise ValueError(f"grid = {grid}: ratios must lie in (0, 1] and include 1.0")
    layers = tuple(sorted(int(l) for l in layers))
    missing = [l for l in layers if l not in calibration.token_cost]
    if missing:
        raise ValueError(f"layers {missing} have no calibration token scores (have {sorted(calibration.token_cost)})")
    depth = len(shape.blocks)
    step = {l: 0 for l in layers}
    removed: dict[int, list[int]] = {}
    head_order = {l: list(np.argsort(calibration.head_cost[l], kind="stable")) for l in range(depth)} if heads else {}
    max_heads = {l: min(shape.blocks[l].heads - 1, int(max_head_fraction * shape.blocks[l].heads)) for l in range(depth)}

    def build(step_, removed_):
        return PruningConfig(layers=layers, keep=tuple(grid[step_[l]] for l in layers), selector=selector,
                             heads={l: tuple(int(h) for h in hs) for l, hs in removed_.items() if hs}, **config_kw)

    def cost(config):
        sliced = shape.without_heads(config.head_map)
        return int(analytic_flops(sliced, config)["total"]), predicted_loss(calibration, config, shape)

    current = build(step, removed)
    flops, pred = cost(current)
    dense = flops
    history = []
    while True:
        best = None
        candidates = []
        for l in layers:
            if step[l] + 1 < len(grid):
                candidates.append(({**step, l: step[l] + 1}, removed, f"tokens@{l}->{grid[step[l] + 1]}"))
        for l in head_order:
            taken = removed.get(l, [])
            if len(taken) < max_heads[l]:
                nxt = head_order[l][len(taken)]
                candidates.append((step, {**removed, l: taken + [int(nxt)]}, f"head {l}:{nxt}"))
        for step_c, removed_c, label in candidates:
            config = build(step_c, removed_c)
            f, p = cost(config)
            if p["total"] > epsilon or f >= flops:
                continue
            gain = (flops - f) / max(p["total"] - pred["total"], 1e-12)
            if best is None or gain > best[0]:
                best = (gain, step_c, removed_c, label, f, p)
        if best is None:
            break
        _, step, removed, label, flops, pred = best
        history.append({"move": label, "flops": flops, "predicted": pred["total"]})
    config = build(step, removed)
    return Schedule(config, pred, flops, dense, history)


def fitted_ratio(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """The factor r of measured ≈ r · predicted, least squares through the origin (1 when nothing
    was predicted): how much the removals' cross terms and the clamp make the prediction miss."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    keep = np.isfinite(p) & np.isfinite(m)
    denominator = float((p[keep] ** 2).sum())
    return float((p[keep] * m[keep]).sum() / denominator) if denominator > 0 else 1.0
