"""Loading measured runs back and reducing them to one row per configuration (medians over runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

CONFIG_KEYS = ("device_name", "model", "pruning", "batch_size", "precision", "threads")
MEDIAN_COLUMNS = ("latency_median_ms", "latency_per_image_ms", "throughput_img_s", "peak_memory_mb",
                  "energy_per_image_j", "energy_per_image_above_idle_j", "mean_power_w", "idle_power_w",
                  "sampler_overhead_frac")


def devices_root(text: str | Path) -> Path:
    """The folder of device measurements: `text` as given when absolute, else under the project."""
    from heart_lib.paths import PROJECT_ROOT

    root = Path(text).expanduser()
    return root if root.is_absolute() else PROJECT_ROOT / root


def read_sessions(paths: Iterable[Path], root: Path) -> list[pd.DataFrame]:
    """The measurement tables among `paths` (those with a `run_id` column), each with its source file."""
    frames = []
    for path in paths:
        frame = pd.read_csv(path)
        if "run_id" in frame.columns:
            frame["source_file"] = str(path.relative_to(root))
            frames.append(frame)
    return frames


def load_runs(root: str | Path) -> pd.DataFrame:
    """Every session table under `root` (recursively: `<root>/<device>/<session>.csv`), one row per run."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no measurements folder {root}; run `python -m heart_lib measure` first")
    # per-run detail (raw/) and LLM sessions (llm/: their own chapter, heart_lib.measure.llm_tables) are not ViT runs
    frames = read_sessions([p for p in sorted(root.rglob("*.csv"))
                            if not {"raw", "llm"} & set(p.relative_to(root).parts)], root)
    if not frames:
        raise FileNotFoundError(f"no measurement tables under {root}")
    return pd.concat(frames, ignore_index=True, sort=False)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: medians over successful runs, spread (IQR, min, max) of the latency.

    Failed runs count in `runs_failed` and their statuses are listed, so a configuration that did not
    fit in memory still appears (with NaN timings) instead of vanishing.
    """
    runs = runs.copy()
    for key in CONFIG_KEYS:
        if key not in runs.columns:
            runs[key] = np.nan
    if "energy_status" not in runs.columns:
        runs["energy_status"] = "none"
    rows = []
    for key, group in runs.groupby(list(CONFIG_KEYS), dropna=False, sort=False):
        ok = group[group["status"] == "ok"]
        row = dict(zip(CONFIG_KEYS, key))
        row.update(runs_ok=len(ok), runs_failed=len(group) - len(ok),
                   statuses=";".join(sorted(set(group["status"].astype(str)) - {"ok"})))
        for col in MEDIAN_COLUMNS:
            values = pd.to_numeric(ok[col], errors="coerce") if col in ok else pd.Series(dtype=float)
            # Energy is a median only over runs whose energy is valid: a lost source leaves NaN.
            row[col] = float(values.median()) if values.notna().any() else np.nan
        lat = pd.to_numeric(ok.get("latency_median_ms", pd.Series(dtype=float)), errors="coerce").dropna()
        row["latency_iqr_ms"] = float(lat.quantile(0.75) - lat.quantile(0.25)) if len(lat) else np.nan
        row["latency_runs_min_ms"] = float(lat.min()) if len(lat) else np.nan
        row["latency_runs_max_ms"] = float(lat.max()) if len(lat) else np.nan
        for col in ("flops_per_image", "flops_source", "params_m", "energy_source", "energy_reason", "cpu_model",
                    "gpu_name", "jetson_model", "nvpmodel", "jetson_clocks", "torch", "timm"):
            present = group[col].dropna() if col in group else pd.Series(dtype=object)
            row[col] = present.iloc[0] if len(present) else np.nan
        energy_ok = (ok["energy_status"] == "ok").sum() if len(ok) else 0
        row["energy_runs_ok"] = int(energy_ok)
        lost = group["energy_status"].astype(str).eq("lost").sum()
        row["energy_runs_lost"] = int(lost)
        rows.append(row)
    return pd.DataFrame(rows)


def add_relative(summary: pd.DataFrame) -> pd.DataFrame:
    """Latency, throughput, energy and FLOPs relative to the unpruned model on the same device and batch."""
    out = summary.copy()
    base_keys = ["device_name", "model", "batch_size", "precision", "threads"]
    base = out[out["pruning"] == "none"].set_index(base_keys)
    ratios = {"latency_change": "latency_median_ms", "throughput_change": "throughput_img_s",
              "energy_change": "energy_per_image_j", "flops_change": "flops_per_image"}
    for name in ratios:
        out[name] = np.nan
    for i, row in out.iterrows():
        key = tuple(row[k] for k in base_keys)
        if key not in base.index:
            continue
        ref = base.loc[key]
        ref = ref.iloc[0] if isinstance(ref, pd.DataFrame) else ref
        for name, col in ratios.items():
            try:
                out.at[i, name] = float(row[col]) / float(ref[col]) - 1.0
            except (TypeError, ValueError, ZeroDivisionError):
                pass
    return out


def median_ratio(pruned: np.ndarray, dense: np.ndarray, n_resamples: int = 2000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float, float]:
    """median(pruned) / median(dense) over independent runs of each, with a percentile bootstrap
    interval (each configuration's runs resampled on their own): (ratio, lo, hi)."""
    a, b = np.asarray(pruned, dtype=float), np.asarray(dense, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = (np.median(a[rng.integers(0, len(a), (n_resamples, len(a)))], axis=1)
             / np.median(b[rng.integers(0, len(b), (n_resamples, len(b)))], axis=1))
    alpha = (1 - confidence) / 2
    return float(np.median(a) / np.median(b)), float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))


