"""FLOPs of what actually runs in a (pruned) timm ViT: analytic, cross-checked with FlopCounterMode.

Convention (the same as `torch.utils.flop_counter.FlopCounterMode`, fvcore and most ViT papers'
"FLOPs" ×2): a multiply-add counts 2 FLOPs; matrix products (linear layers, attention, patch
convolution, selector matmuls) are counted, element-wise work (LayerNorm, softmax, GELU, residual
adds, gathers, biases) is not. Counts are per image.

PyTorch 2.13's FlopCounterMode has no formula for the CPU fused-attention kernel
(`aten._scaled_dot_product_flash_attention_for_cpu`), so it would silently miss all attention
FLOPs on CPU; `counted_flops` registers the standard SDPA formula for it.

The package keeps the two jobs apart: `analytic` counts a shape under a configuration (pure), and
`adapters` reads shapes off models and counts real forwards.
"""

from heart_lib.flops.analytic import BlockShape, ViTShape, analytic_flops, block_flops, flops_reduction
from heart_lib.flops.adapters import CPU_SDPA_MAPPING, base_shape, count_flops, counted_flops, vit_shape

__all__ = ["BlockShape", "ViTShape", "analytic_flops", "block_flops", "flops_reduction", "CPU_SDPA_MAPPING",
           "base_shape", "count_flops", "counted_flops", "vit_shape"]
