"""Fine-tuning chapter: does training recover the accuracy that pruning costs, and does HEART recover
better than its peers when every model is trained equally? (book/method.md, 'Fine-tuning and edge
measurements', claim C5)

Every model runs at the model's own resolution (224 px for DeiT-Tiny). Two experiments, each
training every setting with one recipe on the same data in the same order:

(a) ImageNet recovery: the pretrained model, pruned, is fine-tuned on `imagenet-sample-1000` by
    distillation from the unpruned model and tested on the 1300 other images the baseline chapter
    uses (before any training the unpruned model must score the baseline chapter's accuracy: a
    check, `check_against_baseline`). Extra unlabelled images (CIFAR-10 train images at 224 px,
    distillation only) are tried on HEART's setting and reported; they join every setting only when
    a profile sets `extra_images`.
(b) CIFAR-10 transfer: the pretrained model gets a new 10-class head and is adapted to CIFAR-10;
    then each setting, pruned from that transferred model, and the unpruned control train for the
    same further epochs.

Settings (`*_settings`): `unpruned` (the control); HEART's declared selector (`primary_selector`,
the learned gate trained on HEART curvature, which re-selects each image's tokens inside every
forward pass, while training too) at the book's "40 % token pruning" (`definitions.TOKENS_40`);
`joint`, the same selector plus the heads with the lowest HEART scores (`joint_head_share` of the
FLOPs), its keep ratio matched so it saves the same FLOPs; and peers (class attention, EViT, ToMe),
each matched to the same FLOPs as HEART's setting.

Recovery is reported both ways the paper's "+4.7 %" can be read: after − before fine-tuning at the
same pruning, and after − the unpruned model (as it was, and fine-tuned equally); and HEART against
each peer after equal training. Accuracies carry Wilson intervals (per epoch too: the recovery
curves); differences on the same test images carry paired bootstrap intervals over images.
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
from torch.utils.data import ConcatDataset, Dataset

from heart_lib import catalogue, data, models, planning, results
from heart_lib import display as D
from heart_lib.experiments.definitions import TOKENS_40, TOKENS_40_NAME, tokens_40_text
from heart_lib.finetune import TrainConfig, image_transform, materialize, model_at_resolution, train
from heart_lib.finetune.recipe import AMP_MODES
from heart_lib.flops import count_flops, vit_shape
from heart_lib.pruning import PruningConfig, prune, train_token_gate
from heart_lib.pruning.selectors import block_inputs, gate_rank_agreement
from heart_lib.stats import paired_difference, wilson_interval

EXPERIMENTS = ("imagenet", "transfer")
UNPRUNED, JOINT = "unpruned", "joint"
GATE_NAME = "finetune-gate"  # names the gate this chapter trains inside configuration strings
COMPARISONS = {
    "vs_before": "after − before fine-tuning (same pruning)",
    "vs_unpruned": "after − unpruned model, not fine-tuned further",
    "vs_unpruned_tuned": "after − unpruned model fine-tuned equally",
}
UNLABELLED = -100  # label of extra distillation images: cross-entropy ignores it (distillation only)


def token_reducers() -> tuple[str, ...]:
    """Token selectors and peers a setting may name (the oracle scores every forward with HVPs:
    not trainable here)."""
    oracles = set(catalogue.oracle_reducers())
    return tuple(r for r in catalogue.reducers() if r not in oracles)


def _uses_gate(selector: str) -> bool:
    return "gate" in catalogue.reducer(selector).needs


@dataclass(frozen=True)
class Params:
    model: str = "deit_tiny_patch16_224"
    weights: str = "mirror"  # none | mirror | hub | auto | path
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (smoke)
    data_path: str | None = None
    seed: int = 0
    # pruning: the book's "40 % token pruning" (heart_lib.experiments.definitions.TOKENS_40)
    token_keep: float = TOKENS_40.keep[0]  # fraction of tokens kept at each pruning layer (compounding)
    token_layers: list[int] = field(default_factory=lambda: list(TOKENS_40.layers))  # blocks whose input is pruned
    # Declared before any result was read: HEART's own inference-time selector
    primary_selector: str = "gate"  # HEART's token selector (declared before any result): the learned gate
    joint_head_share: float = 0.07  # FLOPs share the joint setting takes from heads (as the pruning chapter)
    calib_method: str = "heart_hutchinson"  # HEART curvature the gate learns and the joint setting's heads are ranked by
    probes: int = 4  # Hutchinson probes per calibration image
    calib_limit: int = 64  # training images the gate and head scores are computed on
    gate_hidden: int = 64  # width of the gate's hidden layer
    gate_epochs: int = 40  # epochs the gate is trained on the calibration scores
    # (a) ImageNet recovery by distillation
    imagenet: bool = True  # run the ImageNet recovery experiment
    imagenet_settings: list[str] = field(default_factory=lambda: [UNPRUNED, "gate", JOINT, "cls_attention",
                                                                  "evit", "tome"])  # settings trained equally
    imagenet_train: str = "imagenet-sample-1000"  # training images (none of them in the test set)
    imagenet_test: str = "imagenet-val-1300"  # test images (the baseline chapter's)
    imagenet_train_limit: int | None = None  # training images used (None = all)
    imagenet_test_limit: int | None = None  # test images used (None = all)
    imagenet_epochs: int = 3  # fine-tuning epochs of every ImageNet setting
    imagenet_lr: float = 5e-5  # peak learning rate of the ImageNet runs
    distill_alpha: float = 0.9  # weight of distillation from the unpruned model (1 − weight: labels)
    distill_temperature: float = 1.0  # softmax temperature of the distillation
    extra_dataset: str = "cifar10-train"  # unlabelled distillation images (distillation loss only)
    extra_images: int = 0  # extra images every ImageNet setting trains on (0 = none)
    extra_check_images: int = 0  # extra images tried on HEART's setting alone, against none (0 = no check)
    # (b) transfer to CIFAR-10
    transfer: bool = True  # run the CIFAR-10 transfer experiment
    transfer_settings: list[str] = field(default_factory=lambda: [UNPRUNED, "gate", JOINT])  # settings trained equally
    transfer_train: str = "cifar10-train"  # transfer training images
    transfer_test: str = "cifar10-test"  # transfer test images
    transfer_train_limit: int | None = 5000  # transfer training images used (None = all)
    transfer_test_limit: int | None = 2000  # transfer test images used (None = all)
    transfer_epochs: int = 1  # unpruned model, new head: ImageNet -> CIFAR-10
    recovery_epochs: int = 1  # then each setting, the unpruned control included
    transfer_lr: float = 3e-4  # peak learning rate of the head adaptation
    recovery_lr: float = 1e-4  # peak learning rate of the transfer recovery runs
    # recipe shared by every run
    batch_size: int = 32
    min_crop_scale: float = 0.5  # training augmentation: random resized crops of at least this area, and flips
    warmup_epochs: float = 0.2  # linear warm-up before the cosine decay
    weight_decay: float = 0.05  # AdamW weight decay (weight matrices only)
    label_smoothing: float = 0.1  # label smoothing of the cross-entropy
    amp: str = "auto"  # mixed precision: auto (bf16 on a GPU, off on a CPU) | off | bf16 | fp16
    workers: int = 0  # data-loading processes
    threads: int | None = None  # torch CPU threads (None = leave as is); recorded with the timings
    bootstrap: int = 2000  # paired bootstrap resamples over test images
    baseline_tolerance: int = 2  # test images the unpruned model may differ by from the baseline chapter

    def check(self) -> None:
        models.check_model_name(self.model)
        for name in ("transfer_train", "transfer_test", "imagenet_train", "imagenet_test", "extra_dataset"):
            if getattr(self, name) not in data.DATASETS:
                raise ValueError(f"parameter {name!r} = {getattr(self, name)!r}: allowed values are "
                                 f"{list(data.DATASETS)}")
        for name in ("transfer_epochs", "recovery_epochs", "imagenet_epochs", "batch_size", "calib_limit",
                     "bootstrap", "probes", "gate_hidden", "gate_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parameter {name!r} = {value!r}: must be a positive integer")
        for name in ("transfer_train_limit", "transfer_test_limit", "imagenet_train_limit", "imagenet_test_limit",
                     "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"parameter {name!r} = {value!r}: must be a positive integer or null")
        for name in ("extra_images", "extra_check_images", "baseline_tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"parameter {name!r} = {getattr(self, name)}: must be 0 or a positive integer")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"parameter 'min_crop_scale' = {self.min_crop_scale}: must be in (0, 1]")
        if not 0 < self.joint_head_share < 1:
            raise ValueError(f"parameter 'joint_head_share' = {self.joint_head_share}: must be in (0, 1)")
        if self.amp not in AMP_MODES:
            raise ValueError(f"parameter 'amp' = {self.amp!r}: allowed values are {list(AMP_MODES)}")
        allowed = token_reducers()
        if self.primary_selector not in allowed or catalogue.reducer(self.primary_selector).schedule != "symmetric":
            raise ValueError(f"parameter 'primary_selector' = {self.primary_selector!r}: allowed "
                             f"{[r for r in allowed if catalogue.reducer(r).schedule == 'symmetric']}")
        for name in ("imagenet_settings", "transfer_settings"):
            settings = getattr(self, name)
            bad = [s for s in settings if s not in (UNPRUNED, JOINT, *allowed)]
            if bad:
                raise ValueError(f"parameter {name!r} has {bad}: allowed {[UNPRUNED, JOINT, *allowed]}")
            if len(set(settings)) != len(settings) or UNPRUNED not in settings or self.primary_selector not in settings:
                raise ValueError(f"parameter {name!r} = {settings}: each setting once, with {UNPRUNED!r} (the "
                                 f"control) and the primary selector {self.primary_selector!r}")
        try:
            config = self.token_config()
        except ValueError as err:
            raise ValueError(f"parameters 'token_keep'/'token_layers'/'primary_selector': {err}") from None
        if not config.prunes_tokens:
            raise ValueError(f"parameter 'token_keep' = {self.token_keep}: must be below 1 (this chapter prunes tokens)")
        if not (self.transfer or self.imagenet):
            raise ValueError("parameters 'transfer' and 'imagenet' are both false: nothing to run")
        for epochs in (self.transfer_epochs, self.recovery_epochs, self.imagenet_epochs):
            self.recipe(epochs, 1e-4)  # validates warm-up, decay, smoothing, distillation

    def token_config(self) -> PruningConfig:
        """HEART's token setting (every other setting is matched to its FLOPs)."""
        gate = {"gate": GATE_NAME} if _uses_gate(self.primary_selector) else {}
        return PruningConfig(layers=tuple(self.token_layers), keep=(self.token_keep,), selector=self.primary_selector,
                             seed=self.seed, **gate)

    def recipe(self, epochs: int, lr: float, distill_alpha: float = 0.0) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=lr, min_lr=lr / 100,
                           warmup_epochs=min(self.warmup_epochs, epochs), weight_decay=self.weight_decay,
                           label_smoothing=self.label_smoothing, distill_alpha=distill_alpha,
                           distill_temperature=self.distill_temperature, amp=self.amp, seed=self.seed,
                           workers=self.workers, eval_every_epoch=True)

    def key(self) -> str:
        """The cache key of the runs (parameters + the code they run): names the checkpoint folder."""
        from heart_lib.results import cache_key

        return cache_key("finetune-runs", dataclasses.asdict(self), (__name__,))


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
    settings: list[str]
    calib_name: str  # the training set the gate and head scores are computed on
    calib_crop: float | None  # evaluation crop of that set (1.0: small images, never cropped)


