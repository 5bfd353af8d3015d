"""Analytic FLOPs of a ViT shape under a pruning configuration: pure counting, no model.

`ViTShape` says everything the count needs about an architecture; `analytic_flops` counts one image
through it, token counts per block included (see the package docstring for the convention).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from heart_lib import catalogue
from heart_lib.catalogue import FlopsSite
from heart_lib.pruning.config import PruningConfig, kept_tokens, token_plan


@dataclass(frozen=True)
class BlockShape:
    heads: int
    head_dim: int
    dim: int
    mlp_linears: tuple[tuple[int, int], ...]  # (in, out) of each Linear of the MLP
    gated: bool = False


@dataclass(frozen=True)
class ViTShape:
    """Everything the analytic count needs about an architecture (after head slicing)."""

    dim: int
    in_chans: int
    patch_size: tuple[int, int]
    img_size: tuple[int, int]
    prefix: int
    blocks: tuple[BlockShape, ...]
    head_linears: tuple[tuple[int, int], ...]
    class_token: bool = True  # else CLS attention averages every query row (selectors.class_attention)

    def num_patches(self, image_size: int | tuple[int, int] | None = None) -> int:
        h, w = _pair(image_size) if image_size is not None else self.img_size
        return (h // self.patch_size[0]) * (w // self.patch_size[1])

    def without_heads(self, heads: Mapping[int, tuple[int, ...]]) -> "ViTShape":
        blocks = list(self.blocks)
        for layer, removed in heads.items():
            blocks[layer] = replace(blocks[layer], heads=blocks[layer].heads - len(removed))
        return replace(self, blocks=tuple(blocks))


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def block_flops(b: BlockShape, n_attn: int, n_mlp: int) -> dict[str, int]:
    """FLOPs of one block with `n_attn` tokens in its attention and `n_mlp` in its MLP."""
    attn_dim = b.heads * b.head_dim
    out = {
        "qkv": 2 * n_attn * b.dim * 3 * attn_dim,
        "attention": 4 * b.heads * n_attn * n_attn * b.head_dim,  # q·kᵀ and attn·v
        "proj": 2 * n_attn * attn_dim * b.dim,
        "mlp": sum(2 * n_mlp * i * o for i, o in b.mlp_linears),
    }
    if b.gated:
        out["qkv"] += 2 * n_attn * b.dim * attn_dim
    return out


def analytic_flops(shape: ViTShape, config: PruningConfig | None = None, image_size: int | None = None,
                   counts: list[tuple[int, int]] | None = None, gate_hidden: int | None = None) -> dict[str, Any]:
    """Per-image FLOPs by component: {'total', 'patch_embed', 'blocks', 'head', 'selector', 'per_block'}.

    `shape` must already reflect removed heads. `counts` (tokens per block, prefix included, for
    attention and MLP) overrides the plan derived from `config` (per-input budgets record them).
    """
    config = config or PruningConfig()
    n_patches = shape.num_patches(image_size)
    depth = len(shape.blocks)
    if counts is None:
        counts = token_plan(config, n_patches, depth, shape.prefix)
    if len(counts) != depth:
        raise ValueError(f"counts has {len(counts)} entries for {depth} blocks")
    patch = 2 * n_patches * shape.dim * shape.in_chans * shape.patch_size[0] * shape.patch_size[1]
    per_block = [block_flops(b, na, nm) for b, (na, nm) in zip(shape.blocks, counts)]
    # The reducer's own work (scoring, matching) where it actually reduces tokens; its catalogue entry counts it.
    entry = catalogue.reducer(config.selector)
    hidden = gate_hidden if gate_hidden is not None else 64
    keep = config.keep_map
    inputs = [n_patches + shape.prefix] + [nm for _, nm in counts[:-1]]  # tokens entering each block
    selector = 0
    for layer in config.layers:
        n_in = inputs[layer] if entry.drops else counts[layer][0]
        if _reduces(n_in - shape.prefix, keep[layer], config):
            selector += entry.extra_flops(FlopsSite(shape, layer, counts, n_in, hidden))
    head = sum(2 * i * o for i, o in shape.head_linears)
    blocks_total = sum(sum(d.values()) for d in per_block)
    return {"total": patch + blocks_total + head + selector, "patch_embed": patch, "blocks": blocks_total,
            "head": head, "selector": selector, "per_block": per_block, "counts": counts}


def _reduces(body: int, keep: float, config: PruningConfig) -> bool:
    """Whether a reduction layer actually removes tokens (the wrapper skips scoring when it does not)."""
    return kept_tokens(body, keep, config.selector, config.fuse) < body or config.per_input_budget is not None


def flops_reduction(pruned: int, dense: int) -> float:
    """Fraction of FLOPs removed."""
    return 1.0 - pruned / dense
