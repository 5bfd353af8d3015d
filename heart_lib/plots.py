"""Figure styles shared by every chapter (one look across the book)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

PALETTE = "colorblind"


def use_style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "figure.autolayout": True})


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Accuracy and mean confidence per confidence bin (equal width), with counts."""
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    frame = pd.DataFrame({"bin": index, "confidence": confidence, "correct": correct.astype(float)})
    grouped = frame.groupby("bin").agg(confidence=("confidence", "mean"), accuracy=("correct", "mean"),
                                       count=("correct", "size")).reset_index()
    grouped["lower"], grouped["upper"] = edges[grouped["bin"]], edges[grouped["bin"] + 1]
    return grouped


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Count-weighted mean |accuracy - confidence| over equal-width bins."""
    table = reliability_bins(confidence, correct, bins)
    return float((table["count"] * (table["accuracy"] - table["confidence"]).abs()).sum() / len(confidence))


def calibration_figure(per_image: pd.DataFrame, title: str):
    """Left: confidence histogram, correct vs wrong. Right: reliability diagram."""
    use_style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    frame = per_image.assign(outcome=np.where(per_image["correct"], "correct", "wrong"))
    sns.histplot(frame, x="confidence", hue="outcome", bins=20, binrange=(0, 1), multiple="stack", ax=left)
    left.set(xlabel="confidence (max softmax probability)", ylabel="images", title="Confidence")
    bins = reliability_bins(per_image["confidence"].to_numpy(), per_image["correct"].to_numpy())
    right.bar(bins["lower"], bins["accuracy"], width=bins["upper"] - bins["lower"], align="edge",
              edgecolor="white", label="accuracy in bin")
    right.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    right.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title="Reliability")
    right.legend(loc="upper left")
    fig.suptitle(title)
    return fig
