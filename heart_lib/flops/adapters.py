"""FLOPs of models: the shape of a timm ViT (or of a model name, built on the meta device), the
analytic count of a (pruned) model or of a config applied to one, and what FlopCounterMode counts on
a real forward (with the formula PyTorch lacks for the CPU fused-attention kernel)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter

from heart_lib import catalogue
from heart_lib.flops.analytic import BlockShape, ViTShape, _pair, analytic_flops
from heart_lib.pruning.config import PruningConfig


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
