"""A Hessian-vector product and a Hutchinson diagonal on a toy, from the library's own primitives.

Learning goal 2 of the course: the function is small enough for its dense Hessian, so every
estimate `heart_lib.curvature` makes can be checked against the truth: both HVP modes against
`H v`, and Hutchinson's diagonal against `diag(H)` as the number of probes K grows (its error
falls like 1/√K).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from heart_lib import curvature
from heart_lib import display as D


@dataclass(frozen=True)
class Params:
    dim: int = 12  # coordinates of the toy function's input x
    seed: int = 0  # draws A, x and the probes
    probe_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])  # Hutchinson K values
    repeats: int = 20  # independent Hutchinson runs per K (the spread of the error)

    def check(self) -> None:
        if self.dim < 2:
            raise ValueError(f"parameter 'dim' = {self.dim}: must be at least 2")
        if not self.probe_counts or min(self.probe_counts) < 1:
            raise ValueError(f"parameter 'probe_counts' = {self.probe_counts}: positive integers, at least one")
        if self.repeats < 1:
            raise ValueError(f"parameter 'repeats' = {self.repeats}: must be at least 1")


def toy(params: Params):
    """f(x) = ½ xᵀAx + Σ sin(x_i) with a random symmetric A: a Hessian A − diag(sin x) that is not
    diagonal and not positive definite, like a network's."""
    g = torch.Generator().manual_seed(params.seed)
    a = torch.randn(params.dim, params.dim, generator=g, dtype=torch.float64)
    a = (a + a.T) / 2
    x = torch.randn(params.dim, generator=g, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x @ a @ x + torch.sin(x).sum()

    return f, x


def hvp_check(params: Params) -> pd.DataFrame:
    """Each HVP mode against the dense Hessian times the same vector."""
    f, x = toy(params)
    dense = torch.autograd.functional.hessian(f, x)
    v = torch.randn(params.dim, generator=torch.Generator().manual_seed(params.seed + 1), dtype=torch.float64)
    rows = []
    for mode in ("double_backward", "forward_over_reverse", "finite_difference"):
        _, _, (hv,) = curvature.hvp(f, (x,), (v,), mode=mode)
        rows.append({"mode": mode, "relative_error": float((hv - dense @ v).norm() / (dense @ v).norm())})
    return pd.DataFrame(rows)


def hutchinson_errors(params: Params) -> pd.DataFrame:
    """Relative error of Hutchinson's diagonal against diag(H), for every K and repeat."""
    f, x = toy(params)
    truth = torch.diagonal(torch.autograd.functional.hessian(f, x))
    rows = []
    for k in params.probe_counts:
        for r in range(params.repeats):
            estimate, _, _ = curvature.hutchinson_diagonal(f, (x,), probes=k, seed=params.seed + 1000 * r + k)
            rows.append({"probes": k, "repeat": r,
                         "relative_error": float((estimate[0] - truth).norm() / truth.norm())})
    return pd.DataFrame(rows)


MODE_LABELS = {"double_backward": "double backward (exact)", "forward_over_reverse": "forward-over-reverse (exact)",
               "finite_difference": "finite difference of gradients (approximate)"}


def hvp_table(check: pd.DataFrame):
    return D.table(check, {"HVP mode": lambda t: t["mode"].map(MODE_LABELS),
                           "‖Hv − H_dense v‖ / ‖H_dense v‖": lambda t: t["relative_error"].map(lambda e: f"{e:.1e}")})


def error_figure(errors: pd.DataFrame):
    """Median relative error (and the 10–90 % range over repeats) against K, with a 1/√K guide."""
    import matplotlib.pyplot as plt

    from heart_lib import plots

    plots.use_style()
    by_k = errors.groupby("probes")["relative_error"]
    k = np.array(sorted(errors["probes"].unique()), dtype=float)
    median, lo, hi = by_k.median().to_numpy(), by_k.quantile(0.1).to_numpy(), by_k.quantile(0.9).to_numpy()
    fig, ax = plt.subplots(figsize=(0.7 * plots.COLUMN_WIDTH, 3.4))
    style = plots.styles(["Hutchinson"])["Hutchinson"]
    ax.fill_between(k, lo, hi, alpha=0.25, color=style["color"], label="10–90 % of repeats")
    ax.plot(k, median, label="median error", **style)
    ax.plot(k, median[0] / np.sqrt(k / k[0]), ls="--", color="grey", label="1/√K")
    ax.set(xscale="log", yscale="log", xlabel="probes K", ylabel="relative error of diag(H)")
    ax.legend()
    return fig


def slope(errors: pd.DataFrame) -> float:
    """Fitted exponent of the median error against K on log axes (−0.5 for 1/√K)."""
    median = errors.groupby("probes")["relative_error"].median()
    return float(np.polyfit(np.log(median.index.to_numpy(float)), np.log(median.to_numpy()), 1)[0])
