"""CAMP-HiVe (arXiv 2511.06265): weight pruning by Hessian-vector power iteration and cyclic pair merging.

The method, as one concrete reading (the paper's tables were not obtainable; the first author's
public TF/Keras repository `HelalUddinSimon/research` is the reference reading):

1. power iteration on weight-space Hessian-vector products of the training loss gives the dominant
   eigenpair (λ, v) of the Hessian over the prunable tensors;
2. each weight is scored (the method: |vᵢ|; baselines at equal sparsity: |wᵢ|, random,
   OBD ½·Hᵢᵢ·wᵢ² with a Hutchinson diagonal, |wᵢ·vᵢ|);
3. a percentile split (per tensor, or one global threshold) separates significant from less
   significant weights;
4. each less-significant weight is *merged* into a significant partner chosen cyclically
   (w_partner += ½·wᵢ, wᵢ := 0), or, as the control, simply zeroed;
5. fine-tuning, with the masks enforced after every step (or not, as in the reference code, where
   pruned weights can grow back).

Model-agnostic: the tensors are named parameters of any `nn.Module`; the loss is evaluated with
`torch.func.functional_call`, so the maths in `heart_lib.curvature` sees only a tuple of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from heart_lib import curvature
from heart_lib._compat import non_fused_attention

SCORES = ("eigvec", "magnitude", "random", "obd", "eigvec_weight")
SCORE_LABELS = {"eigvec": "|v| (CAMP-HiVe)", "magnitude": "|w|", "random": "random",
                "obd": "OBD ½·Hᵢᵢ·w²", "eigvec_weight": "|w·v|"}
SPLITS = ("per_tensor", "global")
RULES = ("merge", "zero")
TENSOR_SETS = ("conv_linear", "blocks_linear", "all")

Batch = tuple[torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------ which tensors


def prunable_names(model: nn.Module, tensors: str | Sequence[str] = "conv_linear") -> list[str]:
    """Names of the parameters to prune.

    `tensors`: "conv_linear" (weight matrices/kernels of every Conv and Linear layer), "blocks_linear"
    (Linear weights inside a ViT's `blocks.`: attention and MLP, not the patch embedding or the head),
    "all" (every trainable parameter, biases and norms included, as the reference code does) or an
    explicit list of parameter names.
    """
    params = dict(model.named_parameters())
    if isinstance(tensors, str):
        if tensors not in TENSOR_SETS:
            raise ValueError(f"tensors = {tensors!r}: allowed values are {', '.join(TENSOR_SETS)} or a list of "
                             "parameter names")
        modules = dict(model.named_modules())
        names = []
        for name, p in params.items():
            owner, _, leaf = name.rpartition(".")
            module = modules.get(owner)
            is_weight = leaf == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))
            if tensors == "all" and p.requires_grad:
                names.append(name)
            elif tensors == "conv_linear" and is_weight:
                names.append(name)
            elif tensors == "blocks_linear" and is_weight and isinstance(module, nn.Linear) and name.startswith("blocks."):
                names.append(name)
    else:
        names = list(tensors)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"tensors: unknown parameter name(s) {unknown[:5]}; the model has e.g. "
                             f"{list(params)[:5]}")
    if not names:
        raise ValueError(f"tensors = {tensors!r}: the model {type(model).__name__} has no prunable weights "
                         "under this choice")
    return names


def _check_sparsity(sparsity: float) -> None:
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity = {sparsity!r}: must be in (0, 1) (the fraction of weights removed)")


# ------------------------------------------------------------------ curvature


def loss_of_weights(model: nn.Module, names: Sequence[str], batches: Sequence[Batch]) -> Callable[..., torch.Tensor]:
    """f(*tensors) = mean cross-entropy over the calibration batches with the named parameters
    replaced by `tensors` (the others and the buffers as they are). Eval mode: batch-norm statistics
    are the running ones, so f is a fixed function of the weights."""
    if not batches:
        raise ValueError("calibration batches: need at least one (images, labels) batch")
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in set(names)}
    frozen.update(dict(model.named_buffers()))

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        weights = {**frozen, **dict(zip(names, tensors))}
        losses = [F.cross_entropy(torch.func.functional_call(model, weights, (x,)), y) for x, y in batches]
        return torch.stack(losses).mean()

    return fn


@dataclass
class Curvature:
    eigenvalue: float
    eigenvector: dict[str, torch.Tensor]  # unit norm over all prunable tensors together
    iterations: int
    converged: bool


def dominant_eigenpair(model: nn.Module, names: Sequence[str], batches: Sequence[Batch], *, iters: int = 20,
                       tol: float = 1e-3, seed: int = 0, mode: str = "double_backward") -> Curvature:
    """Top eigenpair (largest |λ|) of the loss Hessian over the named tensors, by power iteration on
    HVPs of the loss averaged over all calibration batches."""
    model.eval()
    primals = tuple(dict(model.named_parameters())[n].detach() for n in names)
    with non_fused_attention(model):  # fused attention has no second derivative
        result = curvature.power_iteration(loss_of_weights(model, names, batches), primals, iters=iters, tol=tol,
                                           seed=seed, mode=mode)
    return Curvature(float(result.eigenvalue), dict(zip(names, result.eigenvector)), result.iterations,
                     result.converged)


def hessian_diagonal(model: nn.Module, names: Sequence[str], batches: Sequence[Batch], *, probes: int = 8,
                     seed: int = 0, mode: str = "double_backward") -> dict[str, torch.Tensor]:
    """Hutchinson estimate of diag(H) over the named tensors (for the OBD baseline)."""
    model.eval()
    primals = tuple(dict(model.named_parameters())[n].detach() for n in names)
    with non_fused_attention(model):
        diag, _, _ = curvature.hutchinson_diagonal(loss_of_weights(model, names, batches), primals, probes=probes,
                                                   seed=seed, mode=mode)
    return dict(zip(names, diag))


def concentration(vector: Iterable[torch.Tensor], shares: Sequence[float] = (0.5, 0.9)) -> dict[str, float]:
    """How concentrated a vector is: the smallest fraction of coordinates holding each share of ‖v‖²,
    and the participation ratio (Σv²)²/Σv⁴ as a fraction of all coordinates (1 = flat, 1/n = one)."""
    flat = torch.cat([v.flatten() for v in vector]).double()
    energy = (flat ** 2).sort(descending=True).values
    cumulative = energy.cumsum(0) / energy.sum()
    n = len(flat)
    out = {f"fraction_for_{int(100 * s)}pct": float((torch.searchsorted(cumulative, torch.tensor(s, dtype=torch.float64))
                                                      + 1) / n) for s in shares}
    out["participation"] = float(energy.sum() ** 2 / (energy ** 2).sum() / n)
    return out


# ------------------------------------------------------------------ scores and split


def scores(kind: str, weights: dict[str, torch.Tensor], *, eigenvector: dict[str, torch.Tensor] | None = None,
           diagonal: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Importance of each weight (higher = keep). `eigenvector` is needed by eigvec/eigvec_weight,
    `diagonal` (diag H) by obd."""
    if kind not in SCORES:
        raise ValueError(f"score = {kind!r}: allowed values are {', '.join(SCORES)}")
    if kind in ("eigvec", "eigvec_weight") and eigenvector is None:
        raise ValueError(f"score {kind!r} needs the dominant eigenvector")
    if kind == "obd" and diagonal is None:
        raise ValueError("score 'obd' needs the Hessian diagonal")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in weights.items():
        w = w.detach()
        if kind == "eigvec":
            out[name] = eigenvector[name].abs()
        elif kind == "magnitude":
            out[name] = w.abs()
        elif kind == "random":
            out[name] = torch.rand(w.shape, generator=generator)
        elif kind == "obd":
            out[name] = 0.5 * diagonal[name] * w ** 2
        else:
            out[name] = (w * eigenvector[name]).abs()
    return out


def _lowest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the `count` smallest entries (ties broken by position: stable and exact)."""
    order = torch.sort(values.flatten(), stable=True).indices
    pruned = torch.zeros(values.numel(), dtype=torch.bool)
    pruned[order[:count]] = True
    return pruned.view(values.shape)


def keep_masks(score: dict[str, torch.Tensor], sparsity: float, split: str = "per_tensor") -> dict[str, torch.Tensor]:
    """True = significant (kept). Exactly round(sparsity·n) weights are pruned, per tensor or over
    all tensors together (one global threshold)."""
    _check_sparsity(sparsity)
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}: allowed values are {', '.join(SPLITS)}")
    if split == "per_tensor":
        return {n: ~_lowest(s, round(sparsity * s.numel())) for n, s in score.items()}
    flat = torch.cat([s.flatten().double() for s in score.values()])
    pruned = _lowest(flat, round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, s in score.items():
        masks[name] = ~pruned[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return masks


# ------------------------------------------------------------------ merging


def cyclic_partners(keep: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned flat indices, their partners). The significant weights, ordered by increasing score,
    are dealt out in turn: the pruned weight at flat index i gets significant[i mod m] (the
    reference code's rule), so partners are spread over all significant weights."""
    keep_flat, score_flat = keep.flatten(), score.flatten()
    significant = torch.nonzero(keep_flat).flatten()
    significant = significant[torch.sort(score_flat[significant], stable=True).indices]
    pruned = torch.nonzero(~keep_flat).flatten()
    if len(significant) == 0:
        raise ValueError("cannot merge: every weight of the tensor is pruned (no significant partner)")
    return pruned, significant[pruned % len(significant)]


def merge_into_partners(weight: torch.Tensor, keep: torch.Tensor, score: torch.Tensor, factor: float = 0.5
                        ) -> torch.Tensor:
    """A new tensor: each pruned weight adds `factor` of its value to its cyclic partner, then is zeroed."""
    pruned, partners = cyclic_partners(keep, score)
    flat = weight.detach().flatten().clone()
    flat.index_add_(0, partners, factor * flat[pruned])
    flat[pruned] = 0
    return flat.view(weight.shape)


@torch.no_grad()
def prune(model: nn.Module, masks: dict[str, torch.Tensor], rule: str = "merge",
          score: dict[str, torch.Tensor] | None = None, factor: float = 0.5) -> None:
    """Apply the masks in place: zero the pruned weights, merging them into partners first with `rule='merge'`."""
    if rule not in RULES:
        raise ValueError(f"rule = {rule!r}: allowed values are {', '.join(RULES)}")
    if rule == "merge" and score is None:
        raise ValueError("rule 'merge' needs the scores (partners are chosen by score)")
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        p = params[name]
        new = merge_into_partners(p, keep, score[name], factor) if rule == "merge" else p * keep
        p.copy_(new)


def mask_enforcer(model: nn.Module, masks: dict[str, torch.Tensor]) -> Callable[[], None]:
    """A function that re-zeroes the pruned weights; call it after every optimiser step (momentum
    and weight decay would otherwise move them away from zero)."""
    params = dict(model.named_parameters())
    pairs = [(params[n], m.to(params[n].dtype)) for n, m in masks.items()]

    @torch.no_grad()
    def enforce() -> None:
        for p, m in pairs:
            p.mul_(m)

    return enforce


def sparsity(model: nn.Module, names: Sequence[str]) -> float:
    """Fraction of exact zeros over the named tensors."""
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    return zeros / sum(params[n].numel() for n in names)


# ------------------------------------------------------------------ FLOPs


@torch.no_grad()
def dense_and_sparse_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates per image of every Conv/Linear layer as run densely, and the same count
    with each layer's zero weights skipped ("if sparse kernels were used"; no dense kernel does)."""
    totals = [0, 0]

    def hook(module, _inputs, output):
        # Each weight is used once per output position (conv) or token (linear).
        uses = output.numel() // output.shape[0] // module.weight.shape[0]
        totals[0] += module.weight.numel() * uses
        totals[1] += int((module.weight != 0).sum()) * uses

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
    return totals[0], totals[1]
