"""Fine-tuning chapter: does training recover the accuracy that pruning costs? (book/method.md, 'Fine-tuning and edge measurements', claim C5)

Two experiments, each comparing three models trained with the same recipe on the same data in the
same order: the unpruned model, the token-pruned model ("40 % token pruning") and a joint
token + head pruned model.

(a) transfer: the ImageNet-pretrained model gets a new 10-class head and is fine-tuned on CIFAR-10
    (the "transferred" model); then each pruned copy, and the unpruned control, is fine-tuned for
    the same further epochs.
(b) ImageNet recovery: the pretrained model is pruned and fine-tuned on 1000 ImageNet images (one
    per class) by distillation from the unpruned model, and evaluated on 1300 other images.

Recovery is reported both ways the paper's "+4.7 %" can be read: after − before fine-tuning at the
same pruning, and after − the unpruned model (as it was, and fine-tuned equally). Accuracies carry
Wilson intervals; differences on the same test images carry paired bootstrap intervals over images.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from heart_lib import data, models, results
from heart_lib import display as D
from heart_lib.finetune import TrainConfig, image_transform, materialize, model_at_resolution, train
from heart_lib.finetune.recipe import AMP_MODES
from heart_lib.flops import count_flops
from heart_lib.paths import cache_dir
from heart_lib.planning import lowest_heads
from heart_lib.pruning import PruningConfig, prune
from heart_lib.stats import paired_difference, wilson_interval

SETTINGS = ("unpruned", "tokens", "joint")
EXPERIMENTS = ("transfer", "imagenet")
COMPARISONS = {
    "vs_before": "after − before fine-tuning (same pruning)",
    "vs_unpruned": "after − unpruned model, not fine-tuned further",
    "vs_unpruned_tuned": "after − unpruned model fine-tuned equally",
}


@dataclass(frozen=True)
class Params:
    model: str = "deit_tiny_patch16_224"
    weights: str = "mirror"  # none | mirror | hub | auto | path
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (smoke)
    data_path: str | None = None
    seed: int = 0
    # pruning: "40 % token pruning" follows the pruning chapter (keep 0.6 at each of layers 3, 6, 9)
    token_keep: float = 0.6  # fraction of tokens kept at each pruning layer (compounding, EViT convention)
    token_layers: list[int] = field(default_factory=lambda: [3, 6, 9])
    token_selector: str = "cls_attention"  # per-image selector run inside the forward pass while training
    joint_heads: int = 6  # heads removed in the joint setting: the lowest mean HEART head scores
    head_method: str = "heart"  # sensitivity method ranking the heads
    calib_limit: int = 32  # training images the head scores are computed on
    # (a) transfer to CIFAR-10
    transfer: bool = True
    transfer_train: str = "cifar10-train"
    transfer_test: str = "cifar10-test"
    transfer_train_limit: int | None = 3000
    transfer_test_limit: int | None = 2000
    transfer_image_size: int | None = 64  # None = the model's own
    transfer_epochs: int = 2  # unpruned model, new head: ImageNet -> CIFAR-10
    recovery_epochs: int = 1  # then each pruned model and the unpruned control
    transfer_lr: float = 3e-4
    recovery_lr: float = 1e-4
    transfer_distill_alpha: float = 0.0  # distillation from the transferred unpruned model in recovery
    # (b) ImageNet recovery by distillation
    imagenet: bool = True
    imagenet_train: str = "imagenet-sample-1000"
    imagenet_test: str = "imagenet-val-1300"
    imagenet_train_limit: int | None = None
    imagenet_test_limit: int | None = None
    imagenet_image_size: int | None = 112
    imagenet_epochs: int = 2
    imagenet_lr: float = 5e-5
    distill_alpha: float = 0.9
    distill_temperature: float = 1.0
    # recipe shared by every run
    batch_size: int = 32
    min_crop_scale: float = 0.5  # training augmentation: random resized crops of at least this area, and flips
    warmup_epochs: float = 0.2
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    amp: str = "auto"
    workers: int = 0
    eval_each_epoch: bool = False  # also evaluate after every epoch (the tables get eval columns)
    threads: int | None = None  # torch CPU threads (None = leave as is); recorded with the timings
    bootstrap: int = 2000  # paired bootstrap resamples over test images

    def check(self) -> None:
        models.check_model_name(self.model)
        for name in ("transfer_train", "transfer_test", "imagenet_train", "imagenet_test"):
            if getattr(self, name) not in data.DATASETS:
                raise ValueError(f"parameter {name!r} = {getattr(self, name)!r}: allowed values are "
                                 f"{list(data.DATASETS)}")
        for name in ("transfer_epochs", "recovery_epochs", "imagenet_epochs", "batch_size", "calib_limit",
                     "bootstrap"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parameter {name!r} = {value!r}: must be a positive integer")
        for name in ("transfer_train_limit", "transfer_test_limit", "imagenet_train_limit", "imagenet_test_limit",
                     "transfer_image_size", "imagenet_image_size", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"parameter {name!r} = {value!r}: must be a positive integer or null")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"parameter 'min_crop_scale' = {self.min_crop_scale}: must be in (0, 1]")
        if self.joint_heads < 1:
            raise ValueError(f"parameter 'joint_heads' = {self.joint_heads}: must be a positive integer")
        if self.amp not in AMP_MODES:
            raise ValueError(f"parameter 'amp' = {self.amp!r}: allowed values are {list(AMP_MODES)}")
        try:
            config = self.token_config()
        except ValueError as err:
            raise ValueError(f"parameters 'token_keep'/'token_layers'/'token_selector': {err}") from None
        if not config.prunes_tokens:
            raise ValueError(f"parameter 'token_keep' = {self.token_keep}: must be below 1 (this chapter prunes tokens)")
        if not (self.transfer or self.imagenet):
            raise ValueError("parameters 'transfer' and 'imagenet' are both false: nothing to run")
        for epochs in (self.transfer_epochs, self.recovery_epochs, self.imagenet_epochs):
            self.recipe(epochs, 1e-4)  # validates warm-up, decay, smoothing, distillation

    def token_config(self) -> PruningConfig:
        """The token-pruning setting (the joint setting adds heads to it)."""
        return PruningConfig(layers=tuple(self.token_layers), keep=(self.token_keep,), selector=self.token_selector,
                             seed=self.seed)

    def recipe(self, epochs: int, lr: float, distill_alpha: float = 0.0) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=lr, min_lr=lr / 100,
                           warmup_epochs=min(self.warmup_epochs, epochs), weight_decay=self.weight_decay,
                           label_smoothing=self.label_smoothing, distill_alpha=distill_alpha,
                           distill_temperature=self.distill_temperature, amp=self.amp, seed=self.seed,
                           workers=self.workers, eval_every_epoch=self.eval_each_epoch)

    def key(self) -> str:
        """The cache key of the runs (parameters + the code they run): names the checkpoint folder."""
        from heart_lib.results import cache_key

        return cache_key("finetune-runs", dataclasses.asdict(self), (__name__,))


# ---------------------------------------------------------------------------------------- maths

# ---------------------------------------------------------------------------------------- runs

@dataclass
class Part:
    """What one experiment needs: the starting model, datasets and the recipe of the recovery runs."""

    name: str
    dense: torch.nn.Module
    train_set: Any
    train_transform: Any
    test_set: Any
    recipe: TrainConfig
    teacher: torch.nn.Module | None


def _dataset(params: Params, name: str, model, transform, limit: int | None):
    size = int(model.patch_embed.img_size[0])
    return data.image_dataset(name, None if name == "synthetic" else transform, limit=limit, seed=params.seed,
                              path=params.data_path, image_size=size, num_classes=model.num_classes)


def _test_set(dataset, model, max_bytes: float = 1.5e9):
    """Decode and transform the test images once when they fit in memory (they are read six times)."""
    side = int(model.patch_embed.img_size[0])
    return materialize(dataset) if len(dataset) * 3 * side * side * 4 <= max_bytes else dataset


def _head_scores(model, images: torch.Tensor, params: Params, chunk: int = 16) -> torch.Tensor:
    """Mean head scores [layers, heads] over the calibration images (pseudo-label loss: no labels)."""
    from heart_lib import sensitivity

    parts = [sensitivity.score_heads(model, images[i:i + chunk], method=params.head_method, loss="pseudo",
                                     seed=params.seed + i) for i in range(0, len(images), chunk)]
    return torch.cat(parts).mean(0)


def pruning_settings(params: Params, dense, calib_images: torch.Tensor) -> dict[str, PruningConfig | None]:
    tokens = params.token_config()
    try:
        heads = lowest_heads(_head_scores(dense.eval(), calib_images, params), params.joint_heads)
    except ValueError as err:
        raise ValueError(f"parameter 'joint_heads': {err}") from None
    return {"unpruned": None, "tokens": tokens, "joint": tokens.replace(heads=tuple(heads.items()))}


def _run_dir(params: Params, *parts: str) -> Path:
    return cache_dir() / "finetune-runs" / params.key() / Path(*parts)


def _evaluate(model, test_set, batch_size: int) -> pd.DataFrame:
    return models.evaluate(model, data.make_loader(test_set, batch_size))


def _train(params: Params, part: Part, setting: str, model, recipe: TrainConfig, teacher=None, tag: str = "recovery"):
    fingerprint = {"experiment": part.name, "setting": setting, "stage": tag}
    result = train(model, part.train_set, recipe, _run_dir(params, part.name, f"{setting}-{tag}"),
                   transform=part.train_transform, teacher=teacher, eval_set=part.test_set,
                   fingerprint=fingerprint, desc=f"{part.name} {setting} {tag}")
    history = result.history.assign(experiment=part.name, setting=setting, stage=tag)
    return result.model, history


def transfer_part(params: Params) -> tuple[Part, pd.DataFrame]:
    """(a): the pretrained model with a new head, fine-tuned on the transfer training set."""
    dense = model_at_resolution(params.model, params.weights, 10, params.transfer_image_size, seed=params.seed,
                                **params.model_kwargs)
    train_tf = image_transform(dense, train=True, min_scale=params.min_crop_scale)
    test_tf = image_transform(dense, train=False, crop_pct=1.0)  # 32 px images: resize, never crop
    train_set = _dataset(params, params.transfer_train, dense, None, params.transfer_train_limit)
    test_set = _test_set(_dataset(params, params.transfer_test, dense, test_tf, params.transfer_test_limit), dense)
    recipe = params.recipe(params.recovery_epochs, params.recovery_lr, params.transfer_distill_alpha)
    part = Part("transfer", dense, train_set, None if params.transfer_train == "synthetic" else train_tf,
                test_set, recipe, None)
    dense, history = _train(params, part, "unpruned", dense, params.recipe(params.transfer_epochs, params.transfer_lr),
                            tag="transfer")
    part.dense = dense.cpu().eval()
    part.teacher = copy.deepcopy(part.dense) if params.transfer_distill_alpha > 0 else None
    return part, history


def imagenet_part(params: Params) -> Part:
    """(b): the pretrained model at the chosen resolution, distilled on the ImageNet sample."""
    dense = model_at_resolution(params.model, params.weights, None, params.imagenet_image_size, seed=params.seed,
                                **params.model_kwargs)
    train_tf = image_transform(dense, train=True, min_scale=params.min_crop_scale)
    test_tf = image_transform(dense, train=False)
    train_set = _dataset(params, params.imagenet_train, dense, None, params.imagenet_train_limit)
    test_set = _test_set(_dataset(params, params.imagenet_test, dense, test_tf, params.imagenet_test_limit), dense)
    recipe = params.recipe(params.imagenet_epochs, params.imagenet_lr, params.distill_alpha)
    return Part("imagenet", dense, train_set, None if params.imagenet_train == "synthetic" else train_tf,
                test_set, recipe, copy.deepcopy(dense).eval())


def _calibration_images(params: Params, part: Part) -> torch.Tensor:
    test_tf = image_transform(part.dense, train=False, crop_pct=1.0 if part.name == "transfer" else None)
    name = params.transfer_train if part.name == "transfer" else params.imagenet_train
    calib = materialize(_dataset(params, name, part.dense, test_tf, params.calib_limit))
    return calib.images


def run_part(params: Params, part: Part) -> tuple[list[dict[str, Any]], pd.DataFrame, pd.DataFrame]:
    """Before/after evaluation of every setting of one experiment: accuracy rows, per-image outcomes,
    training histories."""
    settings = pruning_settings(params, part.dense, _calibration_images(params, part))
    size = int(part.dense.patch_embed.img_size[0])
    dense_flops = count_flops(part.dense, size)
    rows, outcomes, histories = [], {}, []
    for setting, config in settings.items():
        before = copy.deepcopy(part.dense) if config is None else prune(part.dense, config)
        flops = count_flops(before, size)
        start = time.perf_counter()
        table_before = _evaluate(before, part.test_set, params.batch_size)
        eval_seconds = time.perf_counter() - start
        after, history = _train(params, part, setting, before, part.recipe, part.teacher)
        histories.append(history)
        table_after = _evaluate(after, part.test_set, params.batch_size)
        after.cpu()
        for stage, table in (("before", table_before), ("after", table_after)):
            summary = models.summarize(table)
            outcomes[f"{setting}_{stage}"] = table["correct"].to_numpy()
            rows.append({"experiment": part.name, "setting": setting,
                         "pruning": config.to_string() if config else "none", "stage": stage,
                         "top1": summary["top1"], "top1_lo": summary["top1_lo"], "top1_hi": summary["top1_hi"],
                         "loss": summary["loss"], "images": int(summary["n"]), "gflops": flops / 1e9,
                         "flops_reduction": 1 - flops / dense_flops, "image_size": size,
                         "eval_seconds": eval_seconds})
    labels = data.dataset_labels(part.test_set)
    per_image = pd.DataFrame({"experiment": part.name, "image": np.arange(len(labels)), "label": labels,
                              **{k: v.astype(int) for k, v in outcomes.items()}})
    return rows, per_image, pd.concat(histories, ignore_index=True)


def recovery_rows(per_image: pd.DataFrame, n_resamples: int, seed: int) -> pd.DataFrame:
    """Recovery of every pruned setting, the three ways of COMPARISONS, with paired bootstrap intervals;
    plus the unpruned control's own after − before (what the extra epochs alone do)."""
    rows = []
    for experiment, outcomes in per_image.groupby("experiment", sort=False):
        pairs = [("unpruned", "vs_before", "unpruned_after", "unpruned_before")]
        for setting in SETTINGS[1:]:
            pairs += [(setting, "vs_before", f"{setting}_after", f"{setting}_before"),
                      (setting, "vs_unpruned", f"{setting}_after", "unpruned_before"),
                      (setting, "vs_unpruned_tuned", f"{setting}_after", "unpruned_after")]
        for setting, comparison, a, b in pairs:
            diff, lo, hi = paired_difference(outcomes[a].to_numpy(), outcomes[b].to_numpy(), n_resamples, seed)
            rows.append({"experiment": experiment, "setting": setting, "comparison": comparison,
                         "meaning": COMPARISONS[comparison], "difference": diff, "lo": lo, "hi": hi,
                         "images": len(outcomes)})
    return pd.DataFrame(rows)


