"""FLOPs of what actually runs in a (pruned) timm ViT: analytic, cross-checked with FlopCounterMode.

Convention (the same as `torch.utils.flop_counter.FlopCounterMode`, fvcore and most ViT papers'
"FLOPs" ×2): a multiply-add counts 2 FLOPs; matrix products (linear layers, attention, patch
convolution, selector matmuls) are counted, element-wise work (LayerNorm, softmax, GELU, residual
adds, gathers, biases) is not. Counts are per image.

PyTorch 2.13's FlopCounterMode has no formula for the CPU fused-attention kernel
(`aten._scaled_dot_product_flash_attention_for_cpu`), so it would silently miss all attention
FLOPs on CPU; `counted_flops` registers the standard SDPA formula for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils import flop_counter

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


def vit_shape(model: nn.Module) -> ViTShape:
    """The shape of a timm VisionTransformer (or of the head-sliced model inside a PrunedViT)."""
    from heart_lib.pruning.model import PrunedViT, check_model

    if isinstance(model, PrunedViT):
        model = model.model
    check_model(model)
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("analytic FLOPs do not cover attention pooling heads (global_pool='map'/'prr')")
    conv = model.patch_embed.proj
    blocks = []
    for block in model.blocks:
        attn = block.attn
        linears = tuple((m.in_features, m.out_features) for m in block.mlp.modules() if isinstance(m, nn.Linear))
        blocks.append(BlockShape(attn.num_heads, attn.head_dim, attn.qkv.in_features, linears,
                                 getattr(attn, "gate", None) is not None))
    heads = [model.head] + ([model.head_dist] if hasattr(model, "head_dist") else [])
    head_linears = tuple((h.in_features, h.out_features) for h in heads if isinstance(h, nn.Linear))
    return ViTShape(dim=model.embed_dim, in_chans=conv.in_channels, patch_size=tuple(conv.kernel_size),
                    img_size=tuple(model.patch_embed.img_size), prefix=int(model.num_prefix_tokens),
                    blocks=tuple(blocks), head_linears=head_linears,
                    class_token=getattr(model, "cls_token", None) is not None)


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


def base_shape(base: "nn.Module | str | ViTShape") -> ViTShape:
    """The shape of a model, a timm model name (built on the meta device) or a shape itself."""
    if isinstance(base, ViTShape):
        return base
    if isinstance(base, nn.Module):
        return vit_shape(base)
    import timm

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = timm.create_model(base, pretrained=False)
    return vit_shape(model)


def count_flops(model_or_config: nn.Module | PruningConfig | str, image_size: int | None = None, *,
                base: nn.Module | str | None = None, breakdown: bool = False,
                gate_hidden: int | None = None) -> int | dict[str, Any]:
    """Analytic per-image FLOPs of a (pruned) model, or of a config applied to `base`.

    model_or_config: a PrunedViT, a plain timm ViT, or a PruningConfig / its text form (then `base`,
    a model or a timm model name, gives the architecture). image_size: input side (default: the
    model's). For a PrunedViT with per-input budgets the mean over the inputs of its last forward.
    gate_hidden: width of the token gate for a gate config (else read from the config's gate file).
    """
    from heart_lib.pruning.model import PrunedViT

    if isinstance(model_or_config, PrunedViT):
        pruned = model_or_config
        shape = vit_shape(pruned)
        hidden = pruned.gate.hidden if pruned.gate is not None else None
        if pruned.config.per_input_budget is not None:
            if not pruned.record.counts:
                raise ValueError("a per-input-budget model has no fixed FLOPs: run it on inputs first")
            totals = [analytic_flops(shape, pruned.config, image_size, counts=c, gate_hidden=hidden)
                      for c in pruned.record.counts]
            result = dict(totals[0], total=int(round(sum(t["total"] for t in totals) / len(totals))))
        else:
            result = analytic_flops(shape, pruned.config, image_size, gate_hidden=hidden)
    elif isinstance(model_or_config, nn.Module):
        result = analytic_flops(vit_shape(model_or_config), None, image_size)
    else:
        config = PruningConfig.parse(model_or_config)
        if base is None:
            raise ValueError("count_flops(config) needs base=<model or timm model name> for the architecture")
        shape = base_shape(base)
        depth = len(shape.blocks)
        config.check(depth=depth, num_heads={i: b.heads for i, b in enumerate(shape.blocks)})
        hidden = gate_hidden
        if "gate" in catalogue.reducer(config.selector).needs and config.gate and hidden is None:
            from heart_lib.pruning.selectors import TokenGateSet
            hidden = TokenGateSet.load(config.gate).hidden
        result = analytic_flops(shape.without_heads(config.head_map), config, image_size, gate_hidden=hidden)
    return result if breakdown else int(result["total"])


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_SDPA_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


@torch.no_grad()
def counted_flops(model: nn.Module, image_size: int | None = None, batch: int = 1,
                  images: torch.Tensor | None = None, **forward_kwargs: Any) -> int:
    """Per-image FLOPs that FlopCounterMode counts on one forward of `model` (CPU SDPA included)."""
    if images is None:
        from heart_lib.pruning.model import PrunedViT

        inner = model.model if isinstance(model, PrunedViT) else model
        size = _pair(image_size) if image_size is not None else tuple(inner.patch_embed.img_size)
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(batch, inner.patch_embed.proj.in_channels, *size, generator=gen)
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_SDPA_MAPPING) as counter:
        model(images, **forward_kwargs)
    return int(math.ceil(counter.get_total_flops() / images.shape[0]))


def flops_reduction(pruned: int, dense: int) -> float:
    """Fraction of FLOPs removed."""
    return 1.0 - pruned / dense
