"""The fine-tuning loop: one function, `train`, for one process or many (torchrun + DDP).

Token selection stays dynamic during training: the pruned model's selector runs inside its forward
pass on every batch, so each image keeps its own tokens, and gradients flow through the kept
tokens (the gather is differentiable; the ranking itself is not, and needs no gradient).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from heart_lib import results
from heart_lib.finetune import checkpoint as ckpt
from heart_lib.finetune import distributed
from heart_lib.finetune.inputs import SeededAugment
from heart_lib.finetune.recipe import RESUME_FREE, TrainConfig, lr_factor, training_loss
from heart_lib.progress import progress

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.csv"
TIME_COLUMNS = ("train_seconds", "images_per_second", "eval_seconds")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf; the message names the step and the batch. The last
    checkpoint written before it (if any) is left as it was."""


@dataclass
class TrainResult:
    model: nn.Module  # the trained model (not DDP-wrapped), in eval mode, on the training device
    history: pd.DataFrame  # one row per completed epoch
    finished: bool  # False when stopped early by `stop_after`
    step: int  # optimiser steps taken in total (over all calls, resumes included)
    resumed_from: int | None  # the step of the checkpoint this call resumed from, if any


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `mode` on `device` (None = full fp32)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("amp = 'fp16' needs a CUDA device (fp16 autocast with loss scaling); use 'bf16' or 'off' on CPU")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only, not on biases, norms, position embeddings or
    class tokens (the usual ViT practice; decaying those hurts and has no regularising purpose)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "dist_token", "reg_token"))
         else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _evaluate(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
              dtype: torch.dtype | None) -> dict[str, float]:
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    loader = DataLoader(dataset, batch_size=batch_size)
    with torch.no_grad(), _autocast(device, dtype):
        for images, labels in progress(loader, "evaluate", len(loader)):
            labels = torch.as_tensor(labels).to(device)
            logits = model(images.to(device)).float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            n += len(labels)
    return {"eval_top1": correct / n, "eval_loss": loss_sum / n, "eval_images": n}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(model: nn.Module, train_set: Dataset, config: TrainConfig, out_dir: str | Path | None = None, *,
          transform: Callable | None = None, teacher: nn.Module | None = None, eval_set: Dataset | None = None,
          device: str | torch.device | None = None, resume: bool = True, fingerprint: dict[str, Any] | None = None,
          desc: str = "fine-tune") -> TrainResult:
    """Fine-tune `model` (a timm ViT or a pruned `PrunedViT`) in place on `train_set`.

    train_set: (image, label) pairs; `transform` (if any) is applied to each image under a seed
    derived from (config.seed, epoch, index), so augmentation is reproducible and resumable.
    teacher: the unpruned model, used when config.distill_alpha > 0. eval_set: evaluated after
    every epoch (main process; None = no evaluation). out_dir: checkpoints and the per-epoch table
    (`history.csv`) go here (main process only); with resume=True an existing checkpoint is
    resumed, unless it was written by another configuration (CheckpointMismatch).
    fingerprint: extra items identifying the run (e.g. the dataset's name), checked on resume.
    When a torchrun process group is initialised, the model is wrapped in DDP and the data are
    sharded; `config.batch_size` stays the global batch.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    ctx = distributed.current(distributed.resolve_device(device))
    dev = ctx.device
    if config.batch_size % ctx.world_size:
        raise ValueError(f"batch_size = {config.batch_size}: the global batch must divide evenly over "
                         f"{ctx.world_size} processes")
    local_batch = config.batch_size // ctx.world_size
    if config.distill_alpha > 0 and teacher is None:
        raise ValueError(f"distill_alpha = {config.distill_alpha} needs a teacher model (the unpruned model)")
    dtype = amp_dtype(config.amp, dev)
    out = Path(out_dir) if out_dir is not None else None

    data = SeededAugment(train_set, transform, config.seed)
    sampler = distributed.ResumableSampler(data, ctx, seed=config.seed)
    steps_per_epoch = sampler.num_samples // local_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(train_set)} images, fewer than one global batch of "
                         f"{config.batch_size}; lower batch_size")
    total_steps = config.epochs * steps_per_epoch
    warmup = min(total_steps, int(round(config.warmup_epochs * steps_per_epoch)))

    # A gate selector is trained separately (pruning.train_token_gate); fine-tuning leaves it fixed.
    gate = getattr(model, "gate", None)
    if isinstance(gate, nn.Module):
        gate.requires_grad_(False)
    model.to(dev)
    if teacher is not None:
        teacher.to(dev).eval().requires_grad_(False)

    fp = {**{k: v for k, v in config.to_dict().items() if k not in RESUME_FREE},
          **ckpt.model_fingerprint(model), "train_images": len(train_set), "steps_per_epoch": steps_per_epoch,
          "transform": repr(transform), "teacher": ckpt.model_fingerprint(teacher)["state_shapes"] if teacher else None,
          **(fingerprint or {})}

    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
    min_ratio = config.min_lr / config.lr if config.lr > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(min(s, total_steps - 1), total_steps, warmup, min_ratio))
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)

    step, epoch, batch = 0, 0, 0
    sums = np.zeros(4)  # loss·n, correct, n, seconds of the current epoch
    history: list[dict[str, Any]] = []
    resumed_from = None
    _seed_everything(config.seed + ctx.rank)  # ranks draw independent dropout / drop-path noise
    path = out / CHECKPOINT if out is not None else None
    if resume and path is not None and path.is_file():
        blob = ckpt.load(path)
        ckpt.check_compatible(blob, fp, path)
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        scaler.load_state_dict(blob["scaler"])
        step, epoch, batch = blob["step"], blob["epoch"], blob["batch"]
        sums = np.asarray(blob["sums"], dtype=float)
        history = list(blob["history"])
        states = blob["rng"]
        # With another number of processes the per-rank random streams cannot be matched; the
        # data order still is (it depends on the global step only).
        if len(states) == ctx.world_size:
            ckpt.set_rng_state(states[ctx.rank], model)
        resumed_from = step

    ddp = model
    if ctx.distributed:
        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def save() -> None:
        states = distributed.gather_objects(ckpt.rng_state(model), ctx)  # every rank takes part
        if ctx.is_main and path is not None:
            ckpt.save(path, {"fingerprint": fp, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                             "epoch": epoch, "batch": batch, "sums": sums.tolist(), "history": history,
                             "rng": states, "world_size": ctx.world_size})

    taken = 0
    while epoch < config.epochs:
        sampler.set_position(epoch, batch * local_batch)
        data.set_epoch(epoch)
        order = list(iter(sampler))  # this rank's sample indices, for naming a bad batch
        # A private generator: creating a DataLoader iterator otherwise draws a seed from the global
        # torch stream, which would shift dropout noise between a resumed and an uninterrupted run.
        loader = DataLoader(data, batch_size=local_batch, sampler=sampler, drop_last=True,
                            num_workers=config.workers, pin_memory=dev.type == "cuda",
                            generator=torch.Generator().manual_seed(config.seed + epoch))
        ddp.train()
        start = time.perf_counter()
        bar = progress(loader, f"{desc} epoch {epoch + 1}/{config.epochs}", len(loader))
        for images, labels in bar:
            images = images.to(dev, non_blocking=True)
            labels = torch.as_tensor(labels).to(dev, non_blocking=True)
            with _autocast(dev, dtype):
                logits = ddp(images)
                teacher_logits = None
                if config.distill_alpha > 0:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
            loss = training_loss(logits, labels, config, teacher_logits)
            finite = bool(torch.isfinite(loss))
            stats = distributed.all_sum(torch.tensor(
                [float(loss.detach()) * len(labels) if finite else 0.0,
                 float((logits.detach().argmax(-1) == labels).sum()), float(len(labels)), float(not finite)],
                dtype=torch.float64), ctx)
            if stats[3] > 0:
                local = batch * local_batch - sampler.start
                where = order[local:local + local_batch]
                raise NonFiniteLossError(
                    f"non-finite training loss at step {step + 1} (epoch {epoch + 1}, batch {batch + 1} of "
                    f"{steps_per_epoch}; process {ctx.rank} of {ctx.world_size} held dataset samples "
                    f"{where[:16]}{' …' if len(where) > 16 else ''}); stopped before the optimiser step. "
                    + (f"The last good checkpoint ({path}) is kept." if path is not None and path.is_file()
                       else "No checkpoint was written."))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step, batch, taken = step + 1, batch + 1, taken + 1
            sums[:3] += stats[:3].numpy()
            if config.checkpoint_every and step % config.checkpoint_every == 0 and batch < steps_per_epoch:
                sums[3] += time.perf_counter() - start
                start = time.perf_counter()
                save()
            if config.stop_after is not None and taken >= config.stop_after:
                return TrainResult(model.eval(), pd.DataFrame(history), False, step, resumed_from)
        sums[3] += time.perf_counter() - start
        row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": sums[0] / sums[2], "train_top1": sums[1] / sums[2], "train_images": int(sums[2]),
               "train_seconds": sums[3], "images_per_second": sums[2] / sums[3] if sums[3] > 0 else math.nan}
        if eval_set is not None and config.eval_every_epoch:
            if ctx.is_main:
                t0 = time.perf_counter()
                row.update(_evaluate(model, eval_set, local_batch, dev, dtype))
                row["eval_seconds"] = time.perf_counter() - t0
            distributed.barrier(ctx)
        history.append(row)
        epoch, batch, sums = epoch + 1, 0, np.zeros(4)
        save()
        if ctx.is_main and out is not None:
            results.write_table(out / HISTORY, pd.DataFrame(history), meta={"config": config.to_dict(),
                                                                            "fingerprint": fp})
    return TrainResult(model.eval(), pd.DataFrame(history), True, step, resumed_from)
