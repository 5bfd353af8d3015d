"""Physical head removal: slice timm `Attention` weights so fewer heads actually run.

Masking a head (zeroing its output) changes no cost; slicing the rows of `qkv` and the columns of
`proj` that belong to a head removes its work. The sliced module stays a timm `Attention` with
`num_heads`, `head_dim` and `attn_dim` consistent, so timm's own forward (fused SDPA included) runs.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from timm.layers import Attention

from heart_lib import timm_seam


def check_sliceable(attn: nn.Module, where: str = "attention") -> None:
    """Raise ValueError when `attn` is not a timm Attention whose heads can be sliced independently."""
    if not isinstance(attn, Attention):
        raise ValueError(f"{where}: head slicing supports timm.layers.Attention, got {type(attn).__name__}")
    if not isinstance(attn.norm, nn.Identity):
        # A norm over all heads' outputs (scale_norm) couples the heads: removing one changes the others.
        raise ValueError(f"{where}: scale_norm attention normalises across heads; its heads cannot be sliced")


def kept_channels(num_heads: int, head_dim: int, remove: Iterable[int]) -> torch.Tensor:
    """Channel indices (within one of q/k/v, or the proj input) of the heads that stay."""
    remove = set(int(h) for h in remove)
    keep = [h for h in range(num_heads) if h not in remove]
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep])


def _sliced_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = layer.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = layer.bias
    if bias is not None and rows is not None:
        bias = bias.detach()[rows]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(layer.training)
    return new


def slice_heads(attn: Attention, remove: Iterable[int]) -> Attention:
    """Remove heads `remove` from `attn` in place (new, smaller qkv/proj Linears); returns `attn`."""
    remove = sorted(set(int(h) for h in remove))
    check_sliceable(attn)
    if not remove:
        return attn
    heads, head_dim, attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
    bad = [h for h in remove if not 0 <= h < heads]
    if bad:
        raise ValueError(f"heads {bad} out of range: the attention has {heads} heads (0..{heads - 1})")
    if len(remove) >= heads:
        raise ValueError(f"cannot remove all {heads} heads of an attention layer; keep at least one")
    channels = kept_channels(heads, head_dim, remove)
    attn.qkv = _sliced_linear(attn.qkv, rows=timm_seam.qkv_rows(channels, attn_dim))
    attn.proj = _sliced_linear(attn.proj, cols=channels)
    if getattr(attn, "gate", None) is not None:
        attn.gate = _sliced_linear(attn.gate, rows=channels)
    attn.num_heads = heads - len(remove)
    attn.attn_dim = attn.num_heads * head_dim
    return attn


def mask_heads_hook(remove: Iterable[int], num_heads: int, head_dim: int):
    """A forward pre-hook for `attn.proj` that zeroes the outputs of heads `remove` (the masked reference)."""
    remove = sorted(set(int(h) for h in remove))

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]):
        x = args[0].clone()
        shaped = x.view(*x.shape[:-1], num_heads, head_dim)
        shaped[..., remove, :] = 0
        return (x,) + tuple(args[1:])

    return hook
