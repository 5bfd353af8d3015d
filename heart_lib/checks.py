"""Refuse non-finite numbers where they would otherwise pass silently into rankings and accuracies.

The gradient-based scores already name images with a non-finite loss; the heuristic scores
(CLS attention, norm, random) and the pruned forward have no loss to look at, so a NaN pixel or an
inf weight would give NaN scores or logits that sort and compare as if they were numbers.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch


class NonFiniteError(ValueError):
    """Scores or logits are NaN/inf for some images; `.images` lists their batch indices."""

    def __init__(self, what: str, images: list[int]):
        self.images = images
        shown = ", ".join(map(str, images[:20])) + (" ..." if len(images) > 20 else "")
        super().__init__(f"{what} are NaN/inf for {len(images)} image(s) at batch indices {shown}; check those "
                         "inputs (NaN/inf pixels?) and the model's weights")


def bad_images(*tensors: torch.Tensor) -> list[int]:
    """Batch indices (dimension 0) where any of `tensors` holds a NaN or an inf."""
    bad = None
    for t in tensors:
        row = ~torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(1)
        bad = row if bad is None else bad | row
    return [] if bad is None else bad.nonzero().flatten().tolist()


def require_finite_scores(tokens: Mapping[int, torch.Tensor], heads: Iterable[torch.Tensor], method: str) -> None:
    """Raise NonFiniteError naming the images whose `method` scores (per layer, unpadded) are not finite."""
    bad = bad_images(*tokens.values(), *heads)
    if bad:
        raise NonFiniteError(f"{method} scores", bad)


def finite_logits(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """`logits` of a pruned `model` in eval mode, or NonFiniteError naming the images that are NaN/inf.

    In training mode they pass: the fine-tuning loop names a non-finite loss with its step and batch.
    """
    bad = [] if model.training else bad_images(logits)
    if bad:
        selector = getattr(getattr(model, "config", None), "selector", None)
        raise NonFiniteError(f"logits of the pruned model (selector {selector})", bad)
    return logits
