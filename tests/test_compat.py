import subprocess
import sys

import pytest
import torch

from heart_lib import _compat


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_torchvision_and_timm_import_after_heart_lib():
    done = _python("import heart_lib, torchvision, timm; print(heart_lib.TORCHVISION_MODE)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in {"schemas", "extension"}


def test_workaround_is_needed_exactly_when_the_extension_does_not_load():
    mode = _python("import heart_lib; print(heart_lib.TORCHVISION_MODE)").stdout.strip()
    plain = _python("import torchvision")
    if mode == "schemas":  # CUDA torchvision next to CPU torch: plain import must fail as documented
        assert plain.returncode != 0 and "torchvision::nms" in plain.stderr
    else:
        assert plain.returncode == 0, plain.stderr


def test_defined_schemas_are_the_torchvision_ones():
    done = _python(
        "import heart_lib, torch\n"
        "print(heart_lib.TORCHVISION_MODE)\n"
        "print(torch.ops.torchvision.nms.default._schema)\n"
    )
    assert done.returncode == 0, done.stderr
    mode, schema = done.stdout.strip().splitlines()
    assert "Tensor dets, Tensor scores, float iou_threshold" in schema


def test_second_call_is_harmless():
    assert _compat.ensure_torchvision_importable() in {"imported", "schemas", "extension"}


def _curvature_of_attention(model, x):
    weight = model.blocks[0].attn.qkv.weight
    loss = model(x).logsumexp(-1).sum()
    (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
    (hv,) = torch.autograd.grad((grad * grad).sum(), weight)
    return hv


def test_non_fused_attention_enables_double_backward_and_restores(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    assert all(b.attn.fused_attn for b in tiny_vit.blocks)
    with _compat.non_fused_attention(tiny_vit):
        assert not any(b.attn.fused_attn for b in tiny_vit.blocks)
        hv = _curvature_of_attention(tiny_vit, x)
    assert torch.isfinite(hv).all() and hv.abs().sum() > 0
    assert all(b.attn.fused_attn for b in tiny_vit.blocks)
    with pytest.raises(RuntimeError):  # the fused kernel has no double backward: why the switch exists
        _curvature_of_attention(tiny_vit, x)


def test_fused_and_explicit_attention_agree(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = tiny_vit(x)
        with _compat.non_fused_attention(tiny_vit):
            explicit = tiny_vit(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
