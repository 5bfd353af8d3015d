"""The pruned-model wrapper: exactness at keep-all, head slicing vs masking, per-input selection, errors."""

from __future__ import annotations

import json

import pytest
import torch

import heart_lib  # noqa: F401
import timm

from heart_lib.pruning import (PruningConfig, TokenGateSet, kept_tokens, mask_heads_hook, prune, token_plan,
                               train_token_gate)
from heart_lib.pruning.peers import evit_reduce, tome_merge
from heart_lib.pruning.selectors import block_inputs, gate_rank_agreement

TINY = dict(img_size=32, patch_size=8, depth=4, num_classes=10)


def make(name: str = "vit_tiny_patch16_224", seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY, **kw}).eval()


@pytest.fixture(scope="module")
def vit():
    return make()


@pytest.fixture(scope="module")
def deit():
    return make("deit_tiny_distilled_patch16_224")


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def fake_oracle(model, images, layers):
    """Deterministic stand-in for HEART scores: per-image token norms at the block inputs (≥ 0)."""
    feats = block_inputs(model, images, tuple(layers))
    return {l: feats[l].norm(dim=-1) ** 2 for l in layers}


@pytest.mark.parametrize("text", ["", "tokens=1.0@1,2;selector=norm", "tokens=1@1,2,3;selector=cls_attention",
                                  "tokens=1.0@1;selector=random", "tokens=1.0@0,1,2,3;selector=tome",
                                  "tokens=1.0@1,2;selector=evit", "tokens=1.0@1;selector=norm;fuse=true"])
def test_keep_all_equals_unpruned(vit, deit, images, text):
    for model in (vit, deit):
        torch.testing.assert_close(prune(model, text)(images), model(images), rtol=0, atol=1e-6)


def test_pruning_changes_output_and_leaves_original_untouched(vit, images):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    ref = vit(images)
    pruned = prune(vit, "tokens=0.5@1,2;selector=norm;heads=0:1,3:0+2")
    assert not torch.allclose(pruned(images), ref, atol=1e-3)
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert [b.attn.num_heads for b in vit.blocks] == [3, 3, 3, 3]
    assert [b.attn.num_heads for b in pruned.model.blocks] == [2, 3, 3, 1]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_sliced_heads_equal_masked_heads(name, images):
    model = make(name, qkv_bias=True)
    remove = {0: (1,), 2: (0, 2), 3: (2,)}
    masked = make(name, qkv_bias=True)
    handles = [masked.blocks[l].attn.proj.register_forward_pre_hook(
        mask_heads_hook(h, masked.blocks[l].attn.num_heads, masked.blocks[l].attn.head_dim)) for l, h in remove.items()]
    try:
        expected = masked(images)
    finally:
        for h in handles:
            h.remove()
    pruned = prune(model, PruningConfig(heads=remove))
    got = pruned(images)
    assert (got - expected).abs().max() <= 1e-5
    assert not torch.allclose(got, model(images), atol=1e-4)  # removing heads does change the output
    for layer, block in enumerate(pruned.model.blocks):
        attn = block.attn
        assert attn.num_heads == 3 - len(remove.get(layer, ()))
        assert attn.attn_dim == attn.num_heads * attn.head_dim
        assert attn.qkv.out_features == 3 * attn.attn_dim and attn.proj.in_features == attn.attn_dim
        assert attn.fused_attn == model.blocks[layer].attn.fused_attn  # the fast path stays on


@pytest.mark.parametrize("selector", ["norm", "cls_attention", "random", "heart", "evit", "tome"])
def test_different_inputs_keep_different_tokens(deit, images, selector):
    # ToMe at 0.5 would merge all of set A, keeping every B token whatever the input
    spec = "0.7@0,1,2,3" if selector == "tome" else "0.5@1,2"
    pruned = prune(deit, f"tokens={spec};selector={selector}", oracle=fake_oracle, keep_index=True)
    if selector in ("evit", "tome"):
        # peers reduce inside the block: read the positions from their reduction directly
        pruned.keep_index = False
        kept = _peer_positions(pruned, images)
    else:
        pruned(images)
        kept = pruned.record.kept_index[2]
    sets = {tuple(sorted(row.tolist())) for row in kept}
    assert len(sets) > 1, f"{selector}: every input kept the same tokens"
    # class and distillation tokens are always kept, in front
    assert (kept[:, :2] == torch.tensor([0, 1])).all()
    counts = pruned.record.counts[0]
    assert counts == token_plan(pruned.config, 16, 4, 2)


