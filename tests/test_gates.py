"""Gates and probes on timm's own module instances: exactness, placement, detaching, model families."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from heart_lib import gates as G


pytestmark = pytest.mark.usefixtures("one_thread")


def small_vit(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2, num_classes=10)
    args.update(kw)
    name = args.pop("name", "vit_tiny_patch16_224")
    return timm.create_model(name, **args).eval()


# Full-size architectures, random weights, smaller images so the check stays fast; the layout of
# blocks, heads and prefix tokens is the same as at 224 px.
FAMILIES = [
    ("deit_tiny_patch16_224", 1, {}),
    ("deit_small_patch16_224", 1, {}),
    ("vit_base_patch16_224", 1, {}),
    ("deit_base_distilled_patch16_224", 2, {}),
    ("vit_base_patch16_reg4_gap_256", 4, {}),
]


@pytest.mark.parametrize("name,prefix,kw", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_unit_gates_leave_outputs_unchanged_on_timm_families(name, prefix, kw):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, **kw).eval()
    info = G.vit_info(model)
    assert info.num_prefix_tokens == prefix == G.num_prefix_tokens(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        hooks_before = G.hook_count(model)
        with G.gates_attached(model, record=True) as gates:
            n_tokens = 16 + prefix
            gates.ones(2, n_tokens)
            out = model(x)
            assert set(gates.tokens) == set(range(info.depth)) and set(gates.heads) == set(range(info.depth))
            assert gates.tokens[0].shape == (2, n_tokens, model.embed_dim)
            assert gates.heads[0].shape == (2, n_tokens, info.num_heads[0], info.head_dim[0])
        assert G.hook_count(model) == hooks_before
        again = model(x)
    assert (out - ref).abs().max().item() <= 1e-6
    assert torch.equal(again, ref)


def test_unit_zero_token_gate_equals_zeroing_the_residual_stream():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32)

    def zero_token(module, args):
        y = args[0].clone()
        y[:, 5] = 0
        return (y,)

    with torch.no_grad():
        handle = model.blocks[1].register_forward_pre_hook(zero_token)
        expected = model(x)
        handle.remove()
        with G.gates_attached(model, token_layers=[1], head_layers=()) as gates:
            gate = torch.ones(2, 17)
            gate[:, 5] = 0
            gates.token[1] = gate
            got = model(x)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(got, model(x), atol=1e-4)  # the gate did something


def test_unit_zero_head_gate_equals_slicing_the_projection_weights():
    model = small_vit(num_heads=4)
    x = torch.randn(3, 3, 32, 32)
    surgery = copy.deepcopy(model)
    head_dim = 32 // 4
    with torch.no_grad():
        surgery.blocks[2].attn.proj.weight[:, 1 * head_dim:2 * head_dim] = 0  # head 1 removed by weights
        expected = surgery(x)
        with G.gates_attached(model, token_layers=(), head_layers=[2]) as gates:
            gate = torch.ones(3, 4)
            gate[:, 1] = 0
            gates.head[2] = gate
            got = model(x)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_unit_gates_are_per_image():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with G.gates_attached(model, token_layers=[0], head_layers=[0]) as gates:
            gates.token[0] = torch.ones(2, 17)
            head = torch.ones(2, 2)
            head[1, 0] = 0  # only image 1 loses head 0
            gates.head[0] = head
            out = model(x)
    assert torch.equal(out[0], ref[0])
    assert not torch.allclose(out[1], ref[1])


def test_unit_attention_recorded_on_explicit_path_only():
    from heart_lib._compat import non_fused_attention

    model = small_vit()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), non_fused_attention(model), G.gates_attached(model, token_layers=[1], head_layers=(),
                                                                        record=True) as gates:
        model(x)
        attn = gates.attention[1]
    assert attn.shape == (1, 2, 17, 17)
    assert torch.allclose(attn.sum(-1), torch.ones(1, 2, 17))


def test_unit_detach_is_idempotent_and_weights_untouched():
    model = small_vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gates = G.attach_gates(model)
    assert gates.attached and G.hook_count(model) > 0
    gates.detach()
    gates.detach()
    assert G.hook_count(model) == 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_unit_rejects_non_vit_and_bad_layers():
    with pytest.raises(ValueError, match="not a timm Vision Transformer"):
        G.vit_info(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="not a timm Vision Transformer"):
        G.attach_gates(timm.create_model("resnet18", num_classes=10))
    with pytest.raises(ValueError, match="torch.nn.Module"):
        G.vit_info("vit")
    model = small_vit()
    with pytest.raises(ValueError, match="out of range.*3 blocks"):
        G.attach_gates(model, token_layers=[3])
    with pytest.raises(ValueError, match="integer"):
        G.attach_gates(model, token_layers=[1.5])
    assert G.check_layers([-1, 0, 0], 3) == (0, 2)
    assert G.hook_count(model) == 0  # a failed attach leaves nothing behind


def test_unit_block_runner_tail_matches_full_forward():
    model = small_vit(name="deit_base_distilled_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2)
    x = torch.randn(2, 3, 32, 32)
    runner = G.BlockRunner(model, x)
    assert runner.tail_ok
    with torch.no_grad():
        assert torch.allclose(runner.logits_from(1), model(x), atol=1e-6)
