"""Analytic FLOPs of what runs == FlopCounterMode on the pruned model (within 1 %)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import heart_lib  # noqa: F401
import timm

from heart_lib.flops import count_flops, counted_flops, flops_reduction, vit_shape
from heart_lib.pruning import prune, train_token_gate
from heart_lib.pruning.selectors import block_inputs

TINY = dict(img_size=32, patch_size=8, depth=4, num_classes=10)
CONFIGS = [
    "",
    "tokens=0.5@1,2;selector=norm",
    "tokens=0.7@1,2,3;selector=cls_attention;heads=0:1,2:0+2",
    "tokens=0.5@0,2;selector=random;heads=3:1",
    "tokens=0.6@1,2;selector=evit;heads=1:0",
    "tokens=0.8@0,1,2,3;selector=tome",
    "tokens=0.6,0.9@1,3;selector=norm;fuse=true",
    "heads=0:0,1:1,2:2,3:0+1",
]


def make(name="vit_tiny_patch16_224", **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **{**TINY, **kw}).eval()


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("text", CONFIGS)
def test_analytic_matches_flop_counter(name, text):
    model = make(name)
    pruned = prune(model, text)
    analytic, counted = count_flops(pruned), counted_flops(pruned, batch=2)
    assert abs(analytic - counted) <= 0.01 * counted, (analytic, counted)
    assert count_flops(text, base=model) == analytic  # the config alone gives the same number


def test_full_size_deit_tiny_and_reduction():
    model = timm.create_model("deit_tiny_patch16_224").eval()
    dense = count_flops(model)
    assert abs(dense - counted_flops(model)) <= 0.01 * dense
    assert 2.4e9 < dense < 2.6e9  # ≈ 1.25 GMACs, the number DeiT-Tiny is known by
    pruned = prune(model, "tokens=0.7@3,6,9;selector=cls_attention")
    reduced = count_flops(pruned)
    assert abs(reduced - counted_flops(pruned)) <= 0.01 * reduced
    assert 0.3 < flops_reduction(reduced, dense) < 0.45
    assert count_flops("tokens=0.7@3,6,9;selector=cls_attention", base="deit_tiny_patch16_224") == reduced


def test_gate_overhead_is_counted():
    model = make()
    feats = block_inputs(model, torch.randn(4, 3, 32, 32), (1, 2))
    gate = train_token_gate(feats, {l: f.norm(dim=-1) for l, f in feats.items()}, prefix=1, hidden=8, epochs=2)
    pruned = prune(model, "tokens=0.5@1,2;selector=gate;gate=unused.pt", gate=gate)
    analytic = count_flops(pruned, breakdown=True)
    assert analytic["selector"] > 0
    assert abs(analytic["total"] - counted_flops(pruned, batch=2)) <= 0.01 * analytic["total"]


def test_cpu_fused_attention_needs_the_registered_formula():
    """Guards the reason for CPU_SDPA_MAPPING: without it, attention FLOPs vanish on CPU."""
    model = make()
    with FlopCounterMode(display=False) as plain:
        model(torch.randn(1, 3, 32, 32))
    if any(b.attn.fused_attn for b in model.blocks):
        assert plain.get_total_flops() < counted_flops(model)
    shape = vit_shape(model)
    assert len(shape.blocks) == 4 and shape.prefix == 1


def test_image_size_and_config_errors():
    with pytest.raises(ValueError, match="base="):
        count_flops("tokens=0.5@1")
    with pytest.raises(ValueError, match="out of range"):
        count_flops("tokens=0.5@7", base=make())
    per_input = prune(make(), "tokens=0.5@1;selector=heart;budget=1",
                      oracle=lambda m, x, layers: {l: torch.ones(x.shape[0], 17) for l in layers})
    with pytest.raises(ValueError, match="run it on inputs"):
        count_flops(per_input)
    per_input(torch.randn(3, 3, 32, 32))
    assert count_flops(per_input) < count_flops(make())


def test_match_keep_hits_the_target():
    from heart_lib.planning import match_keep

    dense = count_flops("", base="deit_tiny_patch16_224")
    for target in (0.25, 0.494):
        config = match_keep("deit_tiny_patch16_224", target, (3, 6, 9))
        assert abs(1 - count_flops(config, base="deit_tiny_patch16_224") / dense - target) < 0.005
    with pytest.raises(ValueError, match="target"):
        match_keep("deit_tiny_patch16_224", 1.2, (3,))
