"""Peer token-reduction methods, written from their papers (no code copied; their licences forbid it).

- EViT (Liang et al., ICLR 2022, "Not All Patches Are What You Need"): in a reorganisation layer,
  after the attention, keep the k non-class tokens the class token attends to most (attention
  averaged over heads) and fuse the others into one token, their sum weighted by that attention.
- ToMe (Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster"): in each block, after the
  attention, split tokens alternately into sets A and B, match each A token to its most similar B
  token (cosine similarity of the keys averaged over heads), merge the r most similar pairs by a
  size-weighted average, and track token sizes so later attention is proportional
  (log size added to the attention logits).

Pure functions on tensors; the wrapper in `model.py` calls them between a block's attention and MLP.
"""

from __future__ import annotations

import torch

from heart_lib.timm_seam import split_qkv


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` [B, k] of `x` [B, n, ...]."""
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def evit_reduce(x: torch.Tensor, index: torch.Tensor, cls_attn: torch.Tensor, prefix: int, keep: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT token reorganisation: keep `keep` attentive tokens, fuse the rest into one.

    x [B, n, D] tokens (prefix first), index [B, n] original positions, cls_attn [B, n] class-token
    attention. Returns tokens [B, prefix + keep + 1, D] and their positions (-1 for the fused token).
    """
    body, body_attn, body_index = x[:, prefix:], cls_attn[:, prefix:], index[:, prefix:]
    if keep >= body.shape[1]:
        return x, index
    order = body_attn.argsort(dim=1, descending=True)
    top, rest = order[:, :keep], order[:, keep:]
    # The fused token carries the inattentive tokens' information in proportion to their attention.
    weights = _take(body_attn, rest).unsqueeze(-1)
    fused = (_take(body, rest) * weights).sum(dim=1, keepdim=True)
    out = torch.cat([x[:, :prefix], _take(body, top), fused], dim=1)
    fused_index = torch.full_like(body_index[:, :1], -1)
    return out, torch.cat([index[:, :prefix], _take(body_index, top), fused_index], dim=1)


def tome_merge(x: torch.Tensor, index: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, prefix: int, r: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching: merge `r` tokens away.

    x [B, n, D], index [B, n], size [B, n] (original tokens represented), keys [B, n, d] (mean over
    heads). Prefix tokens take no part (never merged, never absorb). Returns x, index, size with
    n - r tokens; a merged token keeps the position of its B (destination) token.
    """
    body, body_index, body_size, metric = x[:, prefix:], index[:, prefix:], size[:, prefix:], keys[:, prefix:]
    r = min(r, (body.shape[1] + 1) // 2)
    if r <= 0:
        return x, index, size
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    a_metric, b_metric = metric[:, ::2], metric[:, 1::2]
    similarity = a_metric @ b_metric.transpose(1, 2)  # [B, |A|, |B|]
    best, best_b = similarity.max(dim=-1)
    edges = best.argsort(dim=-1, descending=True)
    src, keep_a = edges[:, :r], edges[:, r:]
    dst = best_b.gather(1, src)

    a_x, b_x = body[:, ::2], body[:, 1::2]
    a_size, b_size = body_size[:, ::2], body_size[:, 1::2]
    # Size-weighted average: sum size*x into the destination, then divide by the summed size.
    b_sum = b_x * b_size.unsqueeze(-1)
    b_sum = b_sum.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, body.shape[-1]),
                              _take(a_x * a_size.unsqueeze(-1), src))
    b_size = b_size.scatter_add(1, dst, a_size.gather(1, src))
    b_x = b_sum / b_size.unsqueeze(-1)

    out = torch.cat([x[:, :prefix], _take(a_x, keep_a), b_x], dim=1)
    out_index = torch.cat([index[:, :prefix], body_index[:, ::2].gather(1, keep_a), body_index[:, 1::2]], dim=1)
    out_size = torch.cat([size[:, :prefix], a_size.gather(1, keep_a), b_size], dim=1)
    return out, out_index, out_size


def mean_keys(qkv: torch.Tensor, num_heads: int, head_dim: int, k_norm: torch.nn.Module | None = None) -> torch.Tensor:
    """Keys averaged over heads [B, n, head_dim], from a captured `attn.qkv` output [B, n, 3·H·d]."""
    k = split_qkv(qkv, num_heads, head_dim)[:, :, 1]
    if k_norm is not None:
        k = k_norm(k)
    return k.mean(dim=2)
