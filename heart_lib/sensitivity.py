"""Sensitivity scores of tokens and heads (book/method.md, 'Components, gates and the sensitivity score') and their leave-one-out ground truth.

Every derivative-based score is read off multiplicative gates `m` (all ones) placed on timm's own
modules (`heart_lib.gates`): with `L(m) = Σ_b ℓ_b(m)`,

    ∂L/∂m_c   = g_cᵀ z_c                (first-order Taylor term)
    ∂²L/∂m_c² = z_cᵀ H_cc z_c           (the HEART curvature S_c)

The loss is the *sum* over images, and images do not interact in eval mode, so the gate Hessian is
block-diagonal across images and one HVP gives every image its own scores.

Methods (higher score = more important = keep):

| method | score |
|---|---|
| heart | single probe: `(H_m 1)_c` with the all-ones probe per gate group (`scope="layer"`, book/method.md, 'Components, gates and the sensitivity score') or over all groups at once (`scope="global"`, one HVP); includes cross-component terms |
| heart_hutchinson | Hutchinson over components, K Rademacher probes: unbiased `H_cc` |
| heart_exact | one HVP per component (batched over images): exact `H_cc` |
| second_order | `-g_c + ½ H_cc` (predicted loss change of removing c); `H_cc` from `curvature=` |
| taylor | `|g_c|` |
| fisher | `g_c²` (per image; averaging over images gives the empirical Fisher) |
| cls_attention | tokens: attention of the class token to the token in the gated block, mean over heads (mean over all queries when the model has no class token); heads: negative entropy of the class token's attention row |
| norm | `‖z_c‖` (token embedding at the block input; head output over all tokens) |
| random | uniform, from `seed` |

Losses: "true" (cross-entropy to `labels`), "pseudo" (cross-entropy to the unpruned prediction),
"kl" (KL(unpruned ‖ gated)); the KL's gradient at m = 1 is exactly zero and its Hessian is PSD.

Curvature is computed in fp32 even for fp16/bf16 models (the model is upcast in place for the
call and restored exactly afterwards); fp64 models stay fp64. Attention runs on timm's explicit
path during the call (`heart_lib._compat.non_fused_attention`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from heart_lib import catalogue, checks, curvature
from heart_lib._compat import non_fused_attention
from heart_lib.catalogue import VARIANTS, Recording, apply_variant
from heart_lib.gates import BlockRunner, GateSet, attach_gates, check_layers, num_prefix_tokens, vit_info

__all__ = [
    "METHODS", "LOSSES", "SCOPES", "CURVATURES", "VARIANTS", "num_prefix_tokens", "per_image_loss",
    "score_tokens", "score_heads", "score_components", "Scores", "gate_derivatives", "GateDerivatives",
    "leave_one_out_tokens", "leave_one_out_heads", "REMOVALS", "apply_variant", "NonFiniteLossError", "gate_eigenpair",
]

METHODS = tuple(catalogue.SCORES)  # every score of the catalogue (a registered one included at import)
LOSSES = ("true", "pseudo", "kl")
SCOPES = ("layer", "global")
CURVATURES = ("single", "hutchinson", "exact")
REMOVALS = ("zero", "drop")  # leave-one-out truths: zero the token's residual row, or drop it from the sequence


class NonFiniteLossError(ValueError):
    """The loss is NaN/inf for some images; `.images` lists their batch indices."""

    def __init__(self, images: list[int], values: list[float]):
        self.images = images
        shown = ", ".join(f"{i} ({v})" for i, v in list(zip(images, values))[:20])
        super().__init__(f"non-finite loss for {len(images)} image(s) at batch indices: {shown}"
                         f"{' ...' if len(images) > 20 else ''}; check those inputs (NaN/inf pixels?) "
                         "and the model's weights")


# ---------------------------------------------------------------------------------------------
# validation and small pure helpers


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} = {value!r}: allowed values are {', '.join(allowed)}")


def _check_probes(probes: int) -> None:
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes = {probes!r}: must be a positive integer")


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, C, H, W] tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")


def _check_labels(loss: str, labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if loss != "true":
        return None
    if labels is None:
        raise ValueError('loss = "true" needs labels (a [B] tensor of class indices); '
                         'use loss="pseudo" or "kl" when there are none')
    labels = torch.as_tensor(labels)
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape [{batch}] (one class index per image), got {tuple(labels.shape)}")
    return labels.long()


def per_image_loss(logits: torch.Tensor, loss: str, labels: torch.Tensor | None = None,
                   reference: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image loss [B] (float32 or float64). `reference` = unpruned logits (pseudo / kl)."""
    _check_choice("loss", loss, LOSSES)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if loss == "true":
        return F.cross_entropy(logits, labels.to(logits.device), reduction="none")
    if reference is None:
        raise ValueError(f'loss = "{loss}" needs the unpruned reference logits')
    reference = reference.to(logits.dtype)
    if loss == "pseudo":
        return F.cross_entropy(logits, reference.argmax(-1), reduction="none")
    ref_logp = reference.log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logits.log_softmax(-1))).sum(-1)