def run(params: Params, out: Path) -> dict[str, pd.DataFrame]:
    """Run the enabled experiments; write accuracy, recovery, per-image and history tables under `out`.

    Every training run checkpoints under the cache (keyed by the parameters and the library's code),
    so a notebook killed part-way resumes where it stopped instead of starting over.
    """
    if params.threads is not None:
        torch.set_num_threads(params.threads)
    start = time.perf_counter()
    accuracy, per_image, histories, timings = [], [], [], {}
    for name in EXPERIMENTS:
        if not getattr(params, name):
            continue
        t0 = time.perf_counter()
        if name == "transfer":
            part, history = transfer_part(params)
            histories.append(history)
        else:
            part = imagenet_part(params)
        rows, outcomes, history = run_part(params, part)
        accuracy += rows
        per_image.append(outcomes)
        histories.append(history)
        timings[name] = time.perf_counter() - t0
        del part  # frees the test images before the next experiment
    meta = {"params": dataclasses.asdict(params), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "seconds": {**timings, "total": time.perf_counter() - start}}
    tables = {"accuracy": pd.DataFrame(accuracy), "per_image": pd.concat(per_image, ignore_index=True),
              "history": pd.concat(histories, ignore_index=True)}
    tables["recovery"] = recovery_rows(tables["per_image"], params.bootstrap, params.seed)
    for name, table in tables.items():
        results.write_table(out / f"{name}.csv", table, meta=meta)
    results.write_json(out / "run.json", meta)
    # The tables hold every result; the checkpoints (tens of MB per run) only served resumption.
    shutil.rmtree(_run_dir(params), ignore_errors=True)
    return tables