def _dataset(params: Params, name: str, model, transform, limit: int | None, seed: int | None = None):
    size = int(model.patch_embed.img_size[0])
    return data.image_dataset(name, None if name == "synthetic" else transform, limit=limit,
                              seed=params.seed if seed is None else seed, path=params.data_path, image_size=size,
                              num_classes=model.num_classes)


def _test_set(dataset, model, max_bytes: float = 2.5e9):
    """Decode and transform the test images once when they fit in memory (every epoch reads them)."""
    side = int(model.patch_embed.img_size[0])
    return materialize(dataset) if len(dataset) * 3 * side * side * 4 <= max_bytes else dataset


class Unlabelled(Dataset):
    """`dataset`'s images with the label UNLABELLED: they teach by distillation only."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index][0], UNLABELLED


@dataclass
class Calibration:
    """HEART's curvature on calibration images: the gate trained on it, and the head ranking."""

    gate: Any
    head_scores: torch.Tensor  # [layers, heads], mean over the images
    agreement: dict[int, float]  # held-out Spearman of the gate with HEART scores, per layer
    seconds: float


def calibrate(params: Params, model, images: torch.Tensor, chunk: int = 16) -> Calibration:
    """Score the calibration images (pseudo-label loss: no labels), train the gate on 3/4 of them and
    measure its rank agreement on the rest, as the pruning chapter does for the pretrained model."""
    from heart_lib import sensitivity

    start = time.perf_counter()
    model = model.eval()
    layers = tuple(params.token_layers)
    tokens: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    heads = []
    for i in range(0, len(images), chunk):
        s = sensitivity.score_components(model, images[i:i + chunk], layers=layers, heads=True,
                                         method=params.calib_method, loss="pseudo", probes=params.probes,
                                         seed=params.seed)
        for l in layers:
            tokens[l].append(s.tokens[l])
        heads.append(s.heads)
    scores = {l: torch.cat(v) for l, v in tokens.items()}
    feats = block_inputs(model, images, layers, params.batch_size)
    split = max(1, (3 * len(images)) // 4)
    prefix = model.num_prefix_tokens
    gate = train_token_gate({l: f[:split] for l, f in feats.items()}, {l: s[:split] for l, s in scores.items()},
                            prefix, hidden=params.gate_hidden, epochs=params.gate_epochs, seed=params.seed)
    held = slice(split, None) if split < len(images) else slice(None)
    agreement = gate_rank_agreement(gate, {l: f[held] for l, f in feats.items()},
                                    {l: s[held] for l, s in scores.items()}, prefix)
    return Calibration(gate, torch.cat(heads).nanmean(0), agreement, time.perf_counter() - start)


def pruning_settings(params: Params, dense, calib: Calibration, settings: list[str]) -> dict[str, PruningConfig | None]:
    """Every setting's configuration, each matched to the FLOPs HEART's token setting saves."""
    reduction = planning.flops_reduction_on(dense, params.gate_hidden)
    reference = params.token_config()
    target = reduction(reference)
    layers = tuple(params.token_layers)
    gate_kw = {"gate": GATE_NAME} if _uses_gate(params.primary_selector) else {}
    out: dict[str, PruningConfig | None] = {}
    for setting in settings:
        if setting == UNPRUNED:
            out[setting] = None
        elif setting == params.primary_selector:
            out[setting] = reference
        elif setting == JOINT:
            num_heads = {l: b.heads for l, b in enumerate(vit_shape(dense).blocks)}
            try:
                heads = planning.heads_for_target(calib.head_scores, params.joint_head_share, reduction, num_heads)
            except ValueError as err:
                raise ValueError(f"parameter 'joint_head_share': {err}") from None
            out[setting] = planning.match_keep(reduction, target, layers, params.primary_selector, heads=heads,
                                               seed=params.seed, **gate_kw)
        elif catalogue.reducer(setting).schedule == "constant_merge":
            out[setting] = planning.match_constant_merge(reduction, target, vit_shape(dense).num_patches(),
                                                         len(dense.blocks), setting)
        else:
            kw = {"gate": GATE_NAME} if _uses_gate(setting) else {}
            out[setting] = planning.match_keep(reduction, target, layers, setting, seed=params.seed, **kw)
    return out


def _run_dir(params: Params, *parts: str) -> Path:
    from heart_lib.paths import cache_dir

    return cache_dir() / "finetune-runs" / params.key() / Path(*parts)


def _evaluate(model, test_set, batch_size: int) -> pd.DataFrame:
    return models.evaluate(model, data.make_loader(test_set, batch_size))


def _train(params: Params, part: Part, setting: str, model, recipe: TrainConfig, teacher=None, tag: str = "recovery",
           train_set=None):
    fingerprint = {"experiment": part.name, "setting": setting, "stage": tag}
    result = train(model, part.train_set if train_set is None else train_set, recipe,
                   _run_dir(params, part.name, f"{setting}-{tag}"), transform=part.train_transform, teacher=teacher,
                   eval_set=part.test_set, fingerprint=fingerprint, desc=f"{part.name} {setting} {tag}")
    history = result.history.assign(experiment=part.name, setting=setting, stage=tag)
    return result.model, history


def imagenet_part(params: Params) -> Part:
    """(a): the pretrained model at its own resolution, distilled on the ImageNet sample; the test
    images are preprocessed as the baseline chapter does (timm's data config)."""
    dense = model_at_resolution(params.model, params.weights, None, None, seed=params.seed, **params.model_kwargs)
    train_tf = image_transform(dense, train=True, min_scale=params.min_crop_scale)
    train_set = _dataset(params, params.imagenet_train, dense, None, params.imagenet_train_limit)
    if params.extra_images:
        train_set = ConcatDataset([train_set, _extra_set(params, dense, params.extra_images)])
    test_set = _test_set(_dataset(params, params.imagenet_test, dense, data.model_transform(dense),
                                  params.imagenet_test_limit), dense)
    recipe = params.recipe(params.imagenet_epochs, params.imagenet_lr, params.distill_alpha)
    return Part("imagenet", dense, train_set, None if params.imagenet_train == "synthetic" else train_tf,
                test_set, recipe, copy.deepcopy(dense).eval(), list(params.imagenet_settings), params.imagenet_train,
                None)


def _extra_set(params: Params, model, count: int):
    """`count` unlabelled images of `extra_dataset` (a seed of their own: not the transfer images)."""
    return Unlabelled(_dataset(params, params.extra_dataset, model, None, count, seed=params.seed + 7))


def transfer_part(params: Params) -> tuple[Part, pd.DataFrame]:
    """(b): the pretrained model with a new head, adapted on the transfer training set."""
    dense = model_at_resolution(params.model, params.weights, 10, None, seed=params.seed, **params.model_kwargs)
    train_tf = image_transform(dense, train=True, min_scale=params.min_crop_scale)
    test_tf = image_transform(dense, train=False, crop_pct=1.0)  # 32 px images: resize, never crop
    train_set = _dataset(params, params.transfer_train, dense, None, params.transfer_train_limit)
    test_set = _test_set(_dataset(params, params.transfer_test, dense, test_tf, params.transfer_test_limit), dense)
    recipe = params.recipe(params.recovery_epochs, params.recovery_lr)
    part = Part("transfer", dense, train_set, None if params.transfer_train == "synthetic" else train_tf,
                test_set, recipe, None, list(params.transfer_settings), params.transfer_train, 1.0)
    dense, history = _train(params, part, UNPRUNED, dense, params.recipe(params.transfer_epochs, params.transfer_lr),
                            tag="transfer")
    part.dense = dense.cpu().eval()
    return part, history


def _calibration_images(params: Params, part: Part) -> torch.Tensor:
    tf = image_transform(part.dense, train=False, crop_pct=part.calib_crop)
    return materialize(_dataset(params, part.calib_name, part.dense, tf, params.calib_limit, seed=params.seed + 1)).images


def check_against_baseline(top1_correct: np.ndarray, baseline: Path, params: Params) -> dict[str, Any]:
    """The unpruned model before fine-tuning must score what the baseline chapter measured on the same
    images (same model, weights and test set); a larger gap means the preprocessing or the weights
    differ, and every comparison of this chapter would be off. Returns what was checked."""
    table, meta = baseline / "per_image.csv", baseline / "per_image.meta.json"
    if not table.is_file() or not meta.is_file():
        return {"checked": False, "why": "this profile has no baseline results"}
    theirs = results.read_json(meta).get("params", {})
    same = {"model": params.model, "weights": params.weights, "dataset": params.imagenet_test,
            "limit": params.imagenet_test_limit}
    if any(theirs.get(k) != v for k, v in same.items()):
        return {"checked": False, "why": "the baseline chapter ran another model, weights or test set"}
    expected = int(pd.read_csv(table)["correct"].sum())
    ours = int(np.sum(top1_correct))
    if len(top1_correct) != len(pd.read_csv(table)) or abs(ours - expected) > params.baseline_tolerance:
        raise RuntimeError(f"the unpruned model scores {ours}/{len(top1_correct)} before fine-tuning but the baseline "
                           f"chapter measured {expected} on the same images: check the preprocessing and weights "
                           f"(tolerance: baseline_tolerance = {params.baseline_tolerance} images)")
    return {"checked": True, "ours_correct": ours, "baseline_correct": expected, "images": len(top1_correct)}


def _row(part: Part, setting: str, config, stage: str, table: pd.DataFrame, flops: float, dense_flops: float,
         size: int, seconds: float) -> dict[str, Any]:
    summary = models.summarize(table)
    return {"experiment": part.name, "setting": setting, "pruning": config.to_string() if config else "none",
            "stage": stage, "top1": summary["top1"], "top1_lo": summary["top1_lo"], "top1_hi": summary["top1_hi"],
            "loss": summary["loss"], "images": int(summary["n"]), "gflops": flops / 1e9,
            "flops_reduction": 1 - flops / dense_flops, "image_size": size, "eval_seconds": seconds}


def run_part(params: Params, part: Part) -> tuple[list[dict[str, Any]], pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Before/after evaluation of every setting of one experiment: accuracy rows, per-image outcomes,
    training histories and the calibration's record."""
    calib = calibrate(params, part.dense, _calibration_images(params, part))
    settings = pruning_settings(params, part.dense, calib, part.settings)
    size = int(part.dense.patch_embed.img_size[0])
    dense_flops = count_flops(part.dense, size)
    rows, outcomes, histories = [], {}, []
    runs = [(s, c, s, None) for s, c in settings.items()]
    if part.name == "imagenet" and params.extra_check_images:
        extra = ConcatDataset([part.train_set, _extra_set(params, part.dense, params.extra_check_images)])
        runs.append((f"{params.primary_selector}+extra", settings[params.primary_selector], "extra", extra))
    for setting, config, tag, train_set in runs:
        gate = calib.gate if config is not None and _uses_gate(config.selector) else None
        before = copy.deepcopy(part.dense) if config is None else prune(part.dense, config, gate=gate)
        flops = count_flops(before, size)
        start = time.perf_counter()
        table_before = _evaluate(before, part.test_set, params.batch_size)
        seconds = time.perf_counter() - start
        after, history = _train(params, part, setting, before, part.recipe, part.teacher,
                                tag="recovery" if train_set is None else tag, train_set=train_set)
        histories.append(history.assign(before_top1=float(table_before["correct"].mean())))
        table_after = _evaluate(after, part.test_set, params.batch_size)
        after.cpu()
        for stage, table in (("before", table_before), ("after", table_after)):
            outcomes[f"{setting}_{stage}"] = table["correct"].to_numpy()
            rows.append(_row(part, setting, config, stage, table, flops, dense_flops, size, seconds))
    labels = data.dataset_labels(part.test_set)
    per_image = pd.DataFrame({"experiment": part.name, "image": np.arange(len(labels)), "label": labels,
                              **{k: v.astype(int) for k, v in outcomes.items()}})
    record = {"calibration_seconds": calib.seconds, "gate_spearman_heldout": calib.agreement,
              "settings": {s: c.to_string() if c else "none" for s, c in settings.items()}}
    return rows, per_image, pd.concat(histories, ignore_index=True), record


def recovery_rows(per_image: pd.DataFrame, n_resamples: int, seed: int) -> pd.DataFrame:
    """Recovery of every pruned setting, the three ways of COMPARISONS, with paired bootstrap intervals;
    plus the unpruned control's own after − before (what the extra epochs alone do)."""
    rows = []
    for experiment, outcomes in per_image.groupby("experiment", sort=False):
        outcomes = outcomes.dropna(axis=1, how="all")
        settings = [c[:-len("_after")] for c in outcomes.columns if c.endswith("_after")]
        pairs = [(UNPRUNED, "vs_before", f"{UNPRUNED}_after", f"{UNPRUNED}_before")]
        for setting in settings:
            if setting != UNPRUNED:
                pairs += [(setting, "vs_before", f"{setting}_after", f"{setting}_before"),
                          (setting, "vs_unpruned", f"{setting}_after", f"{UNPRUNED}_before"),
                          (setting, "vs_unpruned_tuned", f"{setting}_after", f"{UNPRUNED}_after")]
        for setting, comparison, a, b in pairs:
            diff, lo, hi = paired_difference(outcomes[a].to_numpy(), outcomes[b].to_numpy(), n_resamples, seed)
            rows.append({"experiment": experiment, "setting": setting, "comparison": comparison,
                         "meaning": COMPARISONS[comparison], "difference": diff, "lo": lo, "hi": hi,
                         "images": len(outcomes)})
    return pd.DataFrame(rows)


def peer_rows(per_image: pd.DataFrame, primary: str, n_resamples: int, seed: int) -> pd.DataFrame:
    """HEART's setting against every other pruned setting on the same images, before and after the
    same fine-tuning (paired bootstrap): does HEART recover better than its peers?"""
    rows = []
    for experiment, outcomes in per_image.groupby("experiment", sort=False):
        outcomes = outcomes.dropna(axis=1, how="all")
        others = [c[:-len("_after")] for c in outcomes.columns if c.endswith("_after")
                  and c[:-len("_after")] not in (UNPRUNED, primary, f"{primary}+extra")]
        for other in others:
            row = {"experiment": experiment, "setting": primary, "against": other, "images": len(outcomes)}
            for stage in ("before", "after"):
                diff, lo, hi = paired_difference(outcomes[f"{primary}_{stage}"].to_numpy(),
                                                 outcomes[f"{other}_{stage}"].to_numpy(), n_resamples, seed)
                row.update({f"{stage}": diff, f"{stage}_lo": lo, f"{stage}_hi": hi})
            rows.append(row)
    return pd.DataFrame(rows)


def curve_rows(accuracy: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Top-1 after each epoch 0…E of every setting's recovery run (epoch 0: before fine-tuning), with
    95 % Wilson intervals."""
    rows = []
    before = accuracy[accuracy["stage"] == "before"]
    for r in before.itertuples():
        rows.append({"experiment": r.experiment, "setting": r.setting, "epoch": 0, "top1": r.top1,
                     "top1_lo": r.top1_lo, "top1_hi": r.top1_hi, "images": r.images})
    runs = history[history["stage"] != "transfer"]
    for r in runs.itertuples():
        n = int(r.eval_images)
        hits = int(round(r.eval_top1 * n))
        lo, hi = wilson_interval(hits, n)
        rows.append({"experiment": r.experiment, "setting": r.setting, "epoch": int(r.epoch), "top1": hits / n,
                     "top1_lo": lo, "top1_hi": hi, "images": n})
    return pd.DataFrame(rows)


def run(params: Params, out: Path, baseline: Path | None = None) -> dict[str, pd.DataFrame]:
    """Run the enabled experiments; write accuracy, recovery, peer, curve, per-image and history tables
    under `out`. `baseline`: the baseline chapter's results folder (the unpruned model is checked
    against it before any training).

    Every training run checkpoints under the cache (keyed by the parameters and the library's code),
    so a notebook killed part-way resumes where it stopped instead of starting over.
    """
    if params.threads is not None:
        torch.set_num_threads(params.threads)
    start = time.perf_counter()
    accuracy, per_image, histories, timings, records = [], [], [], {}, {}
    for name in EXPERIMENTS:
        if not getattr(params, name):
            continue
        t0 = time.perf_counter()
        if name == "transfer":
            part, history = transfer_part(params)
            histories.append(history)
        else:
            part = imagenet_part(params)
        rows, outcomes, history, record = run_part(params, part)
        if name == "imagenet" and baseline is not None:
            record["baseline_check"] = check_against_baseline(outcomes[f"{UNPRUNED}_before"].to_numpy(), baseline,
                                                              params)
        accuracy += rows
        per_image.append(outcomes)
        histories.append(history)
        records[name] = record
        timings[name] = time.perf_counter() - t0
        del part  # frees the test images before the next experiment
    meta = {"params": dataclasses.asdict(params), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "seconds": {**timings, "total": time.perf_counter() - start}, "experiments": records}
    tables = {"accuracy": pd.DataFrame(accuracy), "per_image": pd.concat(per_image, ignore_index=True),
              "history": pd.concat(histories, ignore_index=True)}
    tables["recovery"] = recovery_rows(tables["per_image"], params.bootstrap, params.seed)
    tables["peers"] = peer_rows(tables["per_image"], params.primary_selector, params.bootstrap, params.seed)
    tables["curves"] = curve_rows(tables["accuracy"], tables["history"])
    for name, table in tables.items():
        results.write_table(out / f"{name}.csv", table, meta=meta)
    results.write_json(out / "run.json", meta)
    # The tables hold every result; the checkpoints (tens of MB per run) only served resumption.
    shutil.rmtree(_run_dir(params), ignore_errors=True)
    return tables


# ---------------------------------------------------------------------------------------- reading

TABLES = ("accuracy", "recovery", "peers", "curves", "per_image", "history")


def load_tables(out: Path) -> dict[str, pd.DataFrame]:
    return {name: results.read_table(out / f"{name}.csv") for name in TABLES}


def setting_label(setting: str, params: Params) -> str:
    """The book's name of a setting (the catalogue's label of its selector)."""
    if setting == JOINT:
        return f"{D.label(params.primary_selector)} + {D.label(params.calib_method)} heads"
    if setting.endswith("+extra"):
        return f"{D.label(setting[:-len('+extra')])}, extra unlabelled images"
    return D.label(setting)


def _labels(frame: pd.DataFrame, params: Params, column: str = "setting") -> list[str]:
    return [setting_label(s, params) for s in frame[column]]


EXPERIMENT_NAMES = {"imagenet": "ImageNet", "transfer": "CIFAR-10"}


def _experiment(frame: pd.DataFrame) -> list[str]:
    return [EXPERIMENT_NAMES.get(e, e) for e in frame["experiment"]]


def accuracy_table(accuracy: pd.DataFrame, params: Params):
    """Top-1 before and after fine-tuning per experiment and setting (%, 95 % Wilson intervals)."""
    wide = []
    for (experiment, setting), g in accuracy.groupby(["experiment", "setting"], sort=False):
        by = g.set_index("stage")
        wide.append({"experiment": experiment, "setting": setting, "flops": g["flops_reduction"].iloc[0],
                     "before": D.with_interval(*by.loc["before", ["top1", "top1_lo", "top1_hi"]]),
                     "after": D.with_interval(*by.loc["after", ["top1", "top1_lo", "top1_hi"]]),
                     "pruning": g["pruning"].iloc[0]})
    frame = pd.DataFrame(wide)
    return D.table(frame, {"data": _experiment, "setting": lambda t: _labels(t, params),
                           "FLOPs saved (%)": lambda t: [D.percent(v) for v in t["flops"]],
                           "top-1 before (%), 95 % CI": "before", "top-1 after (%), 95 % CI": "after",
                           "configuration": "pruning"})


def _points(frame: pd.DataFrame, value: str, lo: str, hi: str) -> list[str]:
    return [D.with_interval(d, l, h, signed=True) for d, l, h in zip(frame[value], frame[lo], frame[hi])]


def recovery_table(recovery: pd.DataFrame, params: Params):
    """Recovery in percentage points with 95 % paired bootstrap intervals, one row per setting."""
    wide = recovery.pivot_table(index=["experiment", "setting"], columns="comparison",
                                values=["difference", "lo", "hi"], sort=False)
    frame = pd.DataFrame({"experiment": [i[0] for i in wide.index], "setting": [i[1] for i in wide.index]})
    columns = {"data": _experiment, "setting": lambda t: _labels(t, params)}
    for comparison, header in (("vs_before", "after − before (pp)"),
                               ("vs_unpruned", "after − unpruned as it was (pp)"),
                               ("vs_unpruned_tuned", "after − unpruned tuned equally (pp)")):
        cells = [D.with_interval(d, l, h, signed=True) if pd.notna(d) else "—"
                 for d, l, h in zip(wide["difference"][comparison], wide["lo"][comparison], wide["hi"][comparison])]
        frame[comparison] = cells
        columns[header] = comparison
    return D.table(frame, columns)


def peers_table(peers: pd.DataFrame, params: Params):
    """HEART's setting minus each other pruned setting, before and after equal fine-tuning."""
    if peers.empty:
        return D.table(pd.DataFrame({"note": ["no other pruned setting ran"]}))
    return D.table(peers, {"data": _experiment, "HEART's setting": lambda t: _labels(t, params),
                           "against": lambda t: _labels(t, params, "against"),
                           "difference before (pp)": lambda t: _points(t, "before", "before_lo", "before_hi"),
                           "difference after (pp)": lambda t: _points(t, "after", "after_lo", "after_hi"),
                           "test images": "images"})


def history_table(history: pd.DataFrame, params: Params):
    """Per epoch of every training run: loss, learning rate, speed and test accuracy."""
    shown = {"data": _experiment, "setting": lambda t: _labels(t, params), "run": "stage", "epoch": "epoch"}
    for column, header, digits in (("lr", "learning rate (end)", 2), ("train_loss", "train loss", 3),
                                   ("eval_top1", "test top-1", 3), ("train_seconds", "seconds", 3),
                                   ("images_per_second", "images/s", 3)):
        if column in history:
            shown[header] = (lambda t, c=column, d=digits: t[c].map(lambda v: D.number(v, d)))
    return D.table(history, shown)


def scale_sentence(params: Params, accuracy: pd.DataFrame, history: pd.DataFrame) -> str:
    """What was actually trained, in words, from the parameters and the tables (for the chapter)."""
    parts = []
    acc = accuracy.set_index(["experiment", "setting", "stage"])
    experiments = set(acc.index.get_level_values(0))
    if "imagenet" in experiments:
        h = history[(history["experiment"] == "imagenet") & (history["stage"] == "recovery")]
        size = int(acc.loc[("imagenet", UNPRUNED, "before"), "image_size"])
        n_test = int(acc.loc[("imagenet", UNPRUNED, "before"), "images"])
        extra = f" plus {params.extra_images:,} unlabelled `{params.extra_dataset}` images" if params.extra_images else ""
        parts.append(
            f"**ImageNet recovery**: `{params.model}` (weights: {params.weights}) at {size} × {size} px, every "
            f"setting fine-tuned for {params.imagenet_epochs} epoch(s) on {int(h['train_images'].iloc[0]):,} "
            f"`{params.imagenet_train}` images{extra} by distillation from the unpruned model (weight "
            f"{params.distill_alpha:g}, temperature {params.distill_temperature:g}; learning rate "
            f"{params.imagenet_lr:g}); tested on {n_test:,} `{params.imagenet_test}` images.")
    if "transfer" in experiments:
        h = history[history["experiment"] == "transfer"]
        size = int(acc.loc[("transfer", UNPRUNED, "before"), "image_size"])
        n_test = int(acc.loc[("transfer", UNPRUNED, "before"), "images"])
        parts.append(
            f"**CIFAR-10 transfer**: the same pretrained model with a new 10-class head, at {size} × {size} px, "
            f"adapted for {params.transfer_epochs} epoch(s) on {int(h['train_images'].iloc[0]):,} "
            f"`{params.transfer_train}` images (learning rate {params.transfer_lr:g}); then every setting for "
            f"{params.recovery_epochs} more epoch(s) (learning rate {params.recovery_lr:g}); tested on "
            f"{n_test:,} `{params.transfer_test}` images.")
    parts.append(f"Recipe: AdamW, weight decay {params.weight_decay:g}, cosine schedule with "
                 f"{params.warmup_epochs:g}-epoch warm-up, label smoothing {params.label_smoothing:g}, batch "
                 f"{params.batch_size}, random resized crops (area ≥ {params.min_crop_scale:g}) and flips, seed "
                 f"{params.seed}; the paper fine-tunes for 100 epochs.")
    return "\n\n".join(parts)


def definition_sentence(params: Params, accuracy: pd.DataFrame, run_meta: dict[str, Any]) -> str:
    """How the pruned settings were made and matched, from the results."""
    primary = accuracy[(accuracy["setting"] == params.primary_selector) & (accuracy["stage"] == "before")]
    saved = ", ".join(f"{EXPERIMENT_NAMES.get(r.experiment, r.experiment)} {D.percent(r.flops_reduction)} %"
                      for r in primary.itertuples())
    gate = "; ".join(
        f"{EXPERIMENT_NAMES.get(e, e)}: " + ", ".join(f"layer {l} ρ = {v:.2f}" for l, v in rec["gate_spearman_heldout"].items())
        for e, rec in run_meta["experiments"].items())
    ours = PruningConfig(layers=tuple(params.token_layers), keep=(params.token_keep,))
    what = (f"the book's **{tokens_40_text()}**" if ours == TOKENS_40 else
            f"keep {params.token_keep:g} of the tokens at layers {', '.join(map(str, params.token_layers))} "
            f"(this profile's own, not the book's {TOKENS_40_NAME})")
    return (f"HEART's setting is {what}, tokens chosen by "
            f"{D.label(params.primary_selector)} (trained on {params.calib_limit} training images' "
            f"{D.label(params.calib_method)} curvature; held-out rank agreement with it: {gate}). It saves {saved} "
            f"of the FLOPs. Every other pruned setting is matched to those FLOPs: the peers by their own keep "
            f"ratio or merge rate, the joint setting by removing the lowest-scored heads ({D.label(params.calib_method)}, "
            f"{100 * params.joint_head_share:g} % of the FLOPs) and keeping more tokens.")


def baseline_sentence(run_meta: dict[str, Any]) -> str:
    check = run_meta["experiments"].get("imagenet", {}).get("baseline_check")
    if not check:
        return ""
    if not check["checked"]:
        return f"The unpruned model was not checked against the baseline chapter ({check['why']})."
    return (f"Check: before any training the unpruned model classifies {check['ours_correct']:,} of the "
            f"{check['images']:,} test images correctly; the baseline chapter measured {check['baseline_correct']:,} "
            f"(the run stops when they differ by more than a couple of images).")


def timing_sentence(history: pd.DataFrame, run_meta: dict[str, Any], params: Params) -> str:
    rows = history.groupby(["experiment", "setting", "stage"], sort=False)["train_seconds"].median()
    text = "; ".join(f"{EXPERIMENT_NAMES.get(e, e)} {setting_label(s, params)}"
                     f"{' (head adaptation)' if stage == 'transfer' else ''}: {v:.0f} s"
                     for (e, s, stage), v in rows.items())
    return (f"Seconds per training epoch on this machine ({run_meta['device']}, {run_meta['threads']} thread(s)), "
            f"median over epochs: {text}. The whole chapter took {run_meta['seconds']['total'] / 60:.1f} min.")


def findings(recovery: pd.DataFrame, peers: pd.DataFrame, params: Params) -> str:
    """One sentence per experiment for HEART's setting, then how it compares with its peers."""
    out = []
    for experiment, g in recovery[recovery["setting"] != UNPRUNED].groupby("experiment", sort=False):
        for setting, s in g.groupby("setting", sort=False):
            if setting not in (params.primary_selector, JOINT):
                continue
            r = s.set_index("comparison")

            def fmt(key: str) -> str:
                return D.with_interval(r.loc[key, "difference"], r.loc[key, "lo"], r.loc[key, "hi"], signed=True) + " pp"
            gap = r.loc["vs_unpruned_tuned"]
            verdict = ("**exceeds**" if gap["lo"] > 0 else "**stays below**" if gap["hi"] < 0
                       else "cannot be told apart from")
            out.append(f"- **{EXPERIMENT_NAMES.get(experiment, experiment)}, {setting_label(setting, params)}**: "
                       f"fine-tuning changes its accuracy by {fmt('vs_before')}; against the unpruned model it is "
                       f"{fmt('vs_unpruned')} as that model was and {fmt('vs_unpruned_tuned')} against it fine-tuned "
                       f"equally, so it {verdict} the equally fine-tuned baseline here.")
        p = peers[peers["experiment"] == experiment]
        if len(p):
            better = [setting_label(a, params) for a, lo in zip(p["against"], p["after_lo"]) if lo > 0]
            worse = [setting_label(a, params) for a, hi in zip(p["against"], p["after_hi"]) if hi < 0]
            tied = [setting_label(a, params) for a, lo, hi in zip(p["against"], p["after_lo"], p["after_hi"])
                    if lo <= 0 <= hi]
            parts = ([f"above {', '.join(better)}"] if better else []) + \
                    ([f"below {', '.join(worse)}"] if worse else []) + \
                    ([f"indistinguishable from {', '.join(tied)}"] if tied else [])
            out.append(f"- **{EXPERIMENT_NAMES.get(experiment, experiment)}, after equal fine-tuning** HEART's "
                       f"setting is {'; '.join(parts)} (paired 95 % intervals).")
    return "\n".join(out)


def extra_sentence(recovery: pd.DataFrame, per_image: pd.DataFrame, params: Params) -> str:
    """Did the extra unlabelled images help HEART's setting? (paired, after fine-tuning)"""
    name = f"{params.primary_selector}+extra"
    imagenet = per_image[per_image["experiment"] == "imagenet"]
    if f"{name}_after" not in imagenet or imagenet[f"{name}_after"].isna().all():
        return ("Extra unlabelled distillation images were not tried in this profile "
                "(`extra_check_images: 0`).")
    diff, lo, hi = paired_difference(imagenet[f"{name}_after"].to_numpy(),
                                     imagenet[f"{params.primary_selector}_after"].to_numpy(), params.bootstrap,
                                     params.seed)
    helped = lo > 0
    return (f"Extra unlabelled images: {setting_label(params.primary_selector, params)} trained with "
            f"{params.extra_check_images:,} `{params.extra_dataset}` images added (distillation loss only) ends "
            f"{D.with_interval(diff, lo, hi, signed=True)} pp against the same setting without them (paired 95 % "
            f"interval). They {'help' if helped else 'do not help measurably'}, so "
            + ("a profile may add them to every setting (`extra_images`)." if helped else
               "no setting of this profile trains on them (`extra_images` stays 0)."))


def curves_figure(curves: pd.DataFrame, params: Params):
    """Top-1 after each epoch (0 = before fine-tuning) per setting, one panel per experiment, 95 % bands."""
    import matplotlib.pyplot as plt

    from heart_lib import plots

    plots.use_style()
    experiments = list(dict.fromkeys(curves["experiment"]))
    fig, axes = plt.subplots(1, len(experiments), figsize=(plots.COLUMN_WIDTH, 4.4), squeeze=False)
    style = plots.styles(list(dict.fromkeys(curves["setting"])))
    for ax, experiment in zip(axes[0], experiments):
        g = curves[curves["experiment"] == experiment]
        for setting, s in g.groupby("setting", sort=False):
            s = s.sort_values("epoch")
            st = style[setting]
            ax.plot(s["epoch"], 100 * s["top1"], marker=st["marker"], color=st["color"],
                    label=setting_label(setting, params), linestyle="--" if setting == UNPRUNED else "-")
            ax.fill_between(s["epoch"], 100 * s["top1_lo"], 100 * s["top1_hi"], color=st["color"], alpha=0.15,
                            linewidth=0)
        ax.set_xticks(sorted(g["epoch"].unique()))
        ax.set_xlabel("fine-tuning epochs")
        ax.set_title(f"{EXPERIMENT_NAMES.get(experiment, experiment)} ({int(g['images'].iloc[0]):,} test images)")
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(2, len(labels)), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.055 * ((len(labels) + 1) // 2) + 0.03, 1, 1))
    return fig