@contextlib.contextmanager
def _fp32_and_explicit_attention(model: nn.Module) -> Iterator[torch.dtype]:
    """Upcast half/bfloat16 parameters and buffers to fp32 in place, restore them exactly after;
    weights stop requiring grad for the call; attention takes timm's explicit path.

    A bf16/fp16 value is exactly representable in fp32, so the round trip is lossless; no copy of
    the weights is made. Yields the compute dtype.
    """
    low = (torch.float16, torch.bfloat16)
    changed: list[tuple[torch.Tensor, torch.dtype]] = []
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.dtype in low:
            changed.append((tensor, tensor.dtype))
            tensor.data = tensor.data.float()
    # Scores differentiate w.r.t. gates only: weights that require grad would make autograd keep
    # (and, in double backward, differentiate) what their gradients need, for nothing.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = torch.float64 if dtypes == {torch.float64} else torch.float32
    try:
        with non_fused_attention(model):
            yield dtype
    finally:
        for tensor, original in changed:
            tensor.data = tensor.data.to(original)
        for p in trainable:
            p.requires_grad_(True)


def _report_non_finite(per_image: torch.Tensor) -> None:
    bad = (~torch.isfinite(per_image)).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteLossError(bad, [float(per_image[i]) for i in bad])


# ---------------------------------------------------------------------------------------------
# derivatives with respect to the gates


@dataclass
class GateDerivatives:
    """Per-image loss, gate gradient and a gate-curvature estimate for each gate group.

    Groups are keys ("token", layer) -> [B, N] and ("head", layer) -> [B, H].
    """

    loss: torch.Tensor  # [B] at m = 1
    grad: dict[tuple[str, int], torch.Tensor]
    curvature: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    probes: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # Hutchinson: [K, B, ...]
    estimator: str | None = None


def _groups(info, token_layers: tuple[int, ...], head_layers: tuple[int, ...]) -> list[tuple[str, int]]:
    return [("token", l) for l in token_layers] + [("head", l) for l in head_layers]


def _unpruned_reference(runner: BlockRunner, gates: GateSet, loss: str, start: int) -> torch.Tensor | None:
    """The unpruned output the pseudo label / KL target is taken from (None for the true-label loss).

    Computed once, with every gate off, along the same path the loss takes (so at m = 1 it equals the
    loss's own forward bit for bit), and then held fixed: a finite-difference probe moves the gates,
    and a target that moved with them would make the KL vanish at every probe point.
    """
    if loss == "true":
        return None
    gates.clear()
    with torch.no_grad():
        return runner.logits_from(start).detach()


def _loss_fn(runner: BlockRunner, gates: GateSet, groups: list[tuple[str, int]], loss: str,
             labels: torch.Tensor | None, start: int, stash: dict | None, reference: torch.Tensor | None):
    """f(*gate tensors) = Σ_b ℓ_b, running the model from block `start`.

    `reference`: the unpruned output (`_unpruned_reference`) for the pseudo-label and KL losses.
    `stash` (if given) receives the per-image losses (plain autograd only; torch.func transforms
    must not leak tensors).
    """
    def fn(*values: torch.Tensor) -> torch.Tensor:
        for (kind, layer), value in zip(groups, values):
            (gates.token if kind == "token" else gates.head)[layer] = value
        logits = runner.logits_from(start)
        per_image = per_image_loss(logits, loss, labels, reference)
        if stash is not None:
            stash.setdefault("calls", []).append(per_image.detach())
        return per_image.sum()
    return fn


