"""Run outputs: atomic writes, run metadata, and loading tables back for the book.

Every write goes to a temporary file in the destination folder and is renamed into place, so an
interrupted run never leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import datetime as _dt
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from heart_lib.paths import results_root


class ResultsNotWritable(RuntimeError):
    """The results folder cannot be written (read-only, no permission); the message says which."""


# While the runner executes a notebook, the chapter folder it writes is redirected to a staging
# copy (swapped in whole when the notebook succeeds), so a killed or failed run never leaves the
# final folder half-rewritten. Reads through `results_root()` (the claims chapter reads every other
# chapter) still see the final folders.
STAGE_FOR_ENV = "HEART_STAGE_FOR"  # the final chapter folder being rewritten (absolute)
STAGE_TO_ENV = "HEART_STAGE_TO"    # its staging copy


def results_dir(profile: str, *parts: str) -> Path:
    """`results/<profile>/<parts...>`, created (inside the staging copy while the runner stages it)."""
    path = staged(results_root().joinpath(profile, *parts))
    path.mkdir(parents=True, exist_ok=True)
    return path


def staged(path: Path) -> Path:
    """`path`, moved into the staging copy when it lies inside the folder being staged."""
    final, stage = os.environ.get(STAGE_FOR_ENV), os.environ.get(STAGE_TO_ENV)
    if not final or not stage:
        return path
    absolute = Path(os.path.abspath(path))
    if absolute == Path(final) or absolute.is_relative_to(final):
        return Path(stage) / absolute.relative_to(final)
    return path


def file_mode() -> int:
    """The permissions a new file gets under the current umask (mkstemp would give 0600)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask must set it to read it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_table(path: str | os.PathLike, table: pd.DataFrame, meta: dict[str, Any] | None = None) -> Path:
    """Write a table as CSV (atomically); `meta` goes to `<name>.meta.json` beside it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    if meta is not None:
        write_json(path.with_suffix(".meta.json"), {**run_metadata(), **meta})
    return path


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result table {path} does not exist; run the notebook that writes it first")
    return pd.read_csv(path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Save a matplotlib figure atomically (PNG), with reproducible metadata."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight",
                    metadata={"Software": None} if path.suffix == ".png" else None)
    return path


def run_metadata() -> dict[str, Any]:
    """What a result depends on besides its parameters: code version and environment."""
    import timm
    import torch

    from heart_lib import __version__
    from heart_lib.provenance import library_digest

    return {
        "heart_lib": __version__,
        "library_digest": library_digest(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


# ---------------------------------------------------------------------------------------------
# caches of raw intermediates (one rule for every stage)


def cache_key(stage: str, params: Any, modules: tuple[str, ...]) -> str:
    """The one cache rule: a digest of the stage's name, its parameters (a JSON-able mapping) and the
    source of the heart_lib modules the stage depends on (`provenance.code_digest`): no hand-bumped
    versions, and an edit to an unrelated module keeps the cache."""
    from heart_lib.provenance import code_digest

    blob = json.dumps({"stage": stage, "params": params, "code": code_digest(*modules)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_folder(stage: str, params: Any, modules: tuple[str, ...]) -> Path:
    """`HEART_CACHE/<stage>/<cache_key>/`, created: raw intermediates live there, never in results/."""
    from heart_lib.paths import cache_dir

    folder = cache_dir() / stage / cache_key(stage, params, modules)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
