"""Progress bars for long loops: shown in a terminal, silent in notebooks and logs.

Executed notebooks are pages of the book; a progress bar there is noise, and papermill's kernels
have no terminal, so a bar appears only when standard error is a terminal (or `HEART_PROGRESS=1`).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def enabled() -> bool:
    forced = os.environ.get("HEART_PROGRESS")
    if forced is not None:
        return forced == "1"
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    return tqdm(iterable, desc=desc, total=total, disable=not enabled(), leave=False, dynamic_ncols=True)
