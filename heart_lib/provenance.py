"""Content digests of what results depend on: the library's source and the pinned packages."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from heart_lib.paths import PROJECT_ROOT

LIBRARY_DIR = Path(__file__).resolve().parent


def digest_files(paths: list[Path], root: Path) -> str:
    """SHA-256 over (relative name, content) of `paths`, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@lru_cache(maxsize=1)
def library_digest() -> str:
    """Digest of heart_lib's Python source and data files (profiles excluded: they are parameters)."""
    files = [p for p in LIBRARY_DIR.rglob("*") if p.is_file() and p.suffix in {".py", ".yaml", ".json"}
             and "__pycache__" not in p.parts]
    return digest_files(files, LIBRARY_DIR)


@lru_cache(maxsize=1)
def requirements_digest() -> str:
    """Digest of the pinned environment (requirements.txt)."""
    req = PROJECT_ROOT / "requirements.txt"
    return hashlib.sha256(req.read_bytes()).hexdigest() if req.is_file() else "none"
