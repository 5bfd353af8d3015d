"""The fine-tuning recipe: its parameters, the learning-rate schedule and the loss (pure functions).

book/method.md, 'Fine-tuning and edge measurements': AdamW, cosine schedule with linear warm-up, weight decay, label smoothing and
optional distillation from the unpruned model. The paper gives only "100 epochs"; every other
choice is a parameter here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

AMP_MODES = ("auto", "off", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a fine-tuning run computes (`batch_size` is the *global* batch).

    Fields after `seed` change how a run is executed, not what it computes, so a checkpoint may be
    resumed with other values of them (see `RESUME_FREE`).
    """

    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 0.1
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    distill_alpha: float = 0.0  # weight of the distillation term; 0 = labels only, 1 = teacher only
    distill_temperature: float = 1.0
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    amp: str = "auto"  # auto: bf16 (or fp16 + loss scaling) on CUDA, off on CPU
    seed: int = 0
    # --- execution only
    checkpoint_every: int = 0  # optimiser steps between mid-epoch checkpoints; 0 = at epoch ends only
    stop_after: int | None = None  # stop after this many steps of *this* call (simulates a kill; tests)
    workers: int = 0
    eval_every_epoch: bool = True

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} = {getattr(self, name)!r}: {allowed}")

        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise bad("epochs", "must be a positive integer")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad("batch_size", "must be a positive integer (the global batch over all processes)")
        for name in ("lr", "min_lr"):
            if not (getattr(self, name) >= 0) or math.isinf(getattr(self, name)):
                raise bad(name, "must be a finite non-negative number")
        if self.min_lr > self.lr:
            raise bad("min_lr", f"must not exceed lr = {self.lr}")
        if not (0 <= self.warmup_epochs <= self.epochs):
            raise bad("warmup_epochs", f"must be in [0, epochs = {self.epochs}]")
        if not (self.weight_decay >= 0):
            raise bad("weight_decay", "must be non-negative")
        if not (0 <= self.label_smoothing < 1):
            raise bad("label_smoothing", "must be in [0, 1)")
        if not (0 <= self.distill_alpha <= 1):
            raise bad("distill_alpha", "must be in [0, 1]")
        if not (self.distill_temperature > 0):
            raise bad("distill_temperature", "must be positive")
        if self.grad_clip is not None and not (self.grad_clip > 0):
            raise bad("grad_clip", "must be positive or None")
        if self.amp not in AMP_MODES:
            raise bad("amp", f"allowed values are {list(AMP_MODES)}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise bad("checkpoint_every", "must be a non-negative integer (0 = only at epoch ends)")
        if self.stop_after is not None and (not isinstance(self.stop_after, int) or self.stop_after < 1):
            raise bad("stop_after", "must be a positive integer or None")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise bad("workers", "must be a non-negative integer")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields a resumed run may change: they do not alter the computed result.
RESUME_FREE = ("checkpoint_every", "stop_after", "workers", "eval_every_epoch")


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at optimiser step `step` (0-based): linear warm-up, then cosine.

    Warm-up rises linearly from 1/(warmup+1) to 1 over `warmup_steps` steps; the cosine then falls
    from 1 to `min_ratio` at the last step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps = {total_steps}: must be positive")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps = {warmup_steps}: must be in [0, total_steps = {total_steps}]")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay = total_steps - warmup_steps
    # A single post-warm-up step runs at the full rate (there is nothing to decay towards).
    progress = (step - warmup_steps) / (decay - 1) if decay > 1 else 0.0
    progress = min(1.0, progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton's soft-target loss: T² · KL(softmax(teacher/T) ‖ softmax(student/T)), mean over the batch."""
    t = temperature
    log_p = F.log_softmax(student.float() / t, dim=-1)
    log_q = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
                  teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """(1 − α) · label-smoothed cross-entropy + α · distillation (α = config.distill_alpha)."""
    alpha = config.distill_alpha
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
    if alpha == 0:
        return ce
    if teacher_logits is None:
        raise ValueError(f"distill_alpha = {alpha} needs the teacher's logits")
    kd = distillation_loss(logits, teacher_logits, config.distill_temperature)
    return (1 - alpha) * ce + alpha * kd
