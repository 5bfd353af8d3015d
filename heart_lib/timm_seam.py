"""The one place that relies on timm's internals (timm 1.0's VisionTransformer, Block, Attention).

Everything else calls these functions, so a timm upgrade that moves an internal breaks here, and
`tests/test_timm_seam.py` checks each one against timm's own forward on five model families.

- `embed`: patch embedding, position embedding and prefix tokens (`_pos_embed`), patch dropout,
  pre-norm: the residual stream entering block 0.
- `attention_half` / `mlp_half`: the two residual halves of a `Block` (a reducer sits between them).
- `split_qkv` / `qkv_rows`: the layout of `attn.qkv`'s output, (3, heads, head_dim) per token.
- `attention_probe`: the module whose output is the attention probabilities on timm's explicit
  path (`attn_drop`, applied to the softmax), or None.
"""

from __future__ import annotations

import torch
from torch import nn


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The residual stream at the input of block 0 of a timm VisionTransformer, [B, N, D]."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def attention_half(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """x + attention residual of a timm Block (`attn_mask` adds to the attention logits)."""
    return x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=attn_mask)))


def mlp_half(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x + MLP residual of a timm Block."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def split_qkv(qkv: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """A captured `attn.qkv` output [B, n, 3·H·d] as [B, n, 3, H, d] (q, k, v before q/k norms)."""
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, num_heads, head_dim)


def qkv_rows(channels: torch.Tensor, attn_dim: int) -> torch.Tensor:
    """Rows of `attn.qkv`'s weight for the given channels of each of q, k and v (row j·attn_dim + c)."""
    return torch.cat([channels + j * attn_dim for j in range(3)])


def attention_probe(attn: nn.Module) -> nn.Module | None:
    """The submodule whose output is the softmax attention on timm's explicit path, if any."""
    probe = getattr(attn, "attn_drop", None)
    return probe if isinstance(probe, nn.Module) else None
