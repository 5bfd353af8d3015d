"""Choosing a configuration: the best one under limits, and Pareto fronts (pure functions on tables).

The group's Jetson LLM utility reports the configuration that is best while staying under limits on
power, latency, energy and memory; here those limits are `Limits`, any column can be the objective,
and every configuration that fails a limit says which one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

# Limit name -> the summary column it bounds (from above).
LIMIT_COLUMNS = {"max_power_w": "peak_power_w", "max_latency_s": "generate_s",
                 "max_energy_j": "energy_per_token_j", "max_memory_mb": "peak_memory_mb"}


@dataclass(frozen=True)
class Limits:
    """Upper limits (None = no limit): peak power (W), generation latency (s), energy per token (J),
    peak memory (MiB)."""

    max_power_w: float | None = None
    max_latency_s: float | None = None
    max_energy_j: float | None = None
    max_memory_mb: float | None = None

    def check(self) -> None:
        for name in LIMIT_COLUMNS:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} = {value!r}: must be a positive number or None")

    def active(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in LIMIT_COLUMNS if getattr(self, name) is not None}


def violations(summary: pd.DataFrame, limits: Limits) -> pd.Series:
    """Per row, the limits it breaks ('' when it meets all). A limit on a quantity that was not
    measured (NaN, e.g. energy without a source) counts as broken: it cannot be shown to hold."""
    limits.check()
    broken = pd.Series([""] * len(summary), index=summary.index, dtype=object)
    for name, bound in limits.active().items():
        column = LIMIT_COLUMNS[name]
        values = pd.to_numeric(summary[column], errors="coerce") if column in summary else pd.Series(np.nan, index=summary.index)
        bad = ~(values <= bound)
        text = [f"{column} {v:.4g} > {bound:g}" if not math.isnan(v) else f"{column} not measured" for v in values]
        broken = broken.where(~bad, broken + np.where(broken != "", "; ", "") + pd.Series(text, index=summary.index))
    return broken


def select_best(summary: pd.DataFrame, limits: Limits, objective: str = "tokens_per_s",
                maximise: bool = True) -> pd.Series | None:
    """The configuration with the best `objective` among those meeting every limit (None if none does)."""
    if objective not in summary:
        raise ValueError(f"objective = {objective!r}: not a column; allowed: {sorted(summary.columns)}")
    ok = summary[(violations(summary, limits) == "") & pd.to_numeric(summary[objective], errors="coerce").notna()]
    if ok.empty:
        return None
    values = pd.to_numeric(ok[objective])
    return ok.loc[values.idxmax() if maximise else values.idxmin()]


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask of the points not dominated when x is to be minimised and y maximised.

    A point is dominated when another has x no larger and y no smaller, and is strictly better in
    one of them. NaN points are never on the front.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    valid = ~(np.isnan(x) | np.isnan(y))
    front = valid.copy()
    for i in np.flatnonzero(valid):
        others = valid & (x <= x[i]) & (y >= y[i]) & ((x < x[i]) | (y > y[i]))
        front[i] = not others.any()
    return front
