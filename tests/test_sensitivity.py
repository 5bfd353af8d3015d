"""Scores against the exact gate Hessian of a tiny random ViT (fp64), batch independence,
finite differences, leave-one-out, and bad input."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from heart_lib import gates as G
from heart_lib import sensitivity as S
from heart_lib._compat import non_fused_attention

TOKEN_LAYERS = (0, 2)
B, N, HEADS, DEPTH = 2, 17, 2, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=DEPTH, embed_dim=32,
                              num_heads=HEADS, num_classes=10).eval().to(dtype)
    # timm initialises the classifier at zero; a random head gives non-degenerate curvature.
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def problem():
    """Model, images and the exact Hessian of the summed loss w.r.t. every gate (fp64)."""
    torch.set_num_threads(1)
    model = tiny()
    images = torch.randn(B, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(images).argmax(-1)  # pseudo-label of the unpruned model
    sizes = [B * N] * len(TOKEN_LAYERS) + [B * HEADS] * DEPTH
    gates = G.attach_gates(model, token_layers=TOKEN_LAYERS, head_layers=range(DEPTH))

    def loss_of(flat):
        parts = flat.split(sizes)
        for i, layer in enumerate(TOKEN_LAYERS):
            gates.token[layer] = parts[i].view(B, N)
        for layer in range(DEPTH):
            gates.head[layer] = parts[len(TOKEN_LAYERS) + layer].view(B, HEADS)
        return F.cross_entropy(model(images), target, reduction="sum")

    ones = torch.ones(sum(sizes), dtype=torch.float64)
    with non_fused_attention(model):
        hess = torch.autograd.functional.hessian(loss_of, ones)
        grad = torch.autograd.functional.jacobian(loss_of, ones)
    gates.detach()

    # Index helpers: which flat positions are group `key`, image b.
    offsets, start = {}, 0
    keys = [("token", l) for l in TOKEN_LAYERS] + [("head", l) for l in range(DEPTH)]
    for key, size in zip(keys, sizes):
        offsets[key] = (start, size // B)
        start += size

    def block(key, b):
        first, width = offsets[key]
        return slice(first + b * width, first + (b + 1) * width)

    return dict(model=model, images=images, hess=hess, grad=grad, keys=keys, block=block)


def reference(problem, key, what):
    """[B, width] from the exact Hessian: its diagonal or its within-group row sums; or the gradient."""
    hess, block = problem["hess"], problem["block"]
    rows = []
    for b in range(B):
        s = block(key, b)
        if what == "diag":
            rows.append(torch.diagonal(hess[s, s]))
        elif what == "group_rowsum":
            rows.append(hess[s, s].sum(1))
        else:
            rows.append(problem["grad"][s])
    return torch.stack(rows)


def scores(problem, method, **kw):
    return S.score_components(problem["model"], problem["images"], layers=TOKEN_LAYERS, heads=True,
                              method=method, **kw)


def each_key(result):
    for layer in TOKEN_LAYERS:
        yield ("token", layer), result.tokens[layer]
    for layer in range(DEPTH):
        yield ("head", layer), result.heads[:, layer]


def test_unit_reference_hessian_is_block_diagonal_across_images(problem):
    hess, block = problem["hess"], problem["block"]
    rows0 = torch.cat([torch.arange(hess.shape[0])[block(k, 0)] for k in problem["keys"]])
    rows1 = torch.cat([torch.arange(hess.shape[0])[block(k, 1)] for k in problem["keys"]])
    assert hess[rows0][:, rows1].abs().max() == 0  # images do not interact: per-image scores are sound
    assert hess[rows0][:, rows0].abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["double_backward", "forward_over_reverse"])
def test_unit_exact_and_gradient_scores_match_autograd_hessian(problem, mode):
    exact = scores(problem, "heart_exact", mode=mode)
    taylor = scores(problem, "taylor", mode=mode)
    fisher = scores(problem, "fisher", mode=mode)
    second = scores(problem, "second_order", curvature="exact", mode=mode)
    for (key, got), (_, t), (_, f), (_, so) in zip(each_key(exact), each_key(taylor), each_key(fisher),
                                                   each_key(second)):
        diag, grad = reference(problem, key, "diag"), reference(problem, key, "grad")
        assert torch.allclose(got, diag, atol=1e-11, rtol=1e-9), key
        assert torch.allclose(t, grad.abs(), atol=1e-12, rtol=1e-9), key
        assert torch.allclose(f, grad.square(), atol=1e-12, rtol=1e-9), key
        assert torch.allclose(so, -grad + 0.5 * diag, atol=1e-11, rtol=1e-9), key
    # The curvature is not PSD: the tiny model has negative diagonal entries (book/method.md, 'Components, gates and the sensitivity score').
    assert min(float(v.min()) for _, v in each_key(exact)) < 0


@pytest.mark.parametrize("mode", ["double_backward", "forward_over_reverse"])
def test_unit_single_probe_is_hessian_row_sum(problem, mode):
    per_group = scores(problem, "heart", scope="layer", mode=mode)
    joint = scores(problem, "heart", scope="global", mode=mode)
    hess, block = problem["hess"], problem["block"]
    index = torch.arange(hess.shape[0])
    for (key, got), (_, got_joint) in zip(each_key(per_group), each_key(joint)):
        assert torch.allclose(got, reference(problem, key, "group_rowsum"), atol=1e-11, rtol=1e-9), key
        expected = torch.stack([
            hess[block(key, b)][:, torch.cat([index[block(k, b)] for k in problem["keys"]])].sum(1)
            for b in range(B)])
        assert torch.allclose(got_joint, expected, atol=1e-11, rtol=1e-9), key


def test_unit_finite_difference_mode_approximates_autograd_hessian(problem):
    """The cheap mode (two gradient passes per probe) against the exact gate Hessian, fp64."""
    single = scores(problem, "heart", scope="layer", mode="finite_difference")
    exact = scores(problem, "heart_exact", mode="finite_difference")
    second = scores(problem, "second_order", curvature="exact", mode="finite_difference")
    for (key, s1), (_, ex), (_, so) in zip(each_key(single), each_key(exact), each_key(second)):
        diag, grad = reference(problem, key, "diag"), reference(problem, key, "grad")
        assert torch.allclose(s1, reference(problem, key, "group_rowsum"), atol=1e-7, rtol=1e-5), key
        assert torch.allclose(ex, diag, atol=1e-7, rtol=1e-5), key
        assert torch.allclose(so, -grad + 0.5 * diag, atol=1e-7, rtol=1e-5), key


def test_unit_variants_of_curvature(problem):
    raw = scores(problem, "heart_exact")
    for variant, fn in (("abs", torch.abs), ("clamp", lambda t: t.clamp_min(0))):
        other = scores(problem, "heart_exact", variant=variant)
        for (_, a), (_, b) in zip(each_key(raw), each_key(other)):
            assert torch.equal(fn(a), b)


def test_unit_hutchinson_converges_to_exact_diagonal(problem):
    """Mean squared error against the exact diagonal falls roughly as 1/K."""
    def mse(k, seed):
        est = scores(problem, "heart_hutchinson", probes=k, seed=seed)
        return torch.stack([(v - reference(problem, key, "diag")).square().mean() for key, v in each_key(est)]).sum()

    small = torch.stack([mse(2, s) for s in range(4)]).mean()
    large = torch.stack([mse(32, s) for s in range(4)]).mean()
    assert large < small / 4, (float(small), float(large))
    fwd = scores(problem, "heart_hutchinson", probes=3, seed=5, mode="forward_over_reverse")
    dbl = scores(problem, "heart_hutchinson", probes=3, seed=5, mode="double_backward")
    for (_, a), (_, b) in zip(each_key(fwd), each_key(dbl)):
        assert torch.allclose(a, b, atol=1e-12)  # same probes, same estimate, either HVP mode


def test_unit_finite_difference_of_one_curvature_value(problem):
    model, images = problem["model"], problem["images"]
    exact = scores(problem, "heart_exact").tokens[2][1, 5]
    with torch.no_grad():
        target = model(images).argmax(-1)

    def loss(value):
        with G.gates_attached(model, token_layers=[2], head_layers=()) as gates:
            gate = torch.ones(B, N, dtype=torch.float64)
            gate[1, 5] = value
            gates.token[2] = gate
            with torch.no_grad():
                return F.cross_entropy(model(images), target, reduction="sum")

    h = 1e-3
    fd = (loss(1 + h) - 2 * loss(1.0) + loss(1 - h)) / h**2
    assert abs(float(fd - exact)) <= 1e-5 * max(1.0, abs(float(exact)))


@pytest.mark.parametrize("method, mode", [
    *[(m, "double_backward") for m in ("heart", "heart_global", "heart_exact", "heart_hutchinson", "second_order",
                                       "taylor", "cls_attention", "norm")],
    ("heart", "finite_difference"),  # two gradient passes per probe instead of a double backward
])
def test_unit_scores_are_batch_independent(method, mode):
    """An image's scores do not depend on its batch-mates (deterministic methods)."""
    model = tiny()
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kw = dict(layers=[1], heads=True, method=method, curvature="exact", mode=mode)
    tol = dict(atol=1e-12, rtol=1e-10)
    if mode == "finite_difference":
        # Differencing two gradients divides their rounding (which does depend on the batch shape,
        # ~1e-15) by 2h, h = eps^(1/3): a noise floor of about eps^(2/3) ≈ 4e-11 (heart_lib.curvature).
        # Measured ~1e-10 here (the FD error against the exact HVP is ~2e-10); allow 50 times the floor.
        tol = dict(atol=50 * torch.finfo(torch.float64).eps ** (2 / 3), rtol=0.0)
    full = S.score_components(model, images, **kw)
    alone = S.score_components(model, images[2:3], **kw)
    swapped = S.score_components(model, images[[2, 0]], **kw)
    for other in (alone, swapped):
        assert torch.allclose(other.tokens[1][0], full.tokens[1][2], **tol)
        assert torch.allclose(other.heads[0], full.heads[2], **tol)


