"""Terms the whole book uses with one meaning, defined once here.

"40 % token pruning" is the paper's wording for its fine-tuning claim (C5). The book reads it as:
40 % of the remaining patch tokens are dropped at each of layers 3, 6 and 9 (keep ratio 0.6,
compounding, EViT's convention); the class token always stays. The FLOPs this saves depend on the
model and on what the selector itself costs, so the pages compute them (`tokens_40_flops_saved`).
"""

from __future__ import annotations

from heart_lib.pruning.config import PruningConfig

TOKENS_40 = PruningConfig(layers=(3, 6, 9), keep=(0.6,))
TOKENS_40_NAME = "40 % token pruning"


def tokens_40_text() -> str:
    """The definition in words, for captions and tables."""
    layers = ", ".join(str(l) for l in TOKENS_40.layers)
    return (f"{TOKENS_40_NAME}: keep {TOKENS_40.keep[0]:g} of the patch tokens at each of layers {layers} "
            f"(40 % of the remaining tokens dropped at each)")


def tokens_40_flops_saved(model: str = "deit_tiny_patch16_224", gate_hidden: int | None = None,
                          **config: object) -> float:
    """The fraction of the unpruned model's FLOPs that 40 % token pruning saves on `model` (a timm
    name or a model), with `config` overriding the selector and its options."""
    from heart_lib.planning import flops_reduction_on

    return flops_reduction_on(model, gate_hidden)(TOKENS_40.replace(**config))
