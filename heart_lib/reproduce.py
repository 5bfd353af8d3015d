"""Does re-running a profile reproduce its committed tables?

`reproduce(profile)` executes the profile's notebooks afresh into a scratch results folder and
compares every table (CSV) and summary (JSON) with the committed ones: bit-identical where the
computation is deterministic (same CPU, same packages), else within a stated relative tolerance.
Measurements of time, energy and memory are not expected to repeat and are listed as such, never
compared silently.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from heart_lib.paths import results_root

# Files that record measurements of the machine (time, energy, memory) or of when they were
# written: they differ from run to run by nature.
NOT_REPEATABLE = ("timings.json", "*.meta.json", "*.png", "*.ipynb", "*speed*", "*latency*", "*timing*",
                  "*energy*", "*bench*", "*cost*", "*memory*", "devices/*")


@dataclass(frozen=True)
class Comparison:
    file: str
    status: str  # "identical" | "within tolerance" | "different" | "missing" | "not repeatable"
    detail: str = ""


def _not_repeatable(relative: str) -> bool:
    name = Path(relative).name
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(relative, p) for p in NOT_REPEATABLE)


def _max_relative_difference(a: Any, b: Any) -> float:
    """Largest relative difference between two numbers, or inf when the values differ otherwise."""
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return 0.0 if a == b else math.inf
    if math.isnan(a) and math.isnan(b):
        return 0.0
    scale = max(abs(a), abs(b), 1e-12)
    return abs(a - b) / scale


def _json_difference(a: Any, b: Any) -> float:
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return math.inf
        return max((_json_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return math.inf
        return max((_json_difference(x, y) for x, y in zip(a, b)), default=0.0)
    return _max_relative_difference(a, b)


def _csv_difference(a: Path, b: Path) -> float:
    left, right = pd.read_csv(a), pd.read_csv(b)
    if list(left.columns) != list(right.columns) or len(left) != len(right):
        return math.inf
    worst = 0.0
    for column in left.columns:
        x, y = left[column], right[column]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            both_nan = x.isna() & y.isna()
            scale = pd.concat([x.abs(), y.abs()], axis=1).max(axis=1).clip(lower=1e-12)
            rel = ((x - y).abs() / scale).where(~both_nan, 0.0)
            worst = max(worst, float(rel.max()) if len(rel) else 0.0)
        elif not x.astype(str).equals(y.astype(str)):
            return math.inf
    return worst


def compare_results(expected: Path, actual: Path, rtol: float = 1e-4) -> list[Comparison]:
    """Compare every table under `expected` with its namesake under `actual`."""
    out = []
    for path in sorted(p for p in expected.rglob("*") if p.is_file() and p.suffix in {".csv", ".json"}):
        relative = str(path.relative_to(expected))
        other = actual / relative
        if _not_repeatable(relative):
            out.append(Comparison(relative, "not repeatable", "a measurement of the machine or of the run"))
        elif not other.is_file():
            out.append(Comparison(relative, "missing", "not written by the re-run"))
        elif path.read_bytes() == other.read_bytes():
            out.append(Comparison(relative, "identical"))
        else:
            if path.suffix == ".csv":
                diff = _csv_difference(path, other)
            else:
                diff = _json_difference(json.loads(path.read_text()), json.loads(other.read_text()))
            status = "within tolerance" if diff <= rtol else "different"
            out.append(Comparison(relative, status, f"largest relative difference {diff:.3g} (rtol {rtol:g})"))
    return out


def reproduce(profile: str, rtol: float = 1e-4, jobs: int = 1, log=print) -> list[Comparison]:
    """Re-execute `profile` into a scratch folder and compare with the committed results."""
    from heart_lib import config, runner

    if profile not in config.available_profiles():
        raise config.ConfigError(f"unknown profile {profile!r}; available profiles: "
                                 f"{', '.join(config.available_profiles())}")
    committed = results_root() / profile
    if not committed.is_dir():
        raise config.ConfigError(f"no results of profile {profile!r} at {committed} to compare with; run "
                                 f"`python -m heart_lib run --profile {profile}` first")
    with tempfile.TemporaryDirectory(prefix=f"heart-reproduce-{profile}-") as scratch:
        previous = os.environ.get("HEART_RESULTS")
        os.environ["HEART_RESULTS"] = scratch
        try:
            runner.run_profile(profile, jobs=jobs, force=True, log=log)
        finally:
            if previous is None:
                os.environ.pop("HEART_RESULTS", None)
            else:
                os.environ["HEART_RESULTS"] = previous
        return compare_results(committed, Path(scratch) / profile, rtol)


def report(comparisons: list[Comparison]) -> str:
    lines = [f"{c.status:>17}  {c.file}" + (f"  ({c.detail})" if c.detail and c.status != "not repeatable" else "")
             for c in comparisons]
    counts = pd.Series([c.status for c in comparisons]).value_counts().to_dict() if comparisons else {}
    lines.append("summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)