@pytest.mark.parametrize("loss", ["pseudo", "kl", "true"])
def test_unit_leave_one_out_matches_direct_removal(loss):
    model = tiny()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([1, 2, 3])
    got = S.leave_one_out_tokens(model, images, layers=[1], loss=loss, labels=labels, chunk=4,
                                 tokens={1: [0, 3, 16]})[1]
    assert got.shape == (3, N) and torch.isnan(got[:, 1]).all()
    with torch.no_grad():
        ref_logits = model(images)
        base = S.per_image_loss(ref_logits, loss, labels, ref_logits)
        for c in (0, 3, 16):
            def zero(module, args, c=c):
                y = args[0].clone()
                y[:, c] = 0
                return (y,)
            handle = model.blocks[1].register_forward_pre_hook(zero)
            changed = S.per_image_loss(model(images), loss, labels, ref_logits)
            handle.remove()
            assert torch.allclose(got[:, c], changed - base, atol=1e-12), c
    heads = S.leave_one_out_heads(model, images, loss=loss, labels=labels, chunk=1)
    heads_chunked = S.leave_one_out_heads(model, images, loss=loss, labels=labels, chunk=3)
    assert heads.shape == (3, DEPTH, HEADS)
    assert torch.allclose(heads, heads_chunked, atol=1e-12)
    if loss == "kl":
        assert (heads >= -1e-12).all()  # a KL is never negative


