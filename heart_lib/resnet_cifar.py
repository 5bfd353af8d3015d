"""CIFAR ResNets (He et al. 2016, section 4.2) and the recipe that trains them here from scratch.

timm has no CIFAR ResNet-20/56: these are the 6n+2-layer networks of the paper (three stages of n
basic blocks with 16/32/64 channels on 32×32 inputs, global average pooling, one linear layer),
with option-A shortcuts (identity, stride-2 subsampling and zero-padded channels), so the only
weights are the convolutions, the batch norms and the classifier. ResNet-20: n = 3; ResNet-56: n = 9.

The training recipe is the paper's (SGD, momentum 0.9, weight decay 1e-4, learning rate 0.1 divided
by 10 at 50 % and 75 % of the schedule, random crop with 4-pixel padding and horizontal flips),
with the number of epochs and the training subset as parameters, so a CPU can run a short version.
Images are decoded once and held as one uint8 tensor; augmentation is done on tensors with a seeded
generator, so a run is reproducible bit for bit on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from heart_lib import data
from heart_lib.paths import cache_dir
from heart_lib.progress import progress as progress_bar

DEPTHS = {"resnet20": 3, "resnet56": 9, "resnet8": 1}  # resnet8: the smoke profile's plumbing model
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.stride, self.pad = stride, outputs - inputs

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A: no weights; subsample and zero-pad the new channels (half on each side).
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, inputs = [], 16
        for outputs, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(inputs, outputs, stride if i == 0 else 1))
                inputs = outputs
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def create(name: str, seed: int = 0, num_classes: int = 10) -> CifarResNet:
    """A freshly initialised CIFAR ResNet (`resnet20`, `resnet56`; `resnet8` for smoke runs)."""
    if name not in DEPTHS:
        raise ValueError(f"model = {name!r}: allowed CIFAR ResNets are {', '.join(DEPTHS)}")
    torch.manual_seed(seed)
    return CifarResNet(DEPTHS[name], num_classes)


# ------------------------------------------------------------------ data


DATASETS = ("cifar10", "synthetic")


def cifar_tensors(split: str, limit: int | None = None, seed: int = 0, dataset: str = "cifar10") -> data.TensorImages:
    """CIFAR-10 `train`/`test` as uint8 images [N, 3, 32, 32] (decoded once, cached); a seeded
    subset of `limit` images when given (`data.image_dataset`'s rule). `dataset="synthetic"`:
    seeded random images and labels of the same shape (`limit` or 64 of them; smoke runs)."""
    if split not in ("train", "test"):
        raise ValueError(f"split = {split!r}: allowed values are 'train', 'test'")
    if dataset not in DATASETS:
        raise ValueError(f"dataset = {dataset!r}: allowed values are {', '.join(DATASETS)}")
    if dataset == "synthetic":
        g = torch.Generator().manual_seed(seed + (split == "test"))
        n = limit or 64
        return data.TensorImages(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                                 torch.randint(0, 10, (n,), generator=g))
    # Only the subset is decoded (decoding all 60,000 JPEGs costs more than a short training run).
    path = cache_dir() / f"cifar10-{split}-{limit or 'all'}-seed{seed}-uint8.pt"
    if not path.is_file():
        jpegs = data.image_dataset(f"cifar10-{split}", _to_uint8, limit=limit, seed=seed)
        images = torch.stack([jpegs[i][0] for i in progress_bar(range(len(jpegs)), f"decode cifar10-{split}")])
        labels = torch.tensor(data.dataset_labels(jpegs))
        tmp = path.with_suffix(".tmp")
        torch.save({"images": images, "labels": labels}, tmp)
        tmp.replace(path)
    blob = torch.load(path)
    return data.TensorImages(blob["images"], blob["labels"])


def _to_uint8(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float, normalised by the CIFAR-10 channel statistics."""
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32×32 crop of the 4-pixel zero-padded image and a random horizontal flip, per image."""
    n = len(images)
    padded = F.pad(images, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def batches(dataset: data.TensorImages, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            train_augment: bool = False):
    """(normalised images, labels) batches of a uint8 CIFAR tensor set."""
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        images = dataset.images[index]
        if train_augment:
            images = augment(images, generator)
        yield normalise(images), dataset.targets[index]


# ------------------------------------------------------------------ training recipe


@dataclass(frozen=True)
class Recipe:
    """He et al. 2016's CIFAR schedule, with its length and training subset as parameters."""

    model: str = "resnet20"
    dataset: str = "cifar10"  # cifar10 | synthetic (smoke runs)
    epochs: int = 160
    train_limit: int | None = None  # training images (a seeded subset); None = all 50,000
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0

    def check(self) -> None:
        if self.model not in DEPTHS:
            raise ValueError(f"model = {self.model!r}: allowed CIFAR ResNets are {', '.join(DEPTHS)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be a positive integer")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"train_limit = {self.train_limit}: must be a positive integer or null")
        if not self.lr > 0:
            raise ValueError(f"lr = {self.lr}: must be positive")

    def key(self) -> str:
        """Digest of the recipe and of this module's source: a checkpoint is reused only for both."""
        source = Path(__file__).read_bytes()
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode() + source).hexdigest()[:16]


def step_lr(base: float, epoch: int, epochs: int) -> float:
    """The paper's steps: ÷10 at 50 % and ÷100 at 75 % of the schedule."""
    return base * (0.1 ** ((epoch >= epochs // 2) + (epoch >= 3 * epochs // 4)))


def train_epoch(model: nn.Module, dataset: data.TensorImages, optimizer: torch.optim.Optimizer, batch_size: int,
                generator: torch.Generator, after_step: Callable[[], None] | None = None,
                max_steps: int | None = None) -> float:
    """One pass of SGD with augmentation; `after_step` runs after every optimiser step (mask
    enforcement). Returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for step, (images, labels) in enumerate(batches(dataset, batch_size, shuffle=True, generator=generator,
                                                    train_augment=True)):
        if max_steps is not None and step >= max_steps:
            break
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total, count = total + float(loss.detach()) * len(labels), count + len(labels)
    model.eval()
    return total / max(count, 1)


def train(recipe: Recipe, log: Callable[[str], None] = print) -> tuple[CifarResNet, dict]:
    """Train a CIFAR ResNet from scratch by `recipe`, or load it from the cache when the same recipe
    (and the same code) was trained before. Returns (model in eval mode, training record)."""
    recipe.check()
    path = cache_dir() / "camphive" / f"{recipe.model}-{recipe.key()}.pt"
    model = create(recipe.model, recipe.seed)
    if path.is_file():
        blob = torch.load(path)
        model.load_state_dict(blob["state_dict"])
        return model.eval(), {**blob["record"], "cached": True}
    train_set = cifar_tensors("train", recipe.train_limit, recipe.seed, recipe.dataset)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    history, start = [], time.perf_counter()
    for epoch in progress_bar(range(recipe.epochs), f"train {recipe.model}"):
        for group in optimizer.param_groups:
            group["lr"] = step_lr(recipe.lr, epoch, recipe.epochs)
        history.append(train_epoch(model, train_set, optimizer, recipe.batch_size, generator))
    record = {**asdict(recipe), "train_images": len(train_set), "train_seconds": time.perf_counter() - start,
              "train_loss": history}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "record": record}, tmp)
    tmp.replace(path)
    log(f"trained {recipe.model} in {record['train_seconds']:.0f} s; cached at {path}")
    return model.eval(), {**record, "cached": False}