def _peer_positions(pruned, images):
    captured = {}
    import heart_lib.pruning.peers as model_module  # the catalogue's peers call these at run time

    originals = (model_module.evit_reduce, model_module.tome_merge)

    def spy_evit(*args, **kw):
        out = originals[0](*args, **kw)
        captured.setdefault("index", out[1])
        return out

    def spy_tome(*args, **kw):
        out = originals[1](*args, **kw)
        captured.setdefault("index", out[1])
        return out

    model_module.evit_reduce, model_module.tome_merge = spy_evit, spy_tome
    try:
        pruned(images)
    finally:
        model_module.evit_reduce, model_module.tome_merge = originals
    return captured["index"]


def test_record_counts_follow_plan(vit, images):
    for text in ["tokens=0.7@1,2,3;selector=norm", "tokens=0.6@1,2;selector=evit", "tokens=0.5@1;selector=norm;fuse=true",
                 "tokens=0.9,0.8,0.7,0.6@0,1,2,3;selector=tome"]:
        pruned = prune(vit, text)
        pruned(images)
        assert pruned.record.counts[0] == token_plan(pruned.config, 16, 4, 1), text


def test_kept_tokens_counts():
    assert kept_tokens(10, 0.7, "norm") == 7  # not 8: 0.7 * 10 must not round up
    assert kept_tokens(196, 0.7, "norm") == 138
    assert kept_tokens(196, 0.7, "evit") == 139  # + the fused token
    assert kept_tokens(196, 0.3, "tome") == 98  # ToMe merges at most half
    assert kept_tokens(5, 1.0, "evit") == 5
    assert kept_tokens(3, 0.01, "norm") == 1


def test_random_selector_is_seeded(vit, images):
    a = prune(vit, "tokens=0.5@1;selector=random;seed=3")(images)
    b = prune(vit, "tokens=0.5@1;selector=random;seed=3")(images)
    c = prune(vit, "tokens=0.5@1;selector=random;seed=4")(images)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_input_budget(vit, images):
    tight = prune(vit, "tokens=0.25@1,2;selector=heart;budget=0", oracle=fake_oracle)
    loose = prune(vit, "tokens=0.25@1,2;selector=heart;budget=1e9", oracle=fake_oracle)
    torch.testing.assert_close(tight(images), vit(images), rtol=0, atol=1e-5)  # nothing fits a zero budget
    loose(images)
    assert all(c == token_plan(loose.config, 16, 4, 1) for c in loose.record.counts)  # the floor
    # a budget in between: inputs get different token counts
    scores = fake_oracle(vit, images, (1,))[1][:, 1:]
    budget = float(0.5 * scores.sort(dim=1).values[:, :6].sum(dim=1).median())
    mid = prune(vit, PruningConfig(layers=(1,), keep=(0.25,), selector="heart", per_input_budget=budget),
                oracle=fake_oracle)
    mid(images)
    assert len({c[1][0] for c in mid.record.counts}) > 1


def test_peers_pure_functions():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, generator=gen)
    index = torch.arange(9).expand(2, 9)
    attn = torch.rand(2, 9, generator=gen)
    out, out_index = evit_reduce(x, index, attn, prefix=1, keep=3)
    assert out.shape == (2, 5, 4) and (out_index[:, 0] == 0).all() and (out_index[:, -1] == -1).all()
    top = attn[:, 1:].argsort(dim=1, descending=True)
    for b in range(2):
        assert set(out_index[b, 1:4].tolist()) == set((top[b, :3] + 1).tolist())
        rest = top[b, 3:] + 1
        torch.testing.assert_close(out[b, -1], (x[b, rest] * attn[b, rest, None]).sum(0))
    size = torch.ones(2, 9)
    keys = torch.randn(2, 9, 3, generator=gen)
    merged, m_index, m_size = tome_merge(x, index, size, keys, prefix=1, r=3)
    assert merged.shape == (2, 6, 4) and m_size.sum(1).tolist() == [9.0, 9.0]
    # the size-weighted sum of tokens is conserved by merging
    torch.testing.assert_close((merged * m_size[..., None]).sum(1), x.sum(1))
    assert torch.equal(merged[:, 0], x[:, 0])


def test_learned_gate_learns_a_ranking(vit, images, tmp_path):
    layers = (1, 2)
    feats = block_inputs(vit, images, layers)
    target = {l: feats[l].norm(dim=-1) ** 2 for l in layers}
    gate = train_token_gate(feats, target, prefix=1, hidden=16, epochs=80, lr=1e-2, seed=0)
    agreement = gate_rank_agreement(gate, feats, target, prefix=1)
    assert min(agreement.values()) > 0.8, agreement
    path = gate.save(tmp_path / "gate.pt")
    pruned = prune(vit, f"tokens=0.5@1,2;selector=gate;gate={path}", keep_index=True)
    pruned(images)
    assert len({tuple(sorted(r.tolist())) for r in pruned.record.kept_index[2]}) > 1
    assert TokenGateSet.load(path).hidden == 16