# ---------------------------------------------------------------------------------------- reading

def load_tables(out: Path) -> dict[str, pd.DataFrame]:
    return {name: results.read_table(out / f"{name}.csv") for name in ("accuracy", "recovery", "per_image", "history")}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def accuracy_table(accuracy: pd.DataFrame):
    """Top-1 before and after fine-tuning per experiment and setting (%, 95 % Wilson intervals)."""
    rows = []
    for (experiment, setting), g in accuracy.groupby(["experiment", "setting"], sort=False):
        by_stage = g.set_index("stage")
        row = {"experiment": experiment, "setting": setting,
               "FLOPs saved (%)": D.percent(g["flops_reduction"].iloc[0])}
        for stage in by_stage.index:
            r = by_stage.loc[stage]
            row[f"top-1 {stage} fine-tuning (%), 95 % CI"] = D.with_interval(r["top1"], r["top1_lo"], r["top1_hi"])
        row["pruning"] = g["pruning"].iloc[0]
        rows.append(row)
    return D.table(pd.DataFrame(rows))


def recovery_table(recovery: pd.DataFrame):
    """Recovery in percentage points with 95 % paired bootstrap intervals."""
    return D.table(recovery, {
        "experiment": "experiment", "setting": "setting", "comparison": "meaning",
        "difference (pp), 95 % CI": lambda t: [D.with_interval(d, lo, hi, signed=True)
                                               for d, lo, hi in zip(t["difference"], t["lo"], t["hi"])],
        "test images": "images"}, max_chars=60)


