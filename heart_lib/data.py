"""Datasets and files: resolve (explicit path -> mirror -> public source), verify, load.

Every file or folder named in `data/manifest.yaml` is checked against its checksum before first use;
a verified checksum is remembered (keyed by path, size and modification time) so later runs skip
the hashing. A missing, corrupt or wrong file raises `DataError` naming it and how to supply it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from heart_lib.paths import MANIFEST_DIR, cache_dir, mirror_dir

DATASETS = ("imagenet-val-1300", "imagenet-sample-1000", "imagenet-val", "cifar10-train", "cifar10-test",
            "synthetic")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(FileNotFoundError):
    """Data or weights are missing, corrupt or not what the manifest says; the message says which."""


# ---------------------------------------------------------------- manifest and checksums

@lru_cache(maxsize=1)
def manifest() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((MANIFEST_DIR / "manifest.yaml").read_text())


def manifest_entry(section: str, name: str) -> dict[str, Any]:
    entries = manifest().get(section, {})
    if name not in entries:
        raise DataError(f"{name!r} is not in data/manifest.yaml [{section}]; known: {sorted(entries)}")
    return entries[name]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(folder: Path) -> str:
    """Digest of a folder of files: SHA-256 over '<name>\\0<sha256>\\n' lines in sorted name order."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return h.hexdigest()


def _stamp(path: Path) -> list[int]:
    """What must not change for a remembered checksum to stay valid."""
    if path.is_dir():
        files = [p.stat() for p in path.iterdir() if p.is_file()]
        return [len(files), sum(s.st_size for s in files), max((s.st_mtime_ns for s in files), default=0)]
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _verified_db() -> Path:
    return cache_dir() / "verified.json"


def verify(path: Path, expected: str, what: str) -> None:
    """Check `path` (file: SHA-256; folder: tree_digest) against `expected`, remembering success."""
    path = Path(path).resolve()
    db_path = _verified_db()
    try:
        db = json.loads(db_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        db = {}
    key = f"{path}:{expected}"
    if db.get(key) == _stamp(path):
        return
    actual = tree_digest(path) if path.is_dir() else sha256_file(path)
    if actual != expected:
        raise DataError(
            f"{what}: checksum mismatch for {path}\n  expected {expected}\n  found    {actual}\n"
            "The file is corrupt or not the version the study uses; replace it (or remove it so the "
            "public source is used)."
        )
    db[key] = _stamp(path)
    from heart_lib.results import write_json  # local import: results imports torch-heavy modules lazily

    write_json(db_path, db)


def mirror_path(relative: str) -> Path | None:
    """`relative` inside the mirror, if the mirror exists and holds it."""
    root = mirror_dir()
    if root is None:
        return None
    path = root / relative
    return path if path.exists() else None


def resolve_file(name: str, path: str | os.PathLike | None = None) -> Path:
    """A verified file from the manifest's [files] section: explicit path, else the mirror."""
    entry = manifest_entry("files", name)
    candidate = Path(path).expanduser() if path is not None else mirror_path(entry["mirror"])
    if candidate is None or not candidate.is_file():
        raise DataError(_missing_message(name, path, entry["mirror"], "no public download is wired for it"))
    verify(candidate, entry["sha256"], name)
    return candidate


def _missing_message(name: str, path: Any, mirror_rel: str, fallback: str) -> str:
    root = mirror_dir()
    looked = [f"explicit path {path}" if path is not None else "no explicit path given",
              f"mirror {root / mirror_rel}" if root is not None else
              "no mirror (set HEART_DATA_MIRROR to the folder holding the data mirror)"]
    return f"{name} not found: looked at {'; '.join(looked)}; {fallback}."


# ---------------------------------------------------------------- datasets

@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


class ImageListDataset(Dataset):
    """Images from a list of (path, label), opened as RGB and passed through `transform`."""

    def __init__(self, samples: list[Sample], transform: Callable | None = None):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            with Image.open(sample.path) as img:
                image = img.convert("RGB")
        except OSError as err:
            raise DataError(f"cannot read image {sample.path}: {err}") from err
        return (self.transform(image) if self.transform else image), sample.label

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]