def _per_image_probes(images: torch.Tensor, primals: tuple[torch.Tensor, ...], seed: int):
    """`draw(k)` for Hutchinson: Rademacher signs drawn per image, from a generator seeded by `seed`
    and the image's own pixels, so an image's estimate does not depend on its batch-mates (every
    primal is [B, ...] with images on the first axis)."""
    generators = [torch.Generator().manual_seed(_image_seed(image, seed)) for image in images]

    def draw(_k: int) -> tuple[torch.Tensor, ...]:
        signs = [tuple(torch.randint(0, 2, p.shape[1:], generator=g) for p in primals) for g in generators]
        return tuple((torch.stack([s[j] for s in signs]) * 2 - 1).to(p) for j, p in enumerate(primals))
    return draw


def _image_seed(image: torch.Tensor, seed: int) -> int:
    digest = hashlib.sha256(str(seed).encode() + image.detach().cpu().contiguous().numpy().tobytes())
    return int(digest.hexdigest()[:15], 16)


def gate_derivatives(model: nn.Module, images: torch.Tensor, *, token_layers: Iterable[int] = (),
                     head_layers: Iterable[int] = (), loss: str = "pseudo", labels: torch.Tensor | None = None,
                     curvature_estimator: str | None = "single", probes: int = 8, seed: int = 0,
                     scope: str = "layer", mode: str = "double_backward", keep_probes: bool = False,
                     components: dict[tuple[str, int], list[int]] | None = None) -> GateDerivatives:
    """Gradient and diagonal curvature of the summed loss w.r.t. token/head gates at m = 1.

    curvature_estimator: None (gradient only), "single" (all-ones probe; per group with
    scope="layer", over all groups at once with scope="global"), "hutchinson" (`probes` Rademacher
    probes over all groups jointly), "exact" (one HVP per component and group, batched over images).
    mode: "double_backward", "forward_over_reverse" or "finite_difference" (approximate: two
    gradient passes per probe instead of a double backward; see heart_lib.curvature).
    components: with "exact", optionally only these indices per group key (others NaN).
    """
    _check_images(images)
    _check_choice("loss", loss, LOSSES)
    _check_choice("scope", scope, SCOPES)
    _check_choice("mode", mode, curvature.MODES)
    if curvature_estimator is not None:
        _check_choice("curvature_estimator", curvature_estimator, CURVATURES)
    _check_probes(probes)
    info = vit_info(model)
    token_layers = tuple(token_layers)
    head_layers = tuple(head_layers)
    tl = check_layers(token_layers, info.depth, "layers") if token_layers else ()
    hl = check_layers(head_layers, info.depth, "head_layers") if head_layers else ()
    if not tl and not hl:
        raise ValueError("no gates requested: give token_layers and/or head_layers")
    labels = _check_labels(loss, labels, images.shape[0])
    with _fp32_and_explicit_attention(model) as dtype, \
            contextlib.ExitStack() as stack:
        images = images.to(dtype)
        groups = _groups(info, tl, hl)
        # One operator per group when groups are treated separately (each starts at its own block),
        # else one operator over all groups from the first gated block.
        if curvature_estimator in ("single", "exact") and scope == "layer" or curvature_estimator == "exact":
            plans = [[g] for g in groups]
        else:
            plans = [groups]
        starts = [min(layer for _, layer in plan) for plan in plans]
        gates = attach_gates(model, token_layers=tl, head_layers=hl)
        stack.callback(gates.detach)
        # Record block inputs only when some plan can start past block 0 (costs one forward).
        runner = BlockRunner(model, images, record=any(starts))
        if runner.logits is not None:
            _report_non_finite(per_image_loss(runner.logits, loss, labels, runner.logits))
        batch = images.shape[0]
        tokens = runner.num_tokens if runner.inputs else _token_count(model, images)

        def ones(group):
            width = tokens if group[0] == "token" else info.num_heads[group[1]]
            return torch.ones(batch, width, dtype=dtype, device=images.device)

        stash: dict[str, torch.Tensor] = {}
        out = GateDerivatives(loss=torch.empty(0), grad={}, estimator=curvature_estimator)
        for plan, start in zip(plans, starts):
            fn = _loss_fn(runner, gates, plan, loss, labels, start,
                          None if mode == "forward_over_reverse" and curvature_estimator is not None else stash,
                          _unpruned_reference(runner, gates, loss, start))
            primals = tuple(ones(g) for g in plan)
            gates.clear()
            if curvature_estimator is None:
                xs = tuple(p.requires_grad_(True) for p in primals)
                value = fn(*xs)
                grads = torch.autograd.grad(value, xs)
                out.grad.update({g: gr.detach() for g, gr in zip(plan, grads)})
                continue
            if curvature_estimator == "single":
                op = curvature.make_operator(fn, primals, mode)
                hv = op(tuple(torch.ones_like(p) for p in primals))
                op.release()
                out.grad.update({g: gr for g, gr in zip(plan, op.grad)})
                out.curvature.update({g: h.detach() for g, h in zip(plan, hv)})
            elif curvature_estimator == "hutchinson":
                diag, _, grad, stacked = curvature.hutchinson_diagonal(
                    fn, primals, probes=probes, mode=mode, return_probes=True,
                    draw=_per_image_probes(images, primals, seed))
                out.grad.update(dict(zip(plan, grad)))
                out.curvature.update(dict(zip(plan, diag)))
                if keep_probes:
                    out.probes.update(dict(zip(plan, stacked)))
            else:
                coords = None if components is None else [components.get(g) for g in plan]
                diag, _, grad = curvature.exact_diagonal(fn, primals, batch_dim=True, mode=mode, coordinates=coords)
                out.grad.update(dict(zip(plan, grad)))
                out.curvature.update(dict(zip(plan, diag)))
            if stash.get("calls"):
                # m = 1 exactly, except finite differences: the mean of its ±h evaluations (O(h²)).
                calls = stash["calls"]
                first = (calls[0] + calls[1]) / 2 if mode == "finite_difference" and curvature_estimator \
                    and len(calls) > 1 else calls[0]
                stash.setdefault("loss", first)
                _report_non_finite(first)
                stash["calls"] = []
        gates.clear()
        if "loss" in stash:
            out.loss = stash["loss"]
        else:  # forward-over-reverse: the per-image loss needs its own (no-grad) forward
            with torch.no_grad():
                logits = runner.logits if runner.logits is not None else runner.logits_from(0)
            out.loss = per_image_loss(logits, loss, labels, logits)
            _report_non_finite(out.loss)
    for key in list(out.grad):  # a NaN gradient with a finite loss is still worth naming
        finite = torch.isfinite(out.grad[key]).flatten(1).all(1)
        if key in out.curvature:
            curv = out.curvature[key]
            if components is not None and components.get(key) is not None:
                curv = curv[:, list(components[key])]  # the others are NaN on purpose
            finite &= torch.isfinite(curv).flatten(1).all(1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise NonFiniteLossError(bad, [float(out.loss[i]) for i in bad])
    return out


# ---------------------------------------------------------------------------------------------
# heuristic scores (no derivatives)


@torch.no_grad()
def _recordings(model: nn.Module, images: torch.Tensor, token_layers: tuple[int, ...],
                head_layers: tuple[int, ...]) -> GateSet:
    with _fp32_and_explicit_attention(model) as dtype:
        gates = attach_gates(model, token_layers=token_layers, head_layers=head_layers, record=True)
        try:
            model(images.to(dtype))
        finally:
            gates.detach()
    return gates


# ---------------------------------------------------------------------------------------------
# public scoring API


@dataclass
class Scores:
    """tokens: layer -> [B, N] (prefix tokens included; never prune them); heads: [B, L, H] or None."""

    tokens: dict[int, torch.Tensor]
    heads: torch.Tensor | None
    num_prefix_tokens: int
    method: str


def score_components(model: nn.Module, images: torch.Tensor, *, layers: Iterable[int] | None = (),
                     heads: bool = True, method: str = "heart", loss: str = "pseudo",
                     labels: torch.Tensor | None = None, probes: int = 8, seed: int = 0, scope: str = "layer",
                     curvature: str = "hutchinson", variant: str = "raw", mode: str = "double_backward"
                     ) -> Scores:
    """Token scores at `layers` and (if `heads`) head scores at every block, from shared passes.

    With method="heart", scope="global" this is a single HVP for everything requested.
    `curvature` selects the H_cc estimate inside method="second_order" ("single", "hutchinson",
    "exact"); `variant` ("raw", "abs", "clamp") transforms the curvature of the heart* methods.
    """
    entry = catalogue.score(method)
    _check_choice("variant", variant, VARIANTS)
    _check_choice("curvature", curvature, CURVATURES)
    _check_images(images)
    info = vit_info(model)
    if layers is not None and not isinstance(layers, int):
        layers = tuple(layers)
    token_layers = check_layers(layers, info.depth, "layers") if layers != () else ()
    head_layers = tuple(range(info.depth)) if heads else ()
    if not token_layers and not head_layers:
        raise ValueError("nothing to score: give layers and/or heads=True")
    batch = images.shape[0]

    if entry.heuristic is not None:
        _check_labels(loss, labels, batch)  # same contract as the derivative methods
        rec = _recordings(model, images, token_layers, head_layers) if entry.recording else None
        if entry.recording == "attention":
            missing = [l for l in set(token_layers) | set(head_layers) if l not in rec.attention]
            if missing:
                raise ValueError(f"{method}: no attention probabilities recorded for blocks {missing} "
                                 "(the model's attention does not expose timm's attn_drop on its explicit path)")
        recording = Recording(tokens=rec.tokens if rec else {}, heads=rec.heads if rec else {},
                              attention=rec.attention if rec else {}, has_class_token=info.has_class_token,
                              generator=torch.Generator().manual_seed(seed), batch=batch,
                              n_tokens=_token_count(model, images) if rec is None else 0,
                              num_heads=dict(enumerate(info.num_heads)))
        tok = {l: entry.heuristic(recording, "tokens", l) for l in token_layers}
        hd = [entry.heuristic(recording, "heads", l) for l in head_layers]
        checks.require_finite_scores(tok, hd, method)
        return Scores(tok, _stack_heads(hd) if heads else None, info.num_prefix_tokens, method)

    estimator = curvature if entry.curvature == "chosen" else entry.curvature
    deriv = gate_derivatives(model, images, token_layers=token_layers, head_layers=head_layers, loss=loss,
                             labels=labels, curvature_estimator=estimator, probes=probes, seed=seed,
                             scope=entry.scope or scope, mode=mode)

    def score(key):
        value = entry.formula(deriv.grad[key], deriv.curvature.get(key))
        return apply_variant(value, variant) if variant in entry.variants else value

    tok = {l: score(("token", l)).detach().cpu() for l in token_layers}
    hd = [score(("head", l)).detach().cpu() for l in head_layers]
    return Scores(tok, _stack_heads(hd) if heads else None, info.num_prefix_tokens, method)


def _token_count(model: nn.Module, images: torch.Tensor) -> int:
    info = vit_info(model)
    patch = getattr(model, "patch_embed", None)
    if patch is not None and hasattr(patch, "num_patches") and getattr(patch, "dynamic_img_size", False) is False:
        return int(patch.num_patches) + info.num_prefix_tokens
    rec = _recordings(model, images[:1], (0,), ())
    return rec.tokens[0].shape[1]


def _stack_heads(per_layer: list[torch.Tensor]) -> torch.Tensor:
    width = max(t.shape[1] for t in per_layer)
    if all(t.shape[1] == width for t in per_layer):
        return torch.stack(per_layer, 1)
    # Blocks with fewer heads (an already head-pruned model): pad with NaN, never a fake score.
    out = torch.full((per_layer[0].shape[0], len(per_layer), width), float("nan"), dtype=per_layer[0].dtype)
    for i, t in enumerate(per_layer):
        out[:, i, : t.shape[1]] = t
    return out


def score_tokens(model: nn.Module, images: torch.Tensor, *, layers: Iterable[int], method: str,
                 loss: str = "pseudo", labels: torch.Tensor | None = None, probes: int = 8, seed: int = 0,
                 **options) -> dict[int, torch.Tensor]:
    """Per-image token scores at the inputs of blocks `layers`: {layer: Tensor[B, N]}.

    N includes the `num_prefix_tokens(model)` leading prefix tokens (class, distillation,
    register): they are scored for completeness but callers must never prune them.
    Higher = more important. Extra options: scope, curvature, variant, mode (see score_components).
    """
    if layers is None:
        raise ValueError("layers must name the blocks whose input tokens are scored (e.g. [3, 6, 9])")
    layers = tuple(layers) if not isinstance(layers, int) else (layers,)
    if not layers:
        raise ValueError("layers is empty: name at least one block index")
    return score_components(model, images, layers=layers, heads=False, method=method, loss=loss, labels=labels,
                            probes=probes, seed=seed, **options).tokens


def score_heads(model: nn.Module, images: torch.Tensor, *, method: str, loss: str = "pseudo",
                labels: torch.Tensor | None = None, probes: int = 8, seed: int = 0, **options) -> torch.Tensor:
    """Per-image head scores for every block: Tensor[B, L, H] (higher = more important).

    Average over images (dim 0) for a static, per-model head ranking. Extra options as score_tokens.
    """
    return score_components(model, images, layers=(), heads=True, method=method, loss=loss, labels=labels,
                            probes=probes, seed=seed, **options).heads


# ---------------------------------------------------------------------------------------------
# leave-one-out ground truth


def _without_token(x: torch.Tensor, token: int) -> torch.Tensor:
    """x [B, n, D] with token `token` dropped from the sequence (what the pruned model's gather does)."""
    keep = [i for i in range(x.shape[1]) if i != token]
    return x[:, keep]


def _loo(model: nn.Module, images: torch.Tensor, kind: str, layers: tuple[int, ...], loss: str,
         labels: torch.Tensor | None, indices: dict[int, list[int]] | None, chunk: int,
         removal: str = "zero") -> dict[int, torch.Tensor]:
    info = vit_info(model)
    batch = images.shape[0]
    with _fp32_and_explicit_attention(model) as dtype, torch.no_grad():
        images = images.to(dtype)
        gates = attach_gates(model, token_layers=layers if kind == "token" else (),
                             head_layers=layers if kind == "head" else ())
        try:
            runner = BlockRunner(model, images)
            if removal == "drop" and not runner.tail_ok:
                raise ValueError("removal = 'drop' needs a model whose forward is its blocks, then norm and "
                                 "head (timm's VisionTransformer); this model's forward does more")
            base = per_image_loss(runner.logits, loss, labels, runner.logits)
            _report_non_finite(base)
            n_tokens = runner.inputs[0].shape[1]
            rep_labels = None
            out = {}
            for layer in layers:
                width = n_tokens if kind == "token" else info.num_heads[layer]
                todo = list(range(width)) if indices is None else list(indices.get(layer, []))
                result = torch.full((batch, width), float("nan"), dtype=dtype)
                if removal == "drop":  # prefix tokens are never dropped: their truth stays NaN
                    todo = [c for c in todo if c >= info.num_prefix_tokens]
                for first in range(0, len(todo), chunk):
                    comps = todo[first:first + chunk]
                    r = len(comps)
                    gates.clear()
                    if removal == "drop":
                        stream = runner.inputs[layer]
                        logits = runner._tail(torch.cat([_without_token(stream, c) for c in comps]), layer)
                    else:
                        gate = torch.ones(r, batch, width, dtype=dtype, device=images.device)
                        for j, c in enumerate(comps):
                            gate[j, :, c] = 0
                        (gates.token if kind == "token" else gates.head)[layer] = gate.flatten(0, 1)
                        logits = runner.logits_from(layer, repeat=r)
                    if loss == "true":
                        rep_labels = labels.repeat(r)
                    changed = per_image_loss(logits, loss, rep_labels, runner.logits.repeat(r, 1))
                    delta = changed.view(r, batch) - base.unsqueeze(0)
                    for j, c in enumerate(comps):
                        result[:, c] = delta[j].cpu()
                out[layer] = result
        finally:
            gates.detach()
    return out


def leave_one_out_tokens(model: nn.Module, images: torch.Tensor, *, layers: Iterable[int], loss: str = "pseudo",
                         labels: torch.Tensor | None = None, tokens: dict[int, list[int]] | None = None,
                         chunk: int = 8, removal: str = "zero") -> dict[int, torch.Tensor]:
    """Actual loss change ΔL per image when one token is removed at a block input: {layer: [B, N]}.

    removal = "zero": gate 0 on that token's residual stream at the input of block `layer` (the
    perturbation δ = −z_c the scores approximate; the zeroed token still attends and is attended
    to). removal = "drop": the token leaves the sequence there, as the pruned model's gather does
    (the ground truth pruning actually faces; prefix tokens are never dropped and stay NaN).
    `tokens` optionally restricts which token indices are evaluated per layer (others are NaN).
    `chunk` components are evaluated per forward by stacking the batch. Loss as in the scores; the
    reference is the unpruned output.
    """
    _check_images(images)
    _check_choice("loss", loss, LOSSES)
    _check_choice("removal", removal, REMOVALS)
    info = vit_info(model)
    layers = check_layers(tuple(layers) if not isinstance(layers, int) else layers, info.depth, "layers")
    labels = _check_labels(loss, labels, images.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk = {chunk}: must be a positive integer")
    return _loo(model, images, "token", layers, loss, labels, tokens, chunk, removal)


def leave_one_out_heads(model: nn.Module, images: torch.Tensor, *, loss: str = "pseudo",
                        labels: torch.Tensor | None = None, chunk: int = 8) -> torch.Tensor:
    """Actual loss change ΔL per image when one head's output is zeroed: Tensor[B, L, H]."""
    _check_images(images)
    _check_choice("loss", loss, LOSSES)
    info = vit_info(model)
    labels = _check_labels(loss, labels, images.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk = {chunk}: must be a positive integer")
    per_layer = _loo(model, images, "head", tuple(range(info.depth)), loss, labels, None, chunk)
    return _stack_heads([per_layer[l] for l in range(info.depth)])


# ---------------------------------------------------------------------------------------------
# dominant curvature direction (CAMP-HiVe-style power iteration, in gate space)


def gate_eigenpair(model: nn.Module, images: torch.Tensor, *, layers: Iterable[int] = (), heads: bool = True,
                   loss: str = "pseudo", labels: torch.Tensor | None = None, iters: int = 30, tol: float = 1e-3,
                   seed: int = 0, mode: str = "double_backward"
                   ) -> tuple[torch.Tensor, dict[tuple[str, int], torch.Tensor], bool]:
    """Per image, the dominant eigenpair (largest |λ|) of the gate Hessian over the requested gates.

    Returns (eigenvalues [B], unit eigenvector per gate group {("token", l): [B, N], ("head", l):
    [B, H]}, converged). One power iteration runs per image from the same HVPs (batch independence).
    """
    _check_images(images)
    _check_choice("loss", loss, LOSSES)
    info = vit_info(model)
    layers = tuple(layers) if not isinstance(layers, int) else (layers,)
    tl = check_layers(layers, info.depth, "layers") if layers else ()
    hl = tuple(range(info.depth)) if heads else ()
    if not tl and not hl:
        raise ValueError("nothing to analyse: give layers and/or heads=True")
    labels = _check_labels(loss, labels, images.shape[0])
    groups = _groups(info, tl, hl)
    with _fp32_and_explicit_attention(model) as dtype:
        images = images.to(dtype)
        gates = attach_gates(model, token_layers=tl, head_layers=hl)
        try:
            start = min(layer for _, layer in groups)
            runner = BlockRunner(model, images, record=start > 0)
            tokens = runner.num_tokens if runner.inputs else _token_count(model, images)
            primals = tuple(torch.ones(images.shape[0], tokens if kind == "token" else info.num_heads[layer],
                                       dtype=dtype, device=images.device) for kind, layer in groups)
            fn = _loss_fn(runner, gates, groups, loss, labels, start, None,
                          _unpruned_reference(runner, gates, loss, start))
            result = curvature.power_iteration(fn, primals, iters=iters, tol=tol, seed=seed, batch_dim=True,
                                               mode=mode)
        finally:
            gates.detach()
    if not bool(torch.isfinite(result.eigenvalue).all()):
        bad = (~torch.isfinite(result.eigenvalue)).nonzero().flatten().tolist()
        raise NonFiniteLossError(bad, [float("nan")] * len(bad))
    return result.eigenvalue, dict(zip(groups, result.eigenvector)), result.converged
