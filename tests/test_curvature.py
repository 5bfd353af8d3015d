"""Curvature primitives against closed-form Hessians, and the two HVP modes against each other."""

from __future__ import annotations

import pytest
import timm
import torch

from heart_lib import curvature as C
from heart_lib._compat import non_fused_attention


pytestmark = pytest.mark.usefixtures("one_thread")


def quadratic_problem(seed: int = 0, batch: int = 3, dim: int = 6):
    """f(x) = Σ_b ½ x_bᵀ A_b x_b + Σ sin(x): per-sample Hessian A_b - diag(sin x_b), known exactly."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, dim, dim, generator=g, dtype=torch.float64)
    a = a + a.transpose(1, 2)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)

    def f(x):
        return 0.5 * torch.einsum("bi,bij,bj->", x, a, x) + x.sin().sum()

    hess = a - torch.diag_embed(x.sin())
    return f, x, hess


# Finite differences approximate (O(h²) + O(eps/h) with h = eps^(1/3)); the AD modes are exact.
TOL = {"double_backward": 1e-12, "forward_over_reverse": 1e-12, "finite_difference": 1e-8}


@pytest.mark.parametrize("mode", C.MODES)
def test_unit_hvp_matches_closed_form(mode):
    f, x, hess = quadratic_problem()
    v = torch.randn(x.shape, dtype=torch.float64)
    value, grad, hv = C.hvp(f, x, v, mode=mode)
    assert torch.allclose(hv[0], torch.einsum("bij,bj->bi", hess, v), atol=TOL[mode])
    assert torch.allclose(grad[0], torch.einsum("bij,bj->bi", hess + torch.diag_embed(x.sin()), x) + x.cos(),
                          atol=TOL[mode])
    assert torch.allclose(value, f(x), atol=TOL[mode])
    if mode == "finite_difference":  # not exact: a visibly larger error than the AD modes
        assert (hv[0] - torch.einsum("bij,bj->bi", hess, v)).abs().max() > 1e-14


def test_unit_hessian_operator_reuses_graph_and_batches_probes():
    f, x, hess = quadratic_problem()
    op = C.HessianOperator(f, x)
    vs = torch.randn(4, *x.shape, dtype=torch.float64)
    one_by_one = torch.stack([op(v)[0] for v in vs])
    batched = op.batched([vs])[0]
    expected = torch.einsum("bij,kbj->kbi", hess, vs)
    assert torch.allclose(one_by_one, expected, atol=1e-12)
    assert torch.allclose(batched, expected, atol=1e-12)
    op.release()
    with pytest.raises(RuntimeError, match="released"):
        op(vs[0])


@pytest.mark.parametrize("mode", C.MODES)
def test_unit_exact_diagonal_batched_over_samples(mode):
    f, x, hess = quadratic_problem()
    diag, _, _ = C.exact_diagonal(f, x, batch_dim=True, mode=mode)
    assert torch.allclose(diag[0], torch.diagonal(hess, dim1=1, dim2=2), atol=TOL[mode])
    diag_all, _, _ = C.exact_diagonal(f, x, batch_dim=False, mode=mode)
    assert torch.allclose(diag_all[0], diag[0], atol=TOL[mode])
    some, _, _ = C.exact_diagonal(f, x, batch_dim=True, mode=mode, coordinates=[[1, 4]])
    assert torch.equal(some[0][:, [1, 4]], diag[0][:, [1, 4]]) and torch.isnan(some[0][:, 0]).all()


def test_unit_hutchinson_unbiased_and_error_falls_with_probes():
    f, x, hess = quadratic_problem(dim=12)
    truth = torch.diagonal(hess, dim1=1, dim2=2)
    errors = {}
    for k in (2, 32):
        errs = []
        for seed in range(8):
            diag, _, _ = C.hutchinson_diagonal(f, x, probes=k, seed=seed)
            errs.append((diag[0] - truth).square().mean())
        errors[k] = torch.stack(errs).mean().item()
    # Variance ∝ 1/K: 16x more probes -> ~16x lower mean squared error (allow a wide margin).
    assert errors[32] < errors[2] / 4
    many, _, _, per_probe = C.hutchinson_diagonal(f, x, probes=4000, seed=1, return_probes=True)
    assert per_probe[0].shape == (4000, *x.shape)
    assert torch.allclose(many[0], truth, atol=0.25)
    same, _, _ = C.hutchinson_diagonal(f, x, probes=4, seed=3)
    again, _, _ = C.hutchinson_diagonal(f, x, probes=4, seed=3)
    assert torch.equal(same[0], again[0])  # one seed, one answer
    with pytest.raises(ValueError, match="probes"):
        C.hutchinson_diagonal(f, x, probes=0)


@pytest.mark.parametrize("batch_dim", [False, True])
def test_unit_power_iteration_finds_dominant_eigenpair(batch_dim):
    f, x, hess = quadratic_problem(dim=5)
    result = C.power_iteration(f, x, iters=2000, tol=1e-12, batch_dim=batch_dim, seed=0)
    eigvals = torch.linalg.eigvalsh(hess)
    per_sample = eigvals.gather(1, eigvals.abs().argmax(1, keepdim=True)).squeeze(1)
    if batch_dim:
        assert torch.allclose(result.eigenvalue, per_sample, rtol=1e-6)
        v = result.eigenvector[0]
        assert torch.allclose(torch.einsum("bij,bj->bi", hess, v), per_sample[:, None] * v, atol=1e-4)
    else:
        top = per_sample[per_sample.abs().argmax()]
        assert torch.allclose(result.eigenvalue, top, rtol=1e-6)
    assert result.converged


def test_unit_bad_mode_rejected():
    f, x, _ = quadratic_problem()
    with pytest.raises(ValueError, match="mode = 'fused'"):
        C.hvp(f, x, x, mode="fused")
    with pytest.raises(ValueError, match="coordinate 9 out of range"):
        C.exact_diagonal(f, x, batch_dim=True, coordinates=[[9]])


def test_unit_hvp_modes_agree_through_a_vit():
    """Both modes through timm attention (explicit path), w.r.t. an intermediate input."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                              num_heads=2, num_classes=10).eval().double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def f(scale):
        return model(images * scale).log_softmax(-1)[:, 0].sum()

    scale = torch.ones(2, 3, 32, 32, dtype=torch.float64)
    v = torch.randn_like(scale)
    with non_fused_attention(model):
        _, g1, h1 = C.hvp(f, scale, v, mode="double_backward")
        _, g2, h2 = C.hvp(f, scale, v, mode="forward_over_reverse")
    assert torch.allclose(g1[0], g2[0], atol=1e-12)
    assert torch.allclose(h1[0], h2[0], atol=1e-10)
    assert h1[0].abs().max() > 0