@pytest.mark.parametrize("text, message", [
    ("tokens=0@1", "outside (0, 1]"),
    ("tokens=1.5@1", "outside (0, 1]"),
    ("tokens=-0.2@1", "outside (0, 1]"),
    ("tokens=0.5@1,1", "duplicate"),
    ("tokens=0.5@2,1", "increasing"),
    ("tokens=0.5@-1", "negative"),
    ("tokens=0.5,0.6@1,2,3", "keep ratios"),
    ("tokens=0.5@1;selector=magic", "allowed values"),
    ("tokens=0.5@0;selector=cls_attention", "layer 0"),
    ("tokens=0.5;selector=norm", "expected <ratio(s)>@<layers>"),
    ("heads=1:0+0", "twice"),
    ("heads=1", "layer:head"),
    ("selector=norm;colour=red", "unknown pruning config key"),
    ("tokens=0.5@1;selector=norm;budget=0.1", "loss-unit"),
    ("tokens=0.5@1;selector=gate", "gate=<path"),
])
def test_invalid_configs_raise_clear_errors(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("<", ".").replace(">", ".")):
        PruningConfig.parse(text)


@pytest.mark.parametrize("text, message", [
    ("tokens=0.5@4;selector=norm", "out of range"),
    ("heads=9:0", "out of range"),
    ("heads=1:0+1+2", "all 3 heads"),
    ("heads=1:3", "cannot remove"),
])
def test_configs_that_do_not_fit_the_model(vit, text, message):
    with pytest.raises(ValueError, match=message):
        prune(vit, text)


def test_unsupported_model_is_refused():
    with pytest.raises(ValueError, match="VisionTransformer"):
        prune(torch.nn.Linear(3, 3), "tokens=0.5@1")


def test_parse_roundtrip_and_files(tmp_path):
    text = "tokens=0.7@3,6,9;selector=cls_attention;heads=0:1,5:0"
    config = PruningConfig.parse(text)
    assert config.layers == (3, 6, 9) and config.keep == (0.7, 0.7, 0.7)
    assert config.head_map == {0: (1,), 5: (0,)}
    assert PruningConfig.parse(config.to_string()) == config
    assert PruningConfig.parse("heads=0:2,0:1") == PruningConfig(heads={0: (1, 2)})
    varied = PruningConfig.parse("tokens=0.9,0.8@2,4;selector=tome;seed=2;budget=none")
    assert varied.keep == (0.9, 0.8) and PruningConfig.parse(varied.to_string()) == varied
    (tmp_path / "c.yaml").write_text("tokens: 0.7@3,6,9\nselector: cls_attention\nheads: {0: [1], 5: 0}\n")
    (tmp_path / "c.json").write_text(json.dumps(config.to_dict()))
    assert PruningConfig.parse(tmp_path / "c.yaml") == config
    assert PruningConfig.parse(str(tmp_path / "c.json")) == config
    with pytest.raises(ValueError, match="does not exist"):
        PruningConfig.parse(tmp_path / "missing.yaml")


def test_heart_oracle_through_the_sensitivity_engine(vit, images):
    pruned = prune(vit, "tokens=0.5@1,2;selector=heart", keep_index=True)
    out = pruned(images[:3])
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert pruned.record.oracle_seconds > 0
    assert len({tuple(sorted(r.tolist())) for r in pruned.record.kept_index[2]}) > 1


def test_resume_from_a_shared_prefix(vit, images):
    pruned = prune(vit, "tokens=0.5@2,3;selector=cls_attention")
    assert pruned.first_changed_block() == 1
    stream = {}
    handle = vit.blocks[1].register_forward_pre_hook(lambda m, a: stream.setdefault("x", a[0]))
    vit(images)
    handle.remove()
    torch.testing.assert_close(pruned(None, start_layer=1, tokens=stream["x"]), pruned(images), rtol=0, atol=1e-6)
    assert pruned.record.counts[0] == token_plan(pruned.config, 16, 4, 1)
    with pytest.raises(ValueError, match="cannot be resumed"):
        pruned(None, start_layer=2, tokens=stream["x"])


def test_chapter_params_validation():
    from heart_lib import config
    from heart_lib.experiments.pruning import Params

    for profile in ("smoke", "default", "full", "paper"):
        assert isinstance(config.load_params(profile, "pruning"), Params)
    for bad in ({"layers": [0, 3]}, {"token_keeps": [1.2]}, {"token_selectors": ["heart"]}, {"peers": ["dynamicvit"]},
                {"head_targets": [1.0]}, {"joint_selectors": ["tome"]}, {"calib_method": "taylor"}):
        with pytest.raises(config.ConfigError, match=next(iter(bad))):
            config.validate("pruning", bad)


