"""Peer token-reduction methods, written from their papers (no code copied; their licences forbid it).

- EViT (Liang et al., ICLR 2022, "Not All Patches Are What You Need"): in a reorganisation layer,
  after the attention, keep the k non-class tokens the class token attends to most (attention
  averaged over heads) and fuse the others into one token, their sum weighted by that attention.
- ToMe (Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster"): in each block, after the
  attention, split tokens alternately into sets A and B, match each A token to its most similar B
  token (cosine similarity of the keys averaged over heads), merge the r most similar pairs by a
  size-weighted average, and track token sizes so later attention is proportional
  (log size added to the attention logits). Where the paper leaves details open (which set the
  class token joins, the order of the tokens after a merge, the cap on r) we follow its reference
  code (facebookresearch/ToMe, tome/merge.py), read but not copied: it is CC BY-NC.

Pure functions on tensors; the wrapper in `model.py` calls them between a block's attention and MLP.
"""

from __future__ import annotations

import math

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
    """ToMe bipartite soft matching: merge `r` tokens away, as the paper's reference code does.

    x [B, n, D], index [B, n], size [B, n] (original tokens represented), keys [B, n, d] (mean over
    heads). Tokens alternate between set A (even positions, prefix tokens counted) and set B (odd
    positions). Prefix tokens never merge: one in A is never a source, one in B never a destination.
    Each A token is matched to its most similar B token (cosine similarity of the keys); the `r` best
    matched A tokens are averaged into their partners, weighted by size. At most half of the
    non-prefix tokens merge (⌊(n - prefix)/2⌋). Returns x, index, size with n - r tokens, ordered:
    prefix tokens, the unmerged A tokens in their original order, then the B tokens; a merged token
    keeps the position of its B (destination) token.
    """
    n = x.shape[1]
    r = min(r, (n - prefix) // 2)
    if r <= 0:
        return x, index, size
    positions = torch.arange(n, device=x.device)
    a_pos, b_pos = positions[0::2], positions[1::2]
    metric = keys / keys.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    similarity = metric[:, a_pos] @ metric[:, b_pos].transpose(1, 2)  # [B, |A|, |B|]
    similarity[:, a_pos < prefix, :] = -math.inf  # a prefix token in A never merges away
    similarity[:, :, b_pos < prefix] = -math.inf  # nothing merges into a prefix token in B
    best, best_b = similarity.max(dim=-1)
    edges = best.argsort(dim=-1, descending=True)
    src, unmerged = edges[:, :r], edges[:, r:].sort(dim=-1).values
    dst = best_b.gather(1, src)

    a_x, b_x = x[:, a_pos], x[:, b_pos]
    a_size, b_size = size[:, a_pos], size[:, b_pos]
    # Size-weighted average: sum size*x into the destination, then divide by the summed size.
    b_sum = (b_x * b_size.unsqueeze(-1)).scatter_add(
        1, dst.unsqueeze(-1).expand(-1, -1, x.shape[-1]), _take(a_x * a_size.unsqueeze(-1), src))
    b_size = b_size.scatter_add(1, dst, a_size.gather(1, src))
    b_x = b_sum / b_size.unsqueeze(-1)

    out = torch.cat([_take(a_x, unmerged), b_x], dim=1)
    out_index = torch.cat([index[:, a_pos].gather(1, unmerged), index[:, b_pos]], dim=1)
    out_size = torch.cat([a_size.gather(1, unmerged), b_size], dim=1)
    # Prefix tokens first, in their original order (the reference code does this for class and
    # distillation tokens); every other token keeps its place.
    first = torch.cat([(a_pos < prefix).nonzero().flatten(), len(a_pos) - r + (b_pos < prefix).nonzero().flatten()])
    rest = torch.ones(n - r, dtype=torch.bool, device=x.device)
    rest[first] = False
    order = torch.cat([first, rest.nonzero().flatten()])
    return out[:, order], out_index[:, order], out_size[:, order]


def mean_keys(qkv: torch.Tensor, num_heads: int, head_dim: int, k_norm: torch.nn.Module | None = None) -> torch.Tensor:
    """Keys averaged over heads [B, n, head_dim], from a captured `attn.qkv` output [B, n, 3·H·d]."""
    k = split_qkv(qkv, num_heads, head_dim)[:, :, 1]
    if k_norm is not None:
        k = k_norm(k)
    return k.mean(dim=2)
