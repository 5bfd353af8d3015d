"""The timm seam reproduces timm's own forward exactly on the five model families of the gate tests."""

from __future__ import annotations

import pytest
import torch

import timm

from heart_lib import timm_seam
from heart_lib._compat import non_fused_attention
from heart_lib.pruning.heads import kept_channels

from test_gates import FAMILIES


@pytest.mark.parametrize("name,prefix,kw", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_seam_matches_timm_forward(name, prefix, kw):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, **kw).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = timm_seam.embed(model, x)
        assert tokens.shape == (2, 16 + prefix, model.embed_dim)
        stream = tokens
        for block in model.blocks:  # the two halves are the block
            stream = timm_seam.mlp_half(block, timm_seam.attention_half(block, stream))
        assert torch.equal(model.forward_head(model.norm(stream)), model(x))

        # the qkv layout: q·kᵀ from the captured qkv output is the probe's attention on the explicit path
        attn = model.blocks[1].attn
        captured = {}
        handles = [attn.qkv.register_forward_hook(lambda m, a, out: captured.__setitem__("qkv", out)),
                   timm_seam.attention_probe(attn).register_forward_hook(
                       lambda m, a, out: captured.__setitem__("probs", out))]
        try:
            with non_fused_attention(model):
                model(x)
        finally:
            for handle in handles:
                handle.remove()
        parts = timm_seam.split_qkv(captured["qkv"], attn.num_heads, attn.head_dim)
        q, k = attn.q_norm(parts[:, :, 0].transpose(1, 2)), attn.k_norm(parts[:, :, 1].transpose(1, 2))
        probs = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
        assert (probs - captured["probs"]).abs().max() < 1e-5

        # qkv rows of one head's channels are that head's q, k and v outputs
        channels = kept_channels(attn.num_heads, attn.head_dim, range(1, attn.num_heads))  # head 0 only
        rows = timm_seam.qkv_rows(channels, attn.attn_dim)
        inp = torch.randn(3, attn.qkv.in_features)
        head0 = timm_seam.split_qkv(attn.qkv(inp)[None], attn.num_heads, attn.head_dim)[0, :, :, 0]
        assert torch.equal(torch.nn.functional.linear(inp, attn.qkv.weight[rows], attn.qkv.bias[rows]).view(3, 3, -1),
                           head0)