def test_unit_kl_loss_has_zero_gradient_and_psd_curvature():
    model = tiny()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    d = S.gate_derivatives(model, images, token_layers=[1], head_layers=[0], loss="kl",
                           curvature_estimator="exact")
    assert d.grad[("token", 1)].abs().max() < 1e-12
    assert d.curvature[("token", 1)].min() >= -1e-12  # Gauss-Newton at the optimum of the KL


def test_unit_random_and_heuristics_shapes_and_seed():
    model = tiny(torch.float32)
    images = torch.randn(2, 3, 32, 32)
    a = S.score_tokens(model, images, layers=[0, 2], method="random", seed=1)
    b = S.score_tokens(model, images, layers=[0, 2], method="random", seed=1)
    assert set(a) == {0, 2} and a[0].shape == (2, N) and torch.equal(a[2], b[2])
    heads = S.score_heads(model, images, method="cls_attention")
    assert heads.shape == (2, DEPTH, HEADS) and (heads <= 0).all()  # negative entropies
    cls = S.score_tokens(model, images, layers=[1], method="cls_attention")[1]
    assert torch.allclose(cls.sum(-1), torch.ones(2), atol=1e-5)  # a softmax row, mean over heads
    norm = S.score_tokens(model, images, layers=[1], method="norm")[1]
    with torch.no_grad(), G.gates_attached(model, token_layers=[1], head_layers=(), record=True) as gates:
        model(images)
        assert torch.allclose(norm, gates.tokens[1].norm(dim=-1))


