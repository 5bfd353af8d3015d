"""Small, pure statistics helpers: confidence intervals for accuracies, means and paired
differences; rank correlations row by row (Spearman, Kendall τ-b) over the finite entries."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import stats as _st


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (good at small n and near 0 or 1)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z = _st.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def bootstrap_ci(values: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
                 n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over the first axis of `values`."""
    data = np.asarray(values)
    if len(data) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(data), size=(n_resamples, len(data)))
    stats = np.array([statistic(data[i]) for i in idx])
    lo, hi = _levels(confidence)
    return float(np.quantile(stats, lo)), float(np.quantile(stats, hi))


# ---------------------------------------------------------------------------------------- rank correlations, bootstrap means


def _valid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.isfinite(a) & np.isfinite(b)


def _ranks(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Average ranks (1..n) along rows over the valid entries; NaN elsewhere."""
    filled = np.where(valid, x, np.inf)  # invalid entries rank last, then are blanked
    ranks = _st.rankdata(filled, axis=1, method="average")
    return np.where(valid, ranks, np.nan)


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman ρ of each row of a with the same row of b, over the columns where both are finite
    (ties get average ranks); NaN where fewer than 3 such columns or a row is constant."""
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    valid = _valid(a, b)
    ra, rb = _ranks(a, valid), _ranks(b, valid)
    count = valid.sum(1, keepdims=True)  # rows without any valid column (e.g. no exact scores) give NaN
    with np.errstate(invalid="ignore", divide="ignore"):
        ra -= np.nansum(ra, 1, keepdims=True) / count
        rb -= np.nansum(rb, 1, keepdims=True) / count
        num = np.nansum(ra * rb, 1)
        den = np.sqrt(np.nansum(ra ** 2, 1) * np.nansum(rb ** 2, 1))
        out = num / den
    out[(valid.sum(1) < 3) | ~(den > 0)] = np.nan
    return out


def rowwise_kendall(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall's τ-b of each row pair over the columns where both are finite (all pairs at once:
    Σ sign(Δa)·sign(Δb) / sqrt(Σ|sign Δa| · Σ|sign Δb|))."""
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    valid = _valid(a, b)
    a, b = np.where(valid, a, 0.0), np.where(valid, b, 0.0)
    pair = valid[:, :, None] & valid[:, None, :]
    sa = np.sign(a[:, :, None] - a[:, None, :]) * pair
    sb = np.sign(b[:, :, None] - b[:, None, :]) * pair
    num = (sa * sb).sum((1, 2))
    den = np.sqrt(np.abs(sa).sum((1, 2)) * np.abs(sb).sum((1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[(valid.sum(1) < 3) | ~(den > 0)] = np.nan
    return out


def mean_interval(values: np.ndarray, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95
                  ) -> tuple[float, float, float]:
    """Mean of the finite `values` with a percentile bootstrap interval: (mean, lo, hi); NaNs when none."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_resamples, len(values)))
    boots = values[idx].mean(1)
    lo, hi = _levels(confidence)
    return float(values.mean()), float(np.quantile(boots, lo)), float(np.quantile(boots, hi))


def _levels(confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence = {confidence}: must lie in (0, 1)")
    alpha = round((1 - confidence) / 2, 12)  # 0.025 exactly for 95 %
    return alpha, 1 - alpha


def paired_difference(after: np.ndarray, before: np.ndarray, n_resamples: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of after − before over the same images, with a paired percentile bootstrap interval
    (images resampled with replacement, both models' outcomes kept together)."""
    a, b = np.asarray(after, dtype=float), np.asarray(before, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired outcomes must be two equal-length vectors, got shapes {a.shape} and {b.shape}")
    return mean_interval(a - b, n_resamples, seed, confidence)


def pooled_rank_correlation(score: np.ndarray, truth: np.ndarray, n_boot: int = 2000, seed: int = 0
                            ) -> dict[str, float]:
    """Spearman and Kendall of the image-averaged score with the image-averaged truth (one ranking
    over all components), with percentile bootstrap intervals over images (rows with a NaN score
    are left out)."""
    keep = np.isfinite(score.reshape(len(score), -1)).all(1)
    score, truth = score[keep].reshape(keep.sum(), -1), truth[keep].reshape(keep.sum(), -1)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([np.arange(len(score))[None], rng.integers(0, len(score), (n_boot, len(score)))])
    s_mean, t_mean = score[idx].mean(1), truth[idx].mean(1)  # [1 + n_boot, components]
    rho, tau = rowwise_spearman(s_mean, t_mean), rowwise_kendall(s_mean, t_mean)
    return {"spearman": rho[0], "spearman_lo": np.nanquantile(rho[1:], 0.025),
            "spearman_hi": np.nanquantile(rho[1:], 0.975), "kendall": tau[0],
            "kendall_lo": np.nanquantile(tau[1:], 0.025), "kendall_hi": np.nanquantile(tau[1:], 0.975)}
