"""Datasets and files: resolve (explicit path -> mirror -> public source), verify, load.

Every file or folder named in `data/manifest.yaml` is checked against its checksum before first use;
a verified checksum is remembered (keyed by path, size and modification time) so later runs skip
the hashing. A missing, corrupt or wrong file raises `DataError` naming it and how to supply it.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import shutil
import stat
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
    return _tree_digest({name: sha256_file(Path(folder) / name) for name in _files(Path(folder))})


def _tree_digest(digests: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(name.encode() + b"\0" + digests[name].encode() + b"\n")
    return h.hexdigest()


def _files(folder: Path) -> dict[str, os.stat_result]:
    """Every file under `folder` by relative name, with its stat (os.walk: pathlib is 10x slower here)."""
    found = {}
    for top, _, names in os.walk(folder):
        prefix = os.path.relpath(top, folder)
        for name in names:
            st = os.stat(os.path.join(top, name))
            if stat.S_ISREG(st.st_mode):
                found[name if prefix == "." else os.path.join(prefix, name)] = st
    return found


def _stamp(path: Path | os.stat_result) -> list[int]:
    """What must not change for a remembered checksum to stay valid: an edit in place changes the
    ctime even when the size and mtime are put back, and a file renamed into place has another inode."""
    st = path if isinstance(path, os.stat_result) else path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _verified_db() -> Path:
    return cache_dir() / "verified.json"


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_record(path: Path, record: dict) -> None:
    from heart_lib.results import write_json  # local import: results imports torch-heavy modules lazily

    with contextlib.suppress(OSError):  # a read-only cache only costs hashing again next time
        write_json(path, record)


def verify(path: Path, expected: str, what: str, listing: dict[str, str] | None = None) -> None:
    """Check `path` (file: SHA-256; folder: tree_digest, per file) against `expected`.

    Success is remembered per file with its `_stamp`, so later runs re-hash only what changed.
    `listing` ({relative name: sha256}) names the bad files of a folder; without it, they are named
    against the last successful check.
    """
    path = Path(path).resolve()
    if path.is_dir():
        return _verify_folder(path, expected, what, listing)
    db_path = _verified_db()
    db = _read_record(db_path)
    key = f"{path}:{expected}"
    if db.get(key) == _stamp(path):
        return
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(f"{what}: checksum mismatch for {path}\n  expected {expected}\n  found    {actual}\n"
                        "The file is corrupt or not the version the study uses; replace it with the "
                        "manifest's version (data/manifest.yaml names its source).")
    db[key] = _stamp(path)
    _write_record(db_path, db)


_checked_folders: set[tuple[Path, str]] = set()  # a process (a kernel) checks a folder once


def _verify_folder(folder: Path, expected: str, what: str, listing: dict[str, str] | None) -> None:
    if (folder, expected) in _checked_folders:
        return
    record_path = cache_dir() / "verified" / (hashlib.sha256(f"{folder}:{expected}".encode()).hexdigest()[:24] + ".json")
    record = _read_record(record_path)  # {relative name: [stamp, sha256]} of the last good check
    digests, stamps = {}, {}
    for name, st in _files(folder).items():
        stamps[name] = _stamp(st)
        known = record.get(name)
        digests[name] = known[1] if known and known[0] == stamps[name] else sha256_file(folder / name)
    if _tree_digest(digests) != expected:
        reference = listing if listing is not None else {n: v[1] for n, v in record.items()}
        raise DataError(f"{what}: checksum mismatch for folder {folder}: " + _differences(reference, digests)
                        + "; replace the folder with the manifest's version (data/manifest.yaml names its "
                        "source)")
    fresh = {name: [stamps[name], digests[name]] for name in digests}
    if fresh != record:
        _write_record(record_path, fresh)
    _checked_folders.add((folder, expected))


def _differences(reference: dict[str, str], actual: dict[str, str]) -> str:
    """Which files differ from `reference`, named (the first few of each kind)."""
    parts = []
    for label, names in (("changed", [n for n in actual if n in reference and reference[n] != actual[n]]),
                         ("missing", [n for n in reference if n not in actual]),
                         ("unexpected", [n for n in actual if n not in reference])):
        if names:
            parts.append(f"{len(names)} {label} ({', '.join(sorted(names)[:5])}{', ...' if len(names) > 5 else ''})")
    return ", ".join(parts) or "its files differ from the manifest's (no per-file record names which)"


def read_listing(path: Path) -> dict[str, str]:
    """A `sha256sum`-style list: '<sha256>  <relative name>' per line."""
    return {name: sha for sha, name in (line.split("  ", 1) for line in path.read_text().splitlines() if line)}


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
    listing = read_listing(MANIFEST_DIR / entry["images_list"]) if "images_list" in entry else None
    verify(root / "images", entry["images_digest"], f"{name} images", listing)
    return root, read_labels(root / entry["labels"], root / "images")


def read_labels(path: Path, images: Path) -> list[Sample]:
    """`labels.csv` (columns file,label): a bad row names the file and the row."""
    samples = []
    with open(path, newline="") as f:
        for row_number, row in enumerate(csv.DictReader(f), start=2):  # row 1 is the header
            try:
                label = int(row["label"])
                if not 0 <= label < 1000 or not row["file"]:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{path}, row {row_number}: expected 'file,label' with a class index 0..999, "
                                f"got {dict(row)}; fix the row or restore the file") from None
            samples.append(Sample(images / row["file"], label))
    return samples


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
    """CIFAR-10 as class folders, extracted once from the mirror's archive into the cache.

    Per-file checksums of the extraction are kept beside it and re-checked (by stamp) on every use,
    so a damaged cache is named instead of silently giving fewer or other images.
    """
    target = cache_dir() / "cifar10-jpeg"
    entry = manifest_entry("datasets", "cifar10")
    listing_path = cache_dir() / "cifar10-jpeg.sha256"
    def extracted() -> bool:  # the list is written last: without it the extraction is not trusted
        return (target / "cifar10" / "test").is_dir() and listing_path.is_file()

    if not extracted():
        archive = mirror_path(entry["mirror"])
        if archive is None:
            return None
        verify(archive, entry["sha256"], "cifar10 archive")
        with _cache_lock("cifar10"):  # a second process extracting at the same time waits, then reuses
            if not extracted():
                _extract(archive, target, listing_path)
    listing = read_listing(listing_path)
    try:
        verify(target, _tree_digest(listing), "cifar10 cache", listing)
    except DataError as err:
        raise DataError(f"{err}. Remove {target} so it is extracted again from the verified archive") from None
    return target / "cifar10"


def _extract(archive: Path, target: Path, listing_path: Path) -> None:
    """Extract beside the target and rename: an interrupted extraction never looks complete."""
    for stale in cache_dir().glob(".cifar10-*"):  # left by killed extractions (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-", dir=cache_dir()))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        listing = {name: sha256_file(tmp / name) for name in _files(tmp)}
        listing_path.unlink(missing_ok=True)
        if target.exists():  # an extraction without its list (interrupted, or from an older version)
            shutil.rmtree(target)
        os.replace(tmp, target)
        from heart_lib.results import write_text

        write_text(listing_path, "".join(f"{sha}  {name}\n" for name, sha in sorted(listing.items())))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _cache_lock(name: str):
    with open(cache_dir() / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


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
