"""Inputs of fine-tuning: models at a chosen resolution, transforms, reproducible augmentation.

Augmentation draws its randomness from (seed, epoch, sample index) alone, never from a global
stream, so an image is augmented identically whatever the number of processes or data workers and
whether or not the run was resumed half-way through an epoch.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

import heart_lib  # noqa: F401  (torchvision import workaround before timm/torchvision)
from heart_lib import data as hdata
from heart_lib import models


def model_at_resolution(name: str, weights: str = "none", num_classes: int | None = None,
                        image_size: int | None = None, seed: int = 0, **timm_kwargs: Any) -> torch.nn.Module:
    """`models.create_model` at another input side: the learned position embeddings are resampled
    (bicubic, by timm's `set_input_size`), the patch embedding is unchanged.

    Checkpoints are loaded strictly at their own size first, so the weights are exactly the
    published ones before resampling.
    """
    model = models.create_model(name, weights, num_classes, seed=seed, **timm_kwargs)
    if image_size is None:
        return model
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size = {image_size!r}: must be a positive integer or None")
    patch = model.patch_embed.patch_size[0]
    if image_size % patch:
        raise ValueError(f"image_size = {image_size}: must be a multiple of the patch size {patch}")
    if tuple(model.patch_embed.img_size) != (image_size, image_size):
        model.set_input_size(img_size=image_size)
    return model.eval()


def input_size(model: torch.nn.Module) -> int:
    inner = getattr(model, "model", model)  # a PrunedViT wraps the timm model
    return int(inner.patch_embed.img_size[0])


def normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    inner = getattr(model, "model", model)
    cfg = getattr(inner, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def image_transform(model: torch.nn.Module, train: bool, crop_pct: float | None = None,
                    min_scale: float = 0.35) -> Callable:
    """PIL image -> normalised tensor at the model's input side.

    Training: random resized crop (area scale in [min_scale, 1]) and horizontal flip. Evaluation:
    resize the short side to side/crop_pct and centre-crop (crop_pct None: the model's own, e.g.
    0.875; 1.0 for small images such as CIFAR-10 that should not be cropped).
    """
    from torchvision import transforms as T

    size = input_size(model)
    mean, std = normalisation(model)
    inner = getattr(model, "model", model)
    if crop_pct is None:
        crop_pct = float((getattr(inner, "pretrained_cfg", {}) or {}).get("crop_pct", 0.875))
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct = {crop_pct}: must be in (0, 1]")
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if train:
        return T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0),
                                              interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), *tail])
    return T.Compose([T.Resize(int(round(size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), *tail])


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix-style), stable across processes and runs."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class SeededAugment(Dataset):
    """`dataset` (returning PIL images or tensors) with `transform` applied under a per-sample seed.

    Call `set_epoch(e)` before each epoch (with persistent data workers this would not reach the
    workers, so the loop never uses persistent workers).
    """

    def __init__(self, dataset: Dataset, transform: Callable | None, seed: int = 0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        if self.transform is None:
            return image, label
        seed = _mix(self.seed, self.epoch, index)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                out = self.transform(image)
            finally:
                random.setstate(py_state)
        return out, label


def materialize(dataset: Dataset, batch_size: int = 256) -> hdata.TensorImages:
    """Decode and transform every image once (deterministic transforms only)."""
    loader = hdata.make_loader(dataset, batch_size)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(torch.as_tensor(y))
    return hdata.TensorImages(torch.cat(images), torch.cat(labels))