def history_table(history: pd.DataFrame):
    """Per epoch of every training run: loss, learning rate, speed (and evaluation when recorded)."""
    shown = {"experiment": "experiment", "setting": "setting", "stage": "stage", "epoch": "epoch"}
    for column, header, digits in (("step", "steps", 3), ("lr", "learning rate (end)", 2),
                                   ("train_loss", "train loss", 3), ("train_top1", "train top-1", 3),
                                   ("eval_top1", "eval top-1", 3), ("train_seconds", "seconds", 3),
                                   ("images_per_second", "images/s", 3)):
        if column in history:
            shown[header] = (lambda t, c=column, d=digits: t[c].map(lambda v: D.number(v, d)))
    return D.table(history, shown)


def scale_sentence(params: Params, accuracy: pd.DataFrame, history: pd.DataFrame) -> str:
    """What was actually trained, in words, from the parameters and the tables (for the chapter)."""
    parts = []
    acc = accuracy.set_index(["experiment", "setting", "stage"])
    if params.transfer and "transfer" in acc.index.get_level_values(0):
        h = history[(history["experiment"] == "transfer")]
        n_train = int(h["train_images"].iloc[0])
        size = int(acc.loc[("transfer", "unpruned", "before"), "image_size"])
        n_test = int(acc.loc[("transfer", "unpruned", "before"), "images"])
        parts.append(
            f"**Transfer**: `{params.model}` (weights: {params.weights}) with a new 10-class head, at {size} × {size} px, "
            f"fine-tuned for {params.transfer_epochs} epoch(s) on {n_train:,} `{params.transfer_train}` images "
            f"(learning rate {params.transfer_lr:g}); then each setting for {params.recovery_epochs} more "
            f"epoch(s) (learning rate {params.recovery_lr:g}"
            + (f", distillation weight {params.transfer_distill_alpha:g}" if params.transfer_distill_alpha else "")
            + f"); tested on {n_test:,} `{params.transfer_test}` images.")
    if params.imagenet and "imagenet" in acc.index.get_level_values(0):
        h = history[(history["experiment"] == "imagenet")]
        n_train = int(h["train_images"].iloc[0])
        size = int(acc.loc[("imagenet", "unpruned", "before"), "image_size"])
        n_test = int(acc.loc[("imagenet", "unpruned", "before"), "images"])
        parts.append(
            f"**ImageNet recovery**: the same pretrained model at {size} × {size} px, each setting fine-tuned for "
            f"{params.imagenet_epochs} epoch(s) on {n_train:,} `{params.imagenet_train}` images by distillation "
            f"from the unpruned model (weight {params.distill_alpha:g}, temperature {params.distill_temperature:g}; "
            f"learning rate {params.imagenet_lr:g}); tested on {n_test:,} `{params.imagenet_test}` images.")
    parts.append(f"Recipe: AdamW, weight decay {params.weight_decay:g}, cosine schedule with "
                 f"{params.warmup_epochs:g}-epoch warm-up, label smoothing {params.label_smoothing:g}, batch "
                 f"{params.batch_size}, random resized crops (area ≥ {params.min_crop_scale:g}) and flips, seed "
                 f"{params.seed}; the paper fine-tunes for 100 epochs.")
    return "\n\n".join(parts)