def test_unit_prefix_tokens_and_distilled_model():
    torch.manual_seed(0)
    model = timm.create_model("deit_base_distilled_patch16_224", img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    result = S.score_components(model, images, layers=[1], method="heart")
    assert result.num_prefix_tokens == 2 == S.num_prefix_tokens(model)
    assert result.tokens[1].shape == (2, 18) and result.heads.shape == (2, 2, 2)
    assert torch.isfinite(result.tokens[1]).all()


def test_unit_bad_input_is_rejected_clearly():
    model = tiny(torch.float32)
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="not a timm Vision Transformer"):
        S.score_tokens(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), images, layers=[0], method="heart")
    with pytest.raises(ValueError, match="layers = 7 is out of range"):
        S.score_tokens(model, images, layers=[7], method="heart")
    with pytest.raises(ValueError, match="method = 'hessian'"):
        S.score_tokens(model, images, layers=[0], method="hessian")
    with pytest.raises(ValueError, match="loss = 'mse'"):
        S.score_heads(model, images, method="taylor", loss="mse")
    with pytest.raises(ValueError, match="needs labels"):
        S.score_heads(model, images, method="taylor", loss="true")
    with pytest.raises(ValueError, match="labels must have shape"):
        S.score_heads(model, images, method="taylor", loss="true", labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="probes"):
        S.score_heads(model, images, method="heart_hutchinson", probes=0)
    bad = images.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(S.NonFiniteLossError, match="batch indices: 1") as err:
        S.score_tokens(model, bad, layers=[0], method="heart")
    assert err.value.images == [1]
    with pytest.raises(S.NonFiniteLossError):
        S.leave_one_out_heads(model, bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unit_low_precision_model_scored_in_fp32_and_restored(dtype):
    model = tiny(torch.float32)
    low = copy.deepcopy(model).to(dtype)
    state = {k: v.clone() for k, v in low.state_dict().items()}
    fused = [m.fused_attn for m in low.modules() if hasattr(m, "fused_attn")]
    images = torch.randn(2, 3, 32, 32)
    got = S.score_tokens(low, images.to(dtype), layers=[1], method="heart")[1]
    expected = S.score_tokens(copy.deepcopy(low).float(), images.to(dtype).float(), layers=[1], method="heart")[1]
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert all(v.dtype == state[k].dtype and torch.equal(v, state[k]) for k, v in low.state_dict().items())
    assert [m.fused_attn for m in low.modules() if hasattr(m, "fused_attn")] == fused
    assert all(p.requires_grad for p in low.parameters())  # the call gave requires_grad back


def test_unit_gate_eigenpair_matches_dense_hessian(problem):
    """Per-image power iteration in gate space against the eigenpairs of the exact gate Hessian."""
    values, vectors, converged = S.gate_eigenpair(problem["model"], problem["images"], layers=TOKEN_LAYERS,
                                                  heads=True, iters=400, tol=1e-13)
    hess, block = problem["hess"], problem["block"]
    index = torch.arange(hess.shape[0])
    for b in range(B):
        rows = torch.cat([index[block(k, b)] for k in problem["keys"]])
        eig = torch.linalg.eigvalsh(hess[rows][:, rows])
        top = eig[eig.abs().argmax()]
        assert torch.allclose(values[b], top, rtol=1e-5), (float(values[b]), float(top))
        v = torch.cat([vectors[k][b] for k in problem["keys"]])
        assert torch.allclose(hess[rows][:, rows] @ v, top * v, atol=1e-4 * float(top.abs()))


def test_unit_rowwise_rank_correlations_match_scipy():
    import warnings

    import numpy as np
    from scipy import stats as st

    from heart_lib.stats import rowwise_kendall, rowwise_spearman

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 25))
    b = a + rng.normal(size=(4, 25))
    a[1, 3] = np.nan  # columns missing in one row are skipped in that row only
    b[2, [4, 5]] = np.nan
    a[3] = np.round(a[3])  # ties
    for ours, theirs in ((rowwise_spearman, st.spearmanr), (rowwise_kendall, st.kendalltau)):
        expected = [theirs(x[np.isfinite(x) & np.isfinite(y)], y[np.isfinite(x) & np.isfinite(y)]).statistic
                    for x, y in zip(a, b)]
        assert np.allclose(ours(a, b), expected, atol=1e-12)
    assert np.isnan(rowwise_spearman(np.ones((1, 5)), np.arange(5.0)[None]))[0]
    empty = np.full((1, 5), np.nan)  # a row with no valid column: NaN, silently (no RuntimeWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(rowwise_spearman(empty, np.arange(5.0)[None]))[0]