def test_tome_schedule_never_empties_the_sequence():
    from heart_lib.planning import constant_merge_config as tome_config

    for r in (0, 8, 40, 98):
        config = tome_config(r, 196, 12)
        plan = token_plan(config, 196, 12, 1)
        assert plan[-1][1] >= 2 and all(0 < k <= 1 for k in config.keep)


def test_oracle_variants(vit, images):
    def signed(model, imgs, layers):  # half the scores negative, like real HEART curvature
        return {l: s * torch.where(torch.arange(s.shape[1]) % 2 == 0, 1.0, -1.0) for l, s in fake_oracle(model, imgs, layers).items()}

    kept = {}
    for variant in ("raw", "abs", "clamp"):
        pruned = prune(vit, f"tokens=0.5@1;selector=heart;variant={variant}", oracle=signed, keep_index=True)
        pruned(images)
        kept[variant] = pruned.record.kept_index[1][:, 1:]
    assert (kept["raw"] % 2 == 0).all()  # raw keeps the positive (even) positions
    assert not torch.equal(kept["raw"].sort(1).values, kept["abs"].sort(1).values)
    assert PruningConfig.parse("tokens=0.5@1;selector=heart;variant=abs").to_string().endswith("variant=abs")
    with pytest.raises(ValueError, match="variant applies"):
        PruningConfig.parse("tokens=0.5@1;selector=norm;variant=abs")
    with pytest.raises(ValueError, match="allowed values"):
        PruningConfig.parse("tokens=0.5@1;selector=heart;variant=square")


def test_tome_merges_like_the_reference_code():
    """A hand-made case: tokens alternate A (even positions, class token included) / B (odd); the
    class token never merges; the r best-matched A tokens average into their B partners; the
    unmerged A tokens keep their original order, then the B tokens follow."""
    # positions 0..6: 0 = class token; A = {0, 2, 4, 6}, B = {1, 3, 5}
    keys = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0.1], [1, 0.05, 0], [0, 0.3, 1]])
    keys = keys[None]
    # class token's key equals token 5's: it must still not merge
    x = torch.arange(7, dtype=torch.float32)[None, :, None].repeat(1, 1, 2)
    index = torch.arange(7)[None]
    size = torch.ones(1, 7)
    merged, m_index, m_size = tome_merge(x, index, size, keys, prefix=1, r=2)
    # best matches: 2 -> 5 (cos ≈ 1.0), 4 -> 1 (≈ 0.995), 6 -> 3 (≈ 0.958): the first two merge
    assert m_index.tolist() == [[0, 6, 1, 3, 5]]
    assert m_size.tolist() == [[1, 1, 2, 1, 2]]
    torch.testing.assert_close(merged[0, :, 0], torch.tensor([0.0, 6, (1 + 4) / 2, 3, (5 + 2) / 2]))
    # at most half of the non-prefix tokens merge, rounded down
    capped = tome_merge(x, index, size, keys, prefix=1, r=10)[1]
    assert capped.shape[1] == 7 - 3 and capped[0, 0] == 0


def test_tome_keeps_distillation_token_in_front():
    gen = torch.Generator().manual_seed(0)
    x, keys = torch.randn(2, 10, 4, generator=gen), torch.randn(2, 10, 3, generator=gen)
    index, size = torch.arange(10).expand(2, 10), torch.ones(2, 10)
    merged, m_index, m_size = tome_merge(x, index, size, keys, prefix=2, r=4)
    assert m_index[:, :2].tolist() == [[0, 1], [0, 1]] and merged.shape == (2, 6, 4)
    torch.testing.assert_close(merged[:, :2], x[:, :2])
    torch.testing.assert_close((merged * m_size[..., None]).sum(1), x.sum(1))


def test_configs_survive_their_text_form():
    """parse(to_string(c)) == c over many random configurations (ToMe's fractional keeps included)."""
    rng = torch.Generator().manual_seed(0)
    selectors = ["cls_attention", "norm", "random", "evit", "tome", "heart"]
    for _ in range(300):
        depth = int(torch.randint(2, 13, (1,), generator=rng))
        n_layers = int(torch.randint(0, depth, (1,), generator=rng))
        layers = sorted(torch.randperm(depth - 1, generator=rng)[:n_layers].add(1).tolist())
        keep = tuple(float(v) for v in torch.rand(len(layers), generator=rng).clamp(min=1e-3))
        selector = selectors[int(torch.randint(0, len(selectors), (1,), generator=rng))]
        heads = {int(l): (int(h),) for l, h in zip(torch.randint(0, depth, (2,), generator=rng),
                                                   torch.randint(0, 3, (2,), generator=rng))}
        config = PruningConfig(layers=tuple(layers), keep=keep, selector=selector, heads=heads,
                               seed=int(torch.randint(0, 9, (1,), generator=rng)))
        assert PruningConfig.parse(config.to_string()) == config, config.to_string()
