"""Curvature primitives, model-agnostic: Hessian-vector products, Hutchinson diagonal, power iteration.

Everything here works on a scalar function `fn(*primals) -> Tensor[]` of a tuple of tensors and
knows nothing about ViTs. Two ways to get a Hessian-vector product `H v`:

- double backward (Pearlmutter): `g = ∂f/∂x` with a graph, then `∂(g·v)/∂x`. The forward and
  the first backward are shared by any number of probes (`HessianOperator`).
- forward-over-reverse: `jvp(grad(f))` with `torch.func`; one forward-mode pass per probe, no
  retained double graph.
- finite differences of the gradient (an approximation, not an exact HVP):
  `(∇f(x + h v) − ∇f(x − h v)) / 2h`, two ordinary gradient passes per probe and nothing
  retained; error O(h²) from truncation plus O(eps/h) from rounding, so the default step is
  eps^(1/3) of the dtype (about 5e-3 in fp32, 6e-6 in fp64) divided by max|v|. The gradient
  returned with it is the central average (also O(h²)), so a single probe costs two gradient
  passes in all.

`batch_dim=True` declares that the leading dimension of every primal indexes independent samples
(f is a sum of per-sample terms, each depending only on its own slice). Then the Hessian is
block-diagonal across samples, so one probe gives every sample's own quantity at once: the exact
diagonal needs (coordinates per sample) HVPs instead of (all coordinates), and power iteration
runs one independent iteration per sample.

Callers that differentiate through timm attention must run it on the explicit path
(`heart_lib._compat.non_fused_attention`); `heart_lib.sensitivity` does that itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Tensors = tuple[torch.Tensor, ...]
ScalarFn = Callable[..., torch.Tensor]
MODES = ("double_backward", "forward_over_reverse", "finite_difference")

__all__ = [
    "MODES", "HessianOperator", "make_operator", "hvp", "hvp_double_backward", "hvp_forward_over_reverse", "rademacher_like",
    "hutchinson_diagonal", "exact_diagonal", "power_iteration", "PowerResult", "dot",
]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode = {mode!r}: allowed values are {', '.join(MODES)}")


def _as_tuple(values: torch.Tensor | Sequence[torch.Tensor]) -> Tensors:
    return (values,) if isinstance(values, torch.Tensor) else tuple(values)


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], batch_dim: bool = False) -> torch.Tensor:
    """Σ a·b over all tensors; with `batch_dim`, one value per sample (leading dimension kept)."""
    if batch_dim:
        return sum((x * y).flatten(1).sum(1) for x, y in zip(a, b))
    return sum((x * y).sum() for x, y in zip(a, b))


class HessianOperator:
    """`H v` by double backward, sharing one forward and one first backward across probes.

    value: f at the primals; grad: ∂f/∂x (detached); `op(tangents)` -> H·tangents (detached).
    The graph is held until `release()` (or garbage collection).
    """

    def __init__(self, fn: ScalarFn, primals: torch.Tensor | Sequence[torch.Tensor], *, aux: bool = False):
        self.primals = tuple(p.detach().requires_grad_(True) for p in _as_tuple(primals))
        out = fn(*self.primals)
        self.aux = None
        if aux:
            out, self.aux = out
        if out.dim() != 0:
            raise ValueError(f"fn must return a scalar, got shape {tuple(out.shape)}")
        self.value = out.detach()
        self._grads = torch.autograd.grad(out, self.primals, create_graph=True, allow_unused=True,
                                          materialize_grads=True)
        self.grad = tuple(g.detach() for g in self._grads)

    def __call__(self, tangents: torch.Tensor | Sequence[torch.Tensor]) -> Tensors:
        tangents = _as_tuple(tangents)
        if self._grads is None:
            raise RuntimeError("HessianOperator was released")
        inner = dot(self._grads, tangents)
        if not inner.requires_grad:  # f is linear in the primals: H = 0
            return tuple(torch.zeros_like(p) for p in self.primals)
        return torch.autograd.grad(inner, self.primals, retain_graph=True, allow_unused=True,
                                   materialize_grads=True)

    def batched(self, tangents: Sequence[torch.Tensor]) -> Tensors:
        """H applied to K stacked probes at once (each tangent has a leading K axis); vmapped backward."""
        tangents = _as_tuple(tangents)
        k = tangents[0].shape[0]
        grads = tuple(g.unsqueeze(0).expand(k, *g.shape) for g in self._grads)
        # Σ_i g_i·v_i per probe, then backward of each of the K scalars in one vmapped pass.
        inner = torch.stack([dot([g[j] for g in grads], [t[j] for t in tangents]) for j in range(k)])
        eye = torch.eye(k, dtype=inner.dtype, device=inner.device)
        return torch.autograd.grad(inner, self.primals, grad_outputs=eye, retain_graph=True,
                                   is_grads_batched=True, allow_unused=True, materialize_grads=True)

    def release(self) -> None:
        self._grads = None


def hvp_double_backward(fn: ScalarFn, primals: torch.Tensor | Sequence[torch.Tensor],
                        tangents: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, Tensors, Tensors]:
    """(f, ∂f/∂x, H v) by double backward."""
    op = HessianOperator(fn, primals)
    out = op(tangents)
    op.release()
    return op.value, op.grad, tuple(o.detach() for o in out)


def hvp_forward_over_reverse(fn: ScalarFn, primals: torch.Tensor | Sequence[torch.Tensor],
                             tangents: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, Tensors, Tensors]:
    """(f, ∂f/∂x, H v) by forward-mode differentiation of the reverse-mode gradient (torch.func)."""
    primals = tuple(p.detach() for p in _as_tuple(primals))
    tangents = tuple(t.detach().to(p.dtype) for p, t in zip(primals, _as_tuple(tangents)))

    def grad_and_value(*xs):
        grads, value = torch.func.grad_and_value(fn, argnums=tuple(range(len(xs))))(*xs)
        return grads, value

    (grads, value), (hv, _) = torch.func.jvp(grad_and_value, primals, tangents)
    return value.detach(), tuple(g.detach() for g in grads), tuple(h.detach() for h in hv)


def hvp(fn: ScalarFn, primals: torch.Tensor | Sequence[torch.Tensor],
        tangents: torch.Tensor | Sequence[torch.Tensor], *, mode: str = "double_backward"
        ) -> tuple[torch.Tensor, Tensors, Tensors]:
    """(f, ∂f/∂x, H v) at `primals` along `tangents`; mode 'double_backward', 'forward_over_reverse'
    or 'finite_difference' (approximate, see the module docstring)."""
    _check_mode(mode)
    if mode == "double_backward":
        return hvp_double_backward(fn, primals, tangents)
    if mode == "finite_difference":
        op = _FiniteDifference(fn, _as_tuple(primals))
        hv = op(tangents)
        return op.value, op.grad, hv
    return hvp_forward_over_reverse(fn, primals, tangents)


def rademacher_like(tensors: Sequence[torch.Tensor], generator: torch.Generator) -> Tensors:
    """Independent ±1 entries shaped like each tensor (drawn on the CPU, so a seed means the same probes everywhere)."""
    return tuple((torch.randint(0, 2, t.shape, generator=generator) * 2 - 1).to(t.dtype).to(t.device)
                 for t in tensors)


class _ForwardOverReverse:
    """Same interface as HessianOperator, one jvp-of-grad per probe (nothing shared between probes)."""

    def __init__(self, fn: ScalarFn, primals: Tensors):
        self.fn, self.primals = fn, tuple(p.detach() for p in primals)
        self.value, self.grad = None, None

    def __call__(self, tangents: torch.Tensor | Sequence[torch.Tensor]) -> Tensors:
        value, grad, hv = hvp_forward_over_reverse(self.fn, self.primals, tangents)
        self.value, self.grad = value, grad
        return hv

    def release(self) -> None:
        pass


class _FiniteDifference:
    """H v ≈ (∇f(x + h v) − ∇f(x − h v)) / 2h; value and gradient are the central averages."""

    def __init__(self, fn: ScalarFn, primals: Tensors, step: float | None = None):
        self.fn, self.primals = fn, tuple(p.detach() for p in primals)
        self.step = step if step is not None else float(torch.finfo(self.primals[0].dtype).eps) ** (1 / 3)
        self.value, self.grad = None, None

    def _grad(self, xs: Tensors) -> tuple[torch.Tensor, Tensors]:
        xs = tuple(x.requires_grad_(True) for x in xs)
        value = self.fn(*xs)
        grads = torch.autograd.grad(value, xs, allow_unused=True, materialize_grads=True)
        return value.detach(), tuple(g.detach() for g in grads)

    def __call__(self, tangents: torch.Tensor | Sequence[torch.Tensor]) -> Tensors:
        tangents = tuple(t.detach().to(p.dtype) for p, t in zip(self.primals, _as_tuple(tangents)))
        scale = max(float(t.abs().max()) for t in tangents)
        if scale == 0:
            return tuple(torch.zeros_like(p) for p in self.primals)
        h = self.step / scale
        plus_v, plus_g = self._grad(tuple(p + h * t for p, t in zip(self.primals, tangents)))
        minus_v, minus_g = self._grad(tuple(p - h * t for p, t in zip(self.primals, tangents)))
        if self.value is None:
            self.value = (plus_v + minus_v) / 2
            self.grad = tuple((a + b) / 2 for a, b in zip(plus_g, minus_g))
        return tuple((a - b) / (2 * h) for a, b in zip(plus_g, minus_g))

    def release(self) -> None:
        pass


def make_operator(fn: ScalarFn, primals: torch.Tensor | Sequence[torch.Tensor], mode: str = "double_backward",
                  step: float | None = None):
    """An object `op` with `op(v) -> H v`, `op.value`, `op.grad` (set after the first call for
    forward-over-reverse and finite differences) and `op.release()`. `step`: finite-difference step."""
    _check_mode(mode)
    primals = _as_tuple(primals)
    if mode == "double_backward":
        return HessianOperator(fn, primals)
    if mode == "finite_difference":
        return _FiniteDifference(fn, primals, step)
    return _ForwardOverReverse(fn, primals)


def hutchinson_diagonal(fn: ScalarFn, primals: torch.Tensor | Sequence[torch.Tensor], *, probes: int = 8,
                        seed: int = 0, mode: str = "double_backward", return_probes: bool = False,
                        draw: Callable[[int], Tensors] | None = None):
    """Unbiased estimate of diag(H): mean over `probes` Rademacher vectors s of s ⊙ (H s).

    `draw(k)` may supply the k-th probe (e.g. drawn per image, so that an image's estimate does not
    depend on its batch-mates); by default probes come from one generator seeded with `seed`.
    Returns (diag, value, grad); with `return_probes` also the per-probe estimates stacked on a
    leading axis (to study how the error falls with K).
    """
    _check_mode(mode)
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"probes = {probes!r}: must be a positive integer")
    primals = _as_tuple(primals)
    if draw is None:
        generator = torch.Generator().manual_seed(seed)
        draw = lambda _k: rademacher_like(primals, generator)  # noqa: E731
    op = make_operator(fn, primals, mode)
    per_probe = []
    for k in range(probes):
        s = draw(k)
        per_probe.append(tuple(si * hi.detach() for si, hi in zip(s, op(s))))
    op.release()
    value, grad = op.value, op.grad
    stacked = tuple(torch.stack([p[i] for p in per_probe]) for i in range(len(primals)))
    diag = tuple(s.mean(0) for s in stacked)
    return (diag, value, grad, stacked) if return_probes else (diag, value, grad)


def exact_diagonal(fn: ScalarFn, primals: torch.Tensor | Sequence[torch.Tensor], *, batch_dim: bool = False,
                   mode: str = "double_backward", coordinates: Sequence[Sequence[int] | None] | None = None
                   ) -> tuple[Tensors, torch.Tensor, Tensors]:
    """diag(H) exactly, one HVP per coordinate (per coordinate of one sample with `batch_dim`).

    `coordinates` optionally lists, per primal, the flat indices (within a sample with `batch_dim`)
    to compute; the others are NaN. Returns (diag, value, grad). Meant for small problems and for
    verifying estimators.
    """
    _check_mode(mode)
    primals = _as_tuple(primals)
    if coordinates is not None and len(coordinates) != len(primals):
        raise ValueError(f"coordinates has {len(coordinates)} entries for {len(primals)} primals")
    op = make_operator(fn, primals, mode)
    diag = [torch.zeros_like(p) for p in primals]
    for i, p in enumerate(primals):
        inner_shape = p.shape[1:] if batch_dim else p.shape
        size = max(1, int(torch.Size(inner_shape).numel()))
        todo = range(size) if coordinates is None or coordinates[i] is None else coordinates[i]
        if coordinates is not None and coordinates[i] is not None:
            diag[i].fill_(float("nan"))
        for flat in todo:
            if not 0 <= int(flat) < size:
                raise ValueError(f"coordinate {flat} out of range for primal {i} with {size} entries")
            tangents = [torch.zeros_like(q) for q in primals]
            index = torch.unravel_index(torch.tensor(int(flat)), inner_shape) if inner_shape else ()
            index = tuple(int(j) for j in index)
            if batch_dim:
                tangents[i][(slice(None),) + index] = 1
                diag[i][(slice(None),) + index] = op(tangents)[i][(slice(None),) + index].detach()
            else:
                tangents[i][index] = 1
                diag[i][index] = op(tangents)[i][index].detach()
    op.release()
    value, grad = op.value, op.grad
    return tuple(diag), value, grad


@dataclass
class PowerResult:
    eigenvalue: torch.Tensor  # [] or [B] with batch_dim
    eigenvector: Tensors  # unit norm (per sample with batch_dim)
    iterations: int
    converged: bool


def power_iteration(fn: ScalarFn, primals: torch.Tensor | Sequence[torch.Tensor], *, iters: int = 50,
                    tol: float = 1e-4, seed: int = 0, batch_dim: bool = False,
                    mode: str = "double_backward") -> PowerResult:
    """Dominant eigenpair (largest |λ|) of H by power iteration with Rayleigh-quotient stopping.

    random v → normalise → H v → λ = vᵀHv → stop when λ changes by < tol·|λ|. With `batch_dim`
    every sample's block is normalised separately, so each sample gets its own eigenpair from the
    same HVPs. The stopping test syncs with the host once per iteration.
    """
    _check_mode(mode)
    if iters < 1:
        raise ValueError(f"iters = {iters}: must be a positive integer")
    primals = _as_tuple(primals)
    generator = torch.Generator().manual_seed(seed)
    op = make_operator(fn, primals, mode)

    def normalise(vs: Tensors) -> Tensors:
        norm = dot(vs, vs, batch_dim).sqrt().clamp_min(torch.finfo(vs[0].dtype).tiny)
        if batch_dim:
            return tuple(v / norm.view(-1, *([1] * (v.dim() - 1))) for v in vs)
        return tuple(v / norm for v in vs)

    v = normalise(tuple(torch.randn(p.shape, generator=generator).to(p) for p in primals))
    eigenvalue = None
    converged = False
    step = 0
    for step in range(1, iters + 1):
        hv = tuple(h.detach() for h in op(v))
        new = dot(v, hv, batch_dim)
        v = normalise(hv)
        if eigenvalue is not None and bool(((new - eigenvalue).abs() <= tol * new.abs()).all()):
            eigenvalue, converged = new, True
            break
        eigenvalue = new
    op.release()
    return PowerResult(eigenvalue.detach(), tuple(x.detach() for x in v), step, converged)
