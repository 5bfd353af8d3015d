"""Figure styles shared by every chapter (one look across the book)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

PALETTE = "colorblind"
# The book's text column is about 690 px wide at a 1280 px window (measured in the browser tests):
# at 110 dpi a 6.3-inch figure is shown at its own size, so its text keeps its size on the page.
COLUMN_WIDTH = 6.3
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")


def use_style() -> None:
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.2)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "figure.autolayout": True,
                         "legend.fontsize": 8, "axes.titlesize": 10})


def styles(names) -> dict[str, dict[str, str]]:
    """Colour-blind-safe colour and a distinct marker per name, in the order given (stable per call)."""
    colours = sns.color_palette(PALETTE, n_colors=10)
    return {name: {"color": colours[i % len(colours)], "marker": MARKERS[i % len(MARKERS)]}
            for i, name in enumerate(dict.fromkeys(names))}


def show(fig, path) -> None:
    """Save `fig` (atomically, under the results) and show it once on the page, with no other output."""
    from IPython.display import display

    from heart_lib import results

    results.save_figure(fig, path)
    display(fig)
    plt.close(fig)  # else the inline backend would draw it a second time


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


def calibration_figure(per_image: pd.DataFrame, title: str = ""):
    """Left: confidence histogram, correct vs wrong. Right: reliability diagram."""
    use_style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(COLUMN_WIDTH, 3.2))
    frame = per_image.assign(outcome=np.where(per_image["correct"], "correct", "wrong"))
    sns.histplot(frame, x="confidence", hue="outcome", bins=20, binrange=(0, 1), multiple="stack", ax=left)
    left.set(xlabel="confidence (max softmax probability)", ylabel="images", title="Confidence")
    bins = reliability_bins(per_image["confidence"].to_numpy(), per_image["correct"].to_numpy())
    right.bar(bins["lower"], bins["accuracy"], width=bins["upper"] - bins["lower"], align="edge",
              edgecolor="white", label="accuracy in bin")
    right.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    right.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title="Reliability")
    right.legend(loc="upper left")
    if title:  # pages caption their figures; a title is for figures shown elsewhere
        fig.suptitle(title)
    return fig
