"""Where things live: the project root, the data mirror and the local cache."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = PROJECT_ROOT / "results"
MANIFEST_DIR = PROJECT_ROOT / "data"
PROFILES_DIR = PROJECT_ROOT / "notebooks" / "profiles"


def results_root() -> Path:
    """Where results of every profile go (`HEART_RESULTS`, default `results/`)."""
    return Path(os.environ.get("HEART_RESULTS", RESULTS_DIR)).expanduser()


def profiles_root() -> Path:
    """Where profiles live (`HEART_PROFILES`, default `notebooks/profiles/`)."""
    return Path(os.environ.get("HEART_PROFILES", PROFILES_DIR)).expanduser()


def mirror_dir() -> Path | None:
    """The offline data mirror: `HEART_DATA_MIRROR`, else `../shared/data` beside the project."""
    explicit = os.environ.get("HEART_DATA_MIRROR")
    if explicit:
        return Path(explicit).expanduser()
    default = PROJECT_ROOT.parent / "shared" / "data"
    return default if default.is_dir() else None


def cache_dir() -> Path:
    """Extracted archives, downloads and checksum records (`HEART_CACHE`, default `data/cache`)."""
    path = Path(os.environ.get("HEART_CACHE", MANIFEST_DIR / "cache")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
