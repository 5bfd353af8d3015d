"""Planning a pruned model from scores and FLOPs targets: which heads go, which keep ratio or merge
rate meets a FLOPs reduction. Pure searches over the analytic FLOPs (`heart_lib.flops`); the loss
budget's schedule is `heart_lib.budget`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from heart_lib.flops import base_shape, count_flops
from heart_lib.pruning.config import PruningConfig

Reduction = Callable[[PruningConfig], float]  # config -> fraction of the dense FLOPs removed


def flops_reduction_on(base: nn.Module | str, gate_hidden: int | None = None) -> Reduction:
    """The FLOPs reduction of a config applied to `base` (a model or a timm model name)."""
    base = base_shape(base)  # once: a model name would be built again for every config
    dense = count_flops(PruningConfig(), base=base)
    return lambda config: 1.0 - count_flops(config, base=base, gate_hidden=gate_hidden) / dense


def match_keep(reduction: Reduction | nn.Module | str, target: float, layers: tuple[int, ...],
               selector: str = "cls_attention", step: float = 0.005, **config_kw: Any) -> PruningConfig:
    """The symmetric keep ratio (on a `step` grid from 1 down) whose FLOPs reduction is nearest
    `target` (the highest keep ratio among equally near ones)."""
    if not 0 <= target < 1:
        raise ValueError(f"target = {target}: a FLOPs reduction must lie in [0, 1)")
    if not callable(reduction) or isinstance(reduction, nn.Module):
        reduction = flops_reduction_on(reduction)
    best = None
    for keep in np.arange(1.0, step / 2, -step):
        config = PruningConfig(layers=tuple(layers), keep=(round(float(keep), 4),), selector=selector, **config_kw)
        gap = abs(reduction(config) - target)
        if best is None or gap < best[0] - 1e-12:
            best = (gap, config)
    return best[1]


def constant_merge_config(r: int, num_patches: int, depth: int, heads=(), selector: str = "tome") -> PruningConfig:
    """ToMe's constant-r schedule (r merges in every block) as per-layer keep ratios."""
    keeps, n = [], num_patches
    for _ in range(depth):
        r_eff = min(r, n // 2)  # ToMe merges at most half the tokens (so never the last one)
        keeps.append((n - r_eff) / n if n > 0 else 1.0)
        n -= r_eff
    return PruningConfig(layers=tuple(range(depth)), keep=tuple(keeps), selector=selector, heads=heads)


def match_constant_merge(reduction: Reduction, target: float, num_patches: int, depth: int,
                         selector: str = "tome") -> PruningConfig:
    """The constant merge rate r whose FLOPs reduction is nearest `target`."""
    options = [constant_merge_config(r, num_patches, depth, selector=selector) for r in range(0, num_patches // 2 + 1)]
    return min(options, key=lambda c: abs(reduction(c) - target))


def _ascending(scores: torch.Tensor) -> list[tuple[float, int, int]]:
    """(score, layer, head) of every scored head, lowest first (NaN = no such head)."""
    return sorted((float(scores[l, h]), l, h) for l in range(scores.shape[0]) for h in range(scores.shape[1])
                  if not math.isnan(float(scores[l, h])))


def lowest_heads(scores: torch.Tensor, count: int) -> dict[int, tuple[int, ...]]:
    """The `count` lowest-scored heads of a [layers, heads] score table, at most heads−1 per layer."""
    layers, heads = scores.shape
    if not 1 <= count <= layers * (heads - 1):
        raise ValueError(f"count = {count}: must be in [1, {layers * (heads - 1)}] for {layers} layers of "
                         f"{heads} heads (at least one head stays in every layer)")
    removed: dict[int, list[int]] = {}
    for _, l, h in _ascending(scores):
        if len(removed.get(l, [])) < heads - 1:
            removed.setdefault(l, []).append(h)
            count -= 1
            if count == 0:
                break
    return {l: tuple(sorted(v)) for l, v in sorted(removed.items())}


def heads_for_target(scores: torch.Tensor, target: float, reduction: Reduction, num_heads: Mapping[int, int],
                     base: PruningConfig | None = None) -> dict[int, tuple[int, ...]]:
    """Remove the lowest-scored heads (at most H−1 per layer) until the FLOPs reduction of `base`
    with them removed is nearest `target`."""
    base = base or PruningConfig()
    removed: dict[int, list[int]] = {}
    best = (abs(reduction(base) - target), {})
    for _, l, h in _ascending(scores):
        if len(removed.get(l, [])) >= num_heads[l] - 1:
            continue
        removed.setdefault(l, []).append(h)
        heads = {k: tuple(v) for k, v in removed.items()}
        gap = abs(reduction(base.replace(heads=heads)) - target)
        if gap < best[0]:
            best = (gap, heads)
        elif reduction(base.replace(heads=heads)) > target:
            break
    return best[1]
