"""Loading LLM measurement sessions (`<root>/<device>/llm/*.csv`) and reducing runs to medians."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from heart_lib.measure import tables

CONFIG_KEYS = ("device_name", "model", "weights", "dtype", "batch_size", "prompt_tokens", "new_tokens", "threads")
MEDIAN_COLUMNS = ("load_s", "ttft_ms", "decode_ms_per_token", "decode_tokens_per_s", "tokens_per_s", "ms_per_token",
                  "generate_s", "peak_memory_mb", "gpu_peak_memory_mb", "energy_j", "energy_per_token_j",
                  "energy_per_token_above_idle_j", "prefill_energy_j", "decode_energy_per_token_j", "load_energy_j",
                  "peak_power_w", "mean_power_w", "idle_power_w", "overhead_frac", "cpu_share", "params_m")
FACT_COLUMNS = ("energy_source", "energy_reason", "cpu_model", "gpu_name", "jetson_model", "nvpmodel",
                "jetson_clocks", "torch", "transformers")


def load_llm_runs(root: str | Path) -> pd.DataFrame:
    """Every LLM session table under `root` (`<root>/<device>/llm/<session>.csv`), one row per run."""
    root = Path(root)
    frames = tables.read_sessions(sorted(root.glob("*/llm/*.csv")) if root.is_dir() else [], root)
    if not frames:
        raise FileNotFoundError(f"no LLM measurements under {root}/<device>/llm/; run `python -m heart_lib measure-llm`")
    return pd.concat(frames, ignore_index=True, sort=False)


def summarize_llm(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: medians over successful runs; failures counted and their statuses listed,
    so a configuration that ran out of memory stays in the table with empty figures."""
    runs = runs.copy()
    for key in CONFIG_KEYS:
        if key not in runs:
            runs[key] = np.nan
    runs["weights"] = runs["weights"].fillna("")
    rows = []
    # A failed run may not know its weights yet; group without them, then take them from the runs that do.
    keys = [k for k in CONFIG_KEYS if k != "weights"]
    for key, group in runs.groupby(keys, dropna=False, sort=False):
        ok = group[group["status"] == "ok"]
        row = dict(zip(keys, key))
        known = group["weights"].astype(str).replace("", np.nan).dropna()
        row["weights"] = ";".join(sorted(set(known))) if len(known) else "unknown"
        row.update(runs_ok=len(ok), runs_failed=len(group) - len(ok),
                   statuses=";".join(sorted(set(group["status"].astype(str)) - {"ok"})))
        for col in MEDIAN_COLUMNS:
            values = pd.to_numeric(ok[col], errors="coerce") if col in ok else pd.Series(dtype=float)
            row[col] = float(values.median()) if values.notna().any() else np.nan
        tps = pd.to_numeric(ok.get("tokens_per_s", pd.Series(dtype=float)), errors="coerce").dropna()
        row["tokens_per_s_iqr"] = float(tps.quantile(0.75) - tps.quantile(0.25)) if len(tps) else np.nan
        for col in FACT_COLUMNS:
            present = group[col].dropna() if col in group else pd.Series(dtype=object)
            row[col] = present.iloc[0] if len(present) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)