SPEEDUP_KEYS = ("device_name", "device", "model", "batch_size", "precision", "threads")
SPEEDUP_VALUES = ("pruning", "flops_reduction", "runs_pruned", "runs_dense", "latency_reduction",
                  "latency_reduction_lo", "latency_reduction_hi", "throughput_gain", "throughput_gain_lo",
                  "throughput_gain_hi")


def speedups(runs: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Every pruned configuration against the unpruned model on the same device, precision, threads
    and batch, from the successful runs: FLOPs saved, latency saved and throughput gained, each
    with a bootstrap interval over runs."""
    ok = runs[runs["status"] == "ok"]
    if ok.empty or "pruning" not in ok:
        return pd.DataFrame(columns=[*SPEEDUP_KEYS, *SPEEDUP_VALUES])
    keys = [k for k in SPEEDUP_KEYS if k in runs]
    rows = []
    for key, group in ok.groupby(keys, dropna=False, sort=False):
        dense = group[group["pruning"] == "none"]
        if dense.empty:
            continue
        for pruning, pruned in group[group["pruning"] != "none"].groupby("pruning", sort=False):
            lat, lat_lo, lat_hi = median_ratio(pruned["latency_median_ms"], dense["latency_median_ms"], seed=seed)
            thr, thr_lo, thr_hi = median_ratio(pruned["throughput_img_s"], dense["throughput_img_s"], seed=seed)
            rows.append({**dict(zip(keys, key)), "pruning": pruning,
                         "flops_reduction": 1 - float(pruned["flops_per_image"].median())
                                            / float(dense["flops_per_image"].median()),
                         "runs_pruned": len(pruned), "runs_dense": len(dense),
                         "latency_reduction": 1 - lat, "latency_reduction_lo": 1 - lat_hi,
                         "latency_reduction_hi": 1 - lat_lo,
                         "throughput_gain": thr - 1, "throughput_gain_lo": thr_lo - 1, "throughput_gain_hi": thr_hi - 1})
    return pd.DataFrame(rows, columns=[*keys, *SPEEDUP_VALUES])