def timing_sentence(history: pd.DataFrame, run_meta: dict[str, Any]) -> str:
    rates = history.groupby(["experiment", "stage"])["images_per_second"].median()
    per_epoch = history.groupby(["experiment"])["train_seconds"].median()
    text = "; ".join(f"{exp}: median {per_epoch[exp]:.1f} s per epoch ({rates[exp].max():.0f} images/s)"
                     for exp in per_epoch.index)
    return (f"Training time on this machine ({run_meta['device']}, {run_meta['threads']} thread(s)): {text}; "
            f"the whole chapter took {run_meta['seconds']['total'] / 60:.1f} min.")


def findings(recovery: pd.DataFrame) -> str:
    """One sentence per experiment and pruned setting, read off the recovery table."""
    out = []
    for (experiment, setting), g in recovery[recovery["setting"] != "unpruned"].groupby(["experiment", "setting"],
                                                                                          sort=False):
        r = g.set_index("comparison")
        def fmt(key):
            return f"{100 * r.loc[key, 'difference']:+.1f} pp ({100 * r.loc[key, 'lo']:+.1f} to {100 * r.loc[key, 'hi']:+.1f})"
        gap = r.loc["vs_unpruned_tuned"]
        verdict = ("**exceeds**" if gap["lo"] > 0 else "**stays below**" if gap["hi"] < 0
                   else "is **statistically indistinguishable from**")
        out.append(f"- **{experiment}, {setting}**: fine-tuning changes accuracy by {fmt('vs_before')} relative to "
                   f"the same pruned model before; relative to the unpruned model it is {fmt('vs_unpruned')} "
                   f"(as it was) and {fmt('vs_unpruned_tuned')} (fine-tuned equally), so it {verdict} the "
                   f"equally fine-tuned baseline at this scale.")
    return "\n".join(out)