class TensorImages(Dataset):
    """Images already decoded and transformed, held as one tensor (sets read many times)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.targets = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], int(self.targets[index])

    @property
    def labels(self) -> list[int]:
        return self.targets.tolist()


class SyntheticImages(TensorImages):
    """Seeded random images and labels, already tensors at the model's input size (for smoke runs)."""

    def __init__(self, count: int, image_size: int, num_classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(count, 3, image_size, image_size, generator=g)
        super().__init__(images, torch.randint(0, num_classes, (count,), generator=g))


def image_folder_with_csv(name: str, path: str | os.PathLike | None = None) -> tuple[Path, list[Sample]]:
    """A manifest image folder (`images/` + `labels.csv`): explicit path, else the mirror; verified."""
    entry = manifest_entry("datasets", name)
    root = Path(path).expanduser() if path is not None else mirror_path(entry["mirror"])
    if root is None or not (root / entry["labels"]).is_file() or not (root / "images").is_dir():
        raise DataError(_missing_message(
            name, path, entry["mirror"],
            "no public download exists: pass the folder (images/ + labels.csv) as `path`"))
    verify(root / entry["labels"], entry["labels_sha256"], f"{name} labels")
    verify(root / "images", entry["images_digest"], f"{name} images")
    with open(root / entry["labels"], newline="") as f:
        rows = list(csv.DictReader(f))
    return root, [Sample(root / "images" / r["file"], int(r["label"])) for r in rows]


def imagenet_val_folder(path: str | os.PathLike | None, label_file: str | os.PathLike | None = None
                        ) -> list[Sample]:
    """Any folder of official ILSVRC2012 validation JPEGs, labelled by the official label file."""
    given = path or os.environ.get("HEART_IMAGENET_VAL")
    if not given:
        raise DataError("imagenet-val needs the ILSVRC2012 validation images: pass `path` (a folder of "
                        "ILSVRC2012_val_*.JPEG) or set HEART_IMAGENET_VAL")
    folder = Path(given).expanduser()
    if not folder.is_dir():
        raise DataError(f"imagenet-val: {folder} is not a folder of ILSVRC2012_val_*.JPEG images")
    labels = {}
    for line in resolve_file("imagenet-val-labels", label_file).read_text().splitlines():
        file, index = line.split()
        labels[file] = int(index)
    images = sorted(p for p in folder.iterdir() if p.name in labels)
    if not images:
        raise DataError(f"no ILSVRC2012_val_*.JPEG files found in {folder}")
    return [Sample(p, labels[p.name]) for p in images]


def cifar10_folder() -> Path | None:
    """CIFAR-10 as class folders, extracted once from the mirror's archive into the cache."""
    target = cache_dir() / "cifar10-jpeg"
    if (target / "cifar10" / "test").is_dir():
        return target / "cifar10"
    entry = manifest_entry("datasets", "cifar10")
    archive = mirror_path(entry["mirror"])
    if archive is None:
        return None
    verify(archive, entry["sha256"], "cifar10 archive")
    # Extract beside the target and rename: an interrupted extraction never looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-", dir=cache_dir()))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "cifar10"


def cifar10_samples(split: str) -> list[Sample] | Dataset:
    folder = cifar10_folder()
    if folder is not None:
        return [Sample(p, label) for label, cls in enumerate(CIFAR10_CLASSES)
                for p in sorted((folder / split / cls).glob("*.jpg"))]
    import torchvision  # the public source: the official archive

    try:
        return torchvision.datasets.CIFAR10(str(cache_dir() / "torchvision"), train=split == "train",
                                            download=True)
    except Exception as err:  # noqa: BLE001 - any download failure means the same to the user
        raise DataError(_missing_message("cifar10", None, manifest_entry("datasets", "cifar10")["mirror"],
                                         f"and the torchvision download failed ({err})")) from err


class _TransformedDataset(Dataset):
    def __init__(self, base: Dataset, transform: Callable | None):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return (self.transform(image) if self.transform else image), int(label)

    @property
    def labels(self) -> list[int]:
        return [int(t) for t in self.base.targets]


def image_dataset(name: str, transform: Callable | None = None, *, limit: int | None = None, seed: int = 0,
                  path: str | os.PathLike | None = None, image_size: int = 32, num_classes: int = 10
                  ) -> Dataset:
    """A dataset of (image tensor, label) by name (see DATASETS).

    `limit` keeps a seeded random subset of that size, in a fixed order, so runs are reproducible.
    `image_size`/`num_classes` apply to "synthetic" only.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive number of images or None, got {limit}")
    if name == "synthetic":
        return SyntheticImages(limit or 64, image_size, num_classes, seed)
    if name == "imagenet-val":
        dataset: Dataset = ImageListDataset(imagenet_val_folder(path), transform)
    elif name.startswith("cifar10"):
        samples = cifar10_samples(name.split("-")[1])
        dataset = (ImageListDataset(samples, transform) if isinstance(samples, list)
                   else _TransformedDataset(samples, transform))
    else:
        dataset = ImageListDataset(image_folder_with_csv(name, path)[1], transform)
    if limit is not None and limit < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
        dataset = torch.utils.data.Subset(dataset, sorted(order.tolist()))
    return dataset


def dataset_labels(dataset: Dataset) -> list[int]:
    if isinstance(dataset, torch.utils.data.Subset):
        labels = dataset_labels(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    return list(dataset.labels)


def model_transform(model: torch.nn.Module, train: bool = False) -> Callable:
    """The preprocessing timm's data config prescribes for `model` (resize, crop, normalise)."""
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    return timm.data.create_transform(**config, is_training=train)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                workers: int = 0) -> DataLoader:
    """A deterministic DataLoader (seeded shuffling; workers=0 by default on a 2-core machine)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


def class_names() -> list[str]:
    """Human-readable ImageNet class names in class-index order (from the mirror's label files)."""
    words = dict(line.split(" ", 1) for line in resolve_file("imagenet-synset-words").read_text().splitlines())
    synsets = resolve_file("imagenet-synsets").read_text().split()
    return [words[w].split(",")[0].strip() for w in synsets]