def test_unit_kl_curvature_survives_finite_differences():
    """The KL target is the unpruned output, held fixed: finite differences must not see it move."""
    model = tiny()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    kw = dict(token_layers=[1], head_layers=[0], loss="kl", curvature_estimator="single")
    exact = S.gate_derivatives(model, images, **kw)
    fd = S.gate_derivatives(model, images, mode="finite_difference", **kw)
    for key in exact.curvature:
        scale = exact.curvature[key].abs().max()
        assert scale > 1e-6
        assert torch.allclose(fd.curvature[key], exact.curvature[key], atol=1e-3 * float(scale)), key


def test_unit_hutchinson_is_batch_independent():
    """Hutchinson probes are drawn per image: an image's estimate ignores its batch-mates."""
    model = tiny()
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kw = dict(layers=[1], heads=True, method="heart_hutchinson", probes=3, seed=2)
    full = S.score_components(model, images, **kw)
    for other, row in ((S.score_components(model, images[2:3], **kw), 0),
                       (S.score_components(model, images[[1, 2]], **kw), 1)):
        assert torch.allclose(other.tokens[1][row], full.tokens[1][2], atol=1e-12, rtol=1e-9)
        assert torch.allclose(other.heads[row], full.heads[2], atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("class_token", [True, False])
def test_unit_one_definition_of_cls_attention(class_token):
    """Sensitivity's CLS-attention scores and the pruning selector read the same rows of the same
    attention (the class token's, or the mean over queries when there is none)."""
    from heart_lib.pruning.selectors import capture_output, cls_attention_from_qkv

    torch.manual_seed(0)
    kw = {} if class_token else dict(class_token=False, global_pool="avg", reg_tokens=1)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=32,
                              num_heads=2, num_classes=10, **kw).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores = S.score_tokens(model, images, layers=[1], method="cls_attention")[1]
    store = {}
    handle = capture_output(model.blocks[1].attn.qkv, store, "qkv")
    with torch.no_grad():
        model(images)
    handle.remove()
    selector = cls_attention_from_qkv(store["qkv"], model.blocks[1].attn, has_class_token=class_token)
    torch.testing.assert_close(selector, scores, rtol=1e-4, atol=1e-6)


def test_unit_head_leave_one_out_equals_the_head_pruned_model():
    """The leave-one-out ΔL of head h in block l is the loss change of the model with that head
    physically sliced out (prune(..., PruningConfig(heads={l: (h,)}))) on the same images."""
    from heart_lib.pruning import PruningConfig, prune

    model = tiny()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    loo = S.leave_one_out_heads(model, images, loss="pseudo", chunk=2)
    assert loo.shape == (3, DEPTH, HEADS) and torch.isfinite(loo).all()
    with torch.no_grad():
        ref = model(images)
        base = S.per_image_loss(ref, "pseudo", None, ref)
    for layer in range(DEPTH):
        for head in range(HEADS):
            pruned = prune(model, PruningConfig(heads={layer: (head,)}))
            assert pruned.model.blocks[layer].attn.num_heads == HEADS - 1
            with torch.no_grad():
                changed = S.per_image_loss(pruned(images), "pseudo", None, ref)
            torch.testing.assert_close(loo[:, layer, head], changed - base, rtol=1e-9, atol=1e-12)
    assert loo.abs().max() > 1e-3  # removing a head really changes the loss


def test_unit_dropping_truth_equals_the_pruned_model():
    """The dropping ΔL of one token is the loss change of the physically pruned model that drops
    exactly that token (same gather), unlike zeroing its residual row."""
    from heart_lib.pruning import prune

    model = tiny()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    drop = S.leave_one_out_tokens(model, images, layers=[1], tokens={1: [0, 4, 9]}, removal="drop")[1]
    zero = S.leave_one_out_tokens(model, images, layers=[1], tokens={1: [4, 9]}, removal="zero")[1]
    assert torch.isnan(drop[:, 0]).all()  # the class token is never dropped
    with torch.no_grad():
        ref = model(images)
        base = S.per_image_loss(ref, "pseudo", None, ref)
    body = N - 1
    for token in (4, 9):
        def oracle(_model, imgs, layers, token=token):  # every token kept but this one
            scores = torch.ones(imgs.shape[0], N, dtype=torch.float64)
            scores[:, token] = -1.0
            return {l: scores for l in layers}
        pruned = prune(model, f"tokens={(body - 1) / body!r}@1;selector=heart", oracle=oracle)
        with torch.no_grad():
            changed = S.per_image_loss(pruned(images), "pseudo", None, ref)
        torch.testing.assert_close(drop[:, token], changed - base, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(drop[:, token], zero[:, token])
