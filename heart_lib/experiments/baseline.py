"""Baseline chapter: the unpruned model's accuracy, loss and calibration on real images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from heart_lib import data, models, results
from heart_lib import display as D
from heart_lib.experiments.common import model_and_dataset

# Published ImageNet-1k validation top-1 (%, 50,000 images) of the models the profiles use, to set
# our sample's accuracy beside. DeiT: Touvron et al. 2021, Table 1; ViT-B/16 as distributed by timm
# is not a single published number, so it is left out.
PUBLISHED_TOP1 = {"deit_tiny_patch16_224": 72.2, "deit_small_patch16_224": 79.8, "deit_base_patch16_224": 81.8}


@dataclass(frozen=True)
class Params:
    model: str = "deit_tiny_patch16_224"
    weights: str = "mirror"  # none | mirror | hub | auto | path to a state_dict
    dataset: str = "imagenet-val-1300"
    data_path: str | None = None  # folder for datasets that are not in the mirror
    limit: int | None = None  # a seeded subset of this many images; None = all
    batch_size: int = 64
    seed: int = 0
    num_classes: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments

    def check(self) -> None:
        models.check_model_name(self.model)
        if self.dataset not in data.DATASETS:
            raise ValueError(f"parameter 'dataset' = {self.dataset!r}: allowed values are {list(data.DATASETS)}")
        if self.batch_size <= 0:
            raise ValueError(f"parameter 'batch_size' = {self.batch_size}: must be a positive integer")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"parameter 'limit' = {self.limit}: must be a positive integer or null")


def build(params: Params):
    """The model and the evaluation dataset the parameters describe."""
    return model_and_dataset(params)


def run(params: Params, out: Path) -> tuple[pd.DataFrame, dict[str, float]]:
    """Evaluate the unpruned model; write the per-image table and the summary under `out`."""
    model, dataset = build(params)
    table = models.evaluate(model, data.make_loader(dataset, params.batch_size))
    summary = models.summarize(table)
    results.write_table(out / "per_image.csv", table, meta={"params": vars(params)})
    results.write_json(out / "summary.json", {**summary, "model": params.model, "dataset": params.dataset,
                                              "weights": str(params.weights)})
    return table, summary


def summary_table(summary: dict[str, float]):
    """The summary as a small display table (percentages with 95 % intervals)."""
    rows = [{"metric": label, "value": f"{D.percent(summary[name])} %",
             "95 % interval": f"{D.percent(summary[name + '_lo'])}–{D.percent(summary[name + '_hi'])} %"}
            for name, label in (("top1", "top-1 accuracy"), ("top5", "top-5 accuracy"))]
    rows.append({"metric": "mean cross-entropy (nats)", "value": f"{summary['loss']:.3f}",
                 "95 % interval": f"± {1.96 * summary['loss_sem']:.3f}"})
    rows.append({"metric": "images", "value": f"{int(summary['n']):,}", "95 % interval": ""})
    return D.table(pd.DataFrame(rows))


def compare_with_published(model: str, summary: dict[str, float]) -> str:
    """One sentence placing the published top-1 relative to our interval (or saying there is none)."""
    published = PUBLISHED_TOP1.get(model)
    if published is None:
        return f"No published top-1 accuracy of `{model}` is recorded in the library to compare with."
    lo, hi = 100 * summary["top1_lo"], 100 * summary["top1_hi"]
    where = "inside" if lo <= published <= hi else ("below" if published < lo else "above")
    return (f"The published top-1 accuracy of `{model}` on all 50,000 validation images is {published} %; "
            f"it lies **{where}** our 95 % interval ({lo:.1f}–{hi:.1f} %).")