def recovery_figure(accuracy: pd.DataFrame):
    """Top-1 before/after fine-tuning per setting, one panel per experiment, 95 % Wilson bars."""
    import matplotlib.pyplot as plt

    from heart_lib import plots

    plots.use_style()
    experiments = list(dict.fromkeys(accuracy["experiment"]))
    fig, axes = plt.subplots(1, len(experiments), figsize=(plots.COLUMN_WIDTH, 3.4), squeeze=False, sharey=True)
    colours = plots.styles(["before", "after"])
    for ax, experiment in zip(axes[0], experiments):
        g = accuracy[accuracy["experiment"] == experiment]
        settings = list(dict.fromkeys(g["setting"]))
        x = np.arange(len(settings))
        for offset, stage in ((-0.18, "before"), (0.18, "after")):
            s = g[g["stage"] == stage].set_index("setting").loc[settings]
            err = np.vstack([s["top1"] - s["top1_lo"], s["top1_hi"] - s["top1"]]) * 100
            ax.bar(x + offset, s["top1"] * 100, width=0.36, yerr=err, capsize=3, label=f"{stage} fine-tuning",
                   color=colours[stage]["color"], hatch="" if stage == "before" else "//", edgecolor="white")
        labels = [f"{st}\n−{100 * g[g['setting'] == st]['flops_reduction'].iloc[0]:.0f} % FLOPs" for st in settings]
        ax.set_xticks(x, labels)
        ax.set_ylabel("top-1 accuracy (%)" if ax is axes[0][0] else "")
        ax.set_title(f"{experiment} ({int(g['images'].iloc[0])} test images)")
        ax.legend(loc="lower left")
    fig.tight_layout()
    return fig
