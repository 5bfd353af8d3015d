"""CAMP-HiVe chapter: Hessian-guided weight scores, percentile splits and cyclic pair merging, measured.

Two parts, each optional (model = null skips it):
- `cifar`: a CIFAR ResNet (the paper's ResNet-56, or ResNet-20 where the CPU budget needs it)
  trained here from scratch by `heart_lib.resnet_cifar`'s recipe, pruned and briefly fine-tuned;
- `vit`: DeiT-Tiny with its real weights, pruned and evaluated on the 1300 ImageNet validation images.

For each part: the dominant Hessian eigenpair (λ, v) over the prunable tensors and how concentrated v
is; then every (score, rule, sparsity) of the grid, evaluated right after pruning and, for the scores
listed in `*_finetune_scores`, after the same short fine-tuning with masks enforced (the unpruned
model gets the same fine-tuning, so recovery is compared with like). The reference behaviour
(masks not re-applied) is run for the method's own configuration to show what it does to sparsity.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from heart_lib import camphive, data, models, resnet_cifar, results
from heart_lib.experiments.verdicts import Row, missing as _missing
from heart_lib.stats import paired_difference

PARTS = ("cifar", "vit")
STAGES = ("pruned", "fine-tuned", "fine-tuned, masks off")


@dataclass(frozen=True)
class Params:
    seed: int = 0
    split: str = "per_tensor"  # per_tensor | global
    merge_factor: float = 0.5  # the share of a pruned weight its partner receives
    power_iters: int = 20
    power_tol: float = 1e-3
    hutchinson_probes: int = 4
    hvp_mode: str = "double_backward"  # see heart_lib.curvature.MODES
    measure_latency: bool = True  # dense latency of the unpruned and the sparsest model (quiet machine only)
    verdicts: bool = True  # false for the smoke profile: plumbing, no claims
    # --- CIFAR part
    cifar_model: str | None = "resnet20"  # resnet20 | resnet56 | resnet8 (smoke) | null
    cifar_dataset: str = "cifar10"  # cifar10 | synthetic (smoke: random images, seconds)
    cifar_train_epochs: int = 160
    cifar_train_limit: int | None = None  # training images; None = all 50,000
    cifar_test_limit: int | None = None  # test images; None = all 10,000
    cifar_tensors: str = "conv_linear"
    cifar_calibration_batches: int = 4
    cifar_batch_size: int = 128
    cifar_sparsities: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    cifar_scores: list[str] = field(default_factory=lambda: list(camphive.SCORES))
    cifar_rules: list[str] = field(default_factory=lambda: list(camphive.RULES))
    cifar_finetune_scores: list[str] = field(default_factory=lambda: list(camphive.SCORES))
    cifar_finetune_steps: int = 200
    cifar_finetune_lr: float = 0.01
    # --- ViT part
    vit_model: str | None = "deit_tiny_patch16_224"
    vit_weights: str = "mirror"
    vit_dataset: str = "imagenet-val-1300"
    vit_limit: int | None = None
    vit_calibration_dataset: str = "imagenet-sample-1000"  # also the fine-tuning images
    vit_calibration_limit: int | None = 256
    vit_tensors: str = "blocks_linear"
    vit_calibration_batches: int = 2
    vit_batch_size: int = 32
    vit_sparsities: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    vit_scores: list[str] = field(default_factory=lambda: list(camphive.SCORES))
    vit_rules: list[str] = field(default_factory=lambda: list(camphive.RULES))
    vit_finetune_scores: list[str] = field(default_factory=list)
    vit_finetune_steps: int = 20
    vit_finetune_lr: float = 1e-3
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm arguments (smoke: a tiny ViT)

    def check(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"parameter '{name}' = {getattr(self, name)!r}: {allowed}")

        if self.split not in camphive.SPLITS:
            raise bad("split", f"allowed values are {list(camphive.SPLITS)}")
        if not 0 < self.merge_factor <= 1:
            raise bad("merge_factor", "must be in (0, 1]")
        for name in ("power_iters", "hutchinson_probes"):
            if getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        if self.cifar_model is not None and self.cifar_model not in resnet_cifar.DEPTHS:
            raise bad("cifar_model", f"allowed values are {list(resnet_cifar.DEPTHS)} or null")
        if self.vit_model is not None:
            models.check_model_name(self.vit_model)
        for part in PARTS:
            for s in getattr(self, f"{part}_sparsities"):
                if not 0 < s < 1:
                    raise ValueError(f"parameter '{part}_sparsities' contains {s}: each sparsity must be in (0, 1)")
            for name, allowed in (("scores", camphive.SCORES), ("rules", camphive.RULES),
                                  ("finetune_scores", camphive.SCORES)):
                values = getattr(self, f"{part}_{name}")
                unknown = [v for v in values if v not in allowed]
                if unknown:
                    raise ValueError(f"parameter '{part}_{name}' = {values}: unknown {unknown}; allowed {list(allowed)}")
            for name in ("calibration_batches", "batch_size", "finetune_steps"):
                if getattr(self, f"{part}_{name}") < (0 if name == "finetune_steps" else 1):
                    raise bad(f"{part}_{name}", "must be a positive integer" if name != "finetune_steps" else ">= 0")
        if "eigvec" not in self.cifar_scores or "eigvec" not in self.vit_scores:
            raise ValueError("parameters 'cifar_scores'/'vit_scores' must include 'eigvec' (the method itself)")
        if self.cifar_dataset not in resnet_cifar.DATASETS:
            raise bad("cifar_dataset", f"allowed values are {list(resnet_cifar.DATASETS)}")
        if self.vit_dataset not in data.DATASETS:
            raise bad("vit_dataset", f"allowed values are {list(data.DATASETS)}")


# ------------------------------------------------------------------ the two parts


@dataclass
class Part:
    """What one part needs: its model, images, tensors to prune, grid and fine-tuning."""

    name: str
    model: torch.nn.Module
    test_set: data.TensorImages  # normalised float images
    train_batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # seed -> endless batches
    calibration: list[tuple[torch.Tensor, torch.Tensor]]
    tensors: str
    sparsities: list[float]
    scores: list[str]
    rules: list[str]
    finetune_scores: list[str]
    finetune_steps: int
    finetune_lr: float
    batch_size: int
    setting: dict[str, Any]


def cifar_part(params: Params, log: Callable[[str], None] = print) -> Part:
    recipe = resnet_cifar.Recipe(model=params.cifar_model, dataset=params.cifar_dataset, epochs=params.cifar_train_epochs,
                                 train_limit=params.cifar_train_limit, batch_size=params.cifar_batch_size,
                                 seed=params.seed)
    model, record = resnet_cifar.train(recipe, log)
    train_set = resnet_cifar.cifar_tensors("train", params.cifar_train_limit, params.seed, params.cifar_dataset)
    test = resnet_cifar.cifar_tensors("test", params.cifar_test_limit, params.seed, params.cifar_dataset)
    test_set = data.TensorImages(resnet_cifar.normalise(test.images), test.targets)

    def train_batches(seed: int):
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield from resnet_cifar.batches(train_set, params.cifar_batch_size, shuffle=True, generator=generator,
                                            train_augment=True)

    # Calibration: un-augmented training images (the loss the weights were trained on).
    calibration = list(itertools.islice(resnet_cifar.batches(train_set, params.cifar_batch_size, shuffle=True,
                                                             generator=torch.Generator().manual_seed(params.seed + 1)),
                                        params.cifar_calibration_batches))
    return Part("cifar", model, test_set, train_batches, calibration, params.cifar_tensors,
                list(params.cifar_sparsities), list(params.cifar_scores), list(params.cifar_rules),
                list(params.cifar_finetune_scores), params.cifar_finetune_steps, params.cifar_finetune_lr,
                params.cifar_batch_size,
                {"model": params.cifar_model, "dataset": f"{params.cifar_dataset} test", "train_images": record["train_images"],
                 "train_epochs": params.cifar_train_epochs, "train_seconds": record["train_seconds"],
                 "train_cached": record["cached"]})


def vit_part(params: Params) -> Part:
    from heart_lib.finetune.inputs import materialize

    model = models.create_model(params.vit_model, params.vit_weights, seed=params.seed, **params.model_kwargs)
    size = int(model.patch_embed.img_size[0])
    transform = data.model_transform(model)

    def images(name: str, limit: int | None) -> data.TensorImages:
        dataset = data.image_dataset(name, None if name == "synthetic" else transform, limit=limit,
                                     seed=params.seed, image_size=size, num_classes=model.num_classes)
        return materialize(dataset)

    test_set = images(params.vit_dataset, params.vit_limit)
    calib_set = images("synthetic" if params.vit_dataset == "synthetic" else params.vit_calibration_dataset,
                       params.vit_calibration_limit)

    def train_batches(seed: int):
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(calib_set), generator=generator)
            for start in range(0, len(order) - params.vit_batch_size + 1, params.vit_batch_size):
                index = order[start:start + params.vit_batch_size]
                yield calib_set.images[index], calib_set.targets[index]

    b = params.vit_batch_size
    calibration = [(calib_set.images[i:i + b], calib_set.targets[i:i + b])
                   for i in range(0, min(len(calib_set), b * params.vit_calibration_batches), b)]
    return Part("vit", model.eval(), test_set, train_batches, calibration, params.vit_tensors,
                list(params.vit_sparsities), list(params.vit_scores), list(params.vit_rules),
                list(params.vit_finetune_scores), params.vit_finetune_steps, params.vit_finetune_lr, b,
                {"model": params.vit_model, "dataset": params.vit_dataset, "weights": params.vit_weights})


# ------------------------------------------------------------------ one part, end to end


def _evaluate(model: torch.nn.Module, test_set: data.TensorImages, batch_size: int) -> pd.DataFrame:
    return models.evaluate(model.eval(), data.make_loader(test_set, batch_size), progress=False)


def fine_tune(model: torch.nn.Module, batches: Iterator, steps: int, lr: float,
              after_step: Callable[[], None] | None = None) -> float:
    """`steps` of SGD (momentum 0.9, weight decay 1e-4, constant lr); batch-norm statistics adapt too.
    Returns the mean loss of the last quarter of the steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    losses = []
    for images, labels in itertools.islice(batches, steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-max(1, len(losses) // 4):]
    return float(np.mean(tail)) if tail else float("nan")


def _row(part: Part, score: str, rule: str, sparsity: float, stage: str, table: pd.DataFrame, model, names,
         example) -> dict[str, Any]:
    summary = models.summarize(table)
    dense, sparse = camphive.dense_and_sparse_macs(model, example)
    return {"part": part.name, "model": part.setting["model"], "score": score, "rule": rule, "sparsity": sparsity,
            "stage": stage, "top1": summary["top1"], "top1_lo": summary["top1_lo"], "top1_hi": summary["top1_hi"],
            "loss": summary["loss"], "achieved_sparsity": camphive.sparsity(model, names),
            "dense_macs": dense, "sparse_macs": sparse, "images": int(summary["n"])}


def run_part(params: Params, part: Part, log: Callable[[str], None] = print
             ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, np.ndarray], dict[str, torch.nn.Module]]:
    """Curvature, then every configuration of the grid. Returns (curvature record, accuracy rows,
    per-image correctness by configuration id, a few models for the latency check)."""
    dense = part.model.eval()
    names = camphive.prunable_names(dense, part.tensors)
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    example = part.test_set.images[:1]
    start = time.perf_counter()
    curv = camphive.dominant_eigenpair(dense, names, part.calibration, iters=params.power_iters,
                                       tol=params.power_tol, seed=params.seed, mode=params.hvp_mode)
    power_s = time.perf_counter() - start
    diagonal = (camphive.hessian_diagonal(dense, names, part.calibration, probes=params.hutchinson_probes,
                                          seed=params.seed, mode=params.hvp_mode) if "obd" in part.scores else None)
    weights = {n: p.detach().clone() for n, p in dense.named_parameters() if n in names}
    record = {"part": part.name, **part.setting, "tensors": part.tensors, "tensor_count": len(names),
              "weights": sum(w.numel() for w in weights.values()), "eigenvalue": curv.eigenvalue,
              "power_iterations": curv.iterations, "power_converged": curv.converged, "power_seconds": power_s,
              "calibration_images": sum(len(y) for _, y in part.calibration),
              **camphive.concentration(curv.eigenvector.values())}
    log(f"{part.name}: λ = {curv.eigenvalue:.3g} after {curv.iterations} iterations ({power_s:.0f} s)")

    rows, correct, keep_models = [], {}, {}

    def record_eval(model, score, rule, sparsity, stage):
        table = _evaluate(model, part.test_set, part.batch_size)
        rows.append(_row(part, score, rule, sparsity, stage, table, model, names, example))
        correct[config_id(part.name, score, rule, sparsity, stage)] = table["correct"].to_numpy()

    record_eval(dense, "none", "none", 0.0, "pruned")
    if part.finetune_scores and part.finetune_steps:
        dense.load_state_dict(state)
        fine_tune(dense, part.train_batches(params.seed), part.finetune_steps, part.finetune_lr)
        record_eval(dense, "none", "none", 0.0, "fine-tuned")
        dense.load_state_dict(state)

    for score in part.scores:
        score_map = camphive.scores(score, weights, eigenvector=curv.eigenvector, diagonal=diagonal, seed=params.seed)
        for sparsity in part.sparsities:
            masks = camphive.keep_masks(score_map, sparsity, params.split)
            for rule in part.rules:
                dense.load_state_dict(state)
                camphive.prune(dense, masks, rule, score_map, params.merge_factor)
                record_eval(dense, score, rule, sparsity, "pruned")
                if sparsity == max(part.sparsities) and score == "eigvec" and rule == part.rules[0]:
                    keep_models["sparsest"] = _copy(dense)
                if score not in part.finetune_scores or not part.finetune_steps:
                    continue
                pruned_state = {k: v.clone() for k, v in dense.state_dict().items()}
                fine_tune(dense, part.train_batches(params.seed), part.finetune_steps, part.finetune_lr,
                          camphive.mask_enforcer(dense, masks))
                record_eval(dense, score, rule, sparsity, "fine-tuned")
                if score == "eigvec" and rule == "merge":  # the reference code's fine-tuning: no masks
                    dense.load_state_dict(pruned_state)
                    fine_tune(dense, part.train_batches(params.seed), part.finetune_steps, part.finetune_lr)
                    record_eval(dense, score, rule, sparsity, "fine-tuned, masks off")
        log(f"{part.name}: score {score} done")
    dense.load_state_dict(state)
    keep_models["unpruned"] = dense
    return record, rows, correct, keep_models


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def config_id(part: str, score: str, rule: str, sparsity: float, stage: str) -> str:
    return f"{part}|{score}|{rule}|{sparsity:.2f}|{stage}"


def dense_latency(models_by_label: dict[str, torch.nn.Module], example: torch.Tensor, batch_sizes=(1, 32)
                  ) -> pd.DataFrame:
    """Median forward latency of each model by the project's one timing harness (`heart_lib.measure`)."""
    from heart_lib.measure.bench import TimingSettings, time_forward

    rows = []
    for label, model in models_by_label.items():
        for batch in batch_sizes:
            x = example[:1].expand(batch, *example.shape[1:]).contiguous()
            timing = time_forward(model.eval(), x, TimingSettings(min_time_s=2.0), "cpu")
            summary = timing.summary(batch)
            rows.append({"model": label, "batch": batch, "latency_median_ms": summary["latency_median_ms"],
                         "latency_p25_ms": summary["latency_p25_ms"], "latency_p75_ms": summary["latency_p75_ms"],
                         "cpu_share": summary["cpu_share"]})
    return pd.DataFrame(rows)


def run(params: Params, out: Path, log: Callable[[str], None] = print) -> dict[str, pd.DataFrame]:
    """Run every enabled part; write curvature.csv, accuracy.csv, correct.npz, latency.csv, summary.json."""
    torch.manual_seed(params.seed)
    curvature_rows, rows, correct, latency = [], [], {}, []
    for name in PARTS:
        if getattr(params, f"{name}_model") is None:
            continue
        part = cifar_part(params, log) if name == "cifar" else vit_part(params)
        record, part_rows, part_correct, kept = run_part(params, part, log)
        curvature_rows.append(record)
        rows += part_rows
        correct.update(part_correct)
        if params.measure_latency:
            timed = dense_latency({f"{part.setting['model']} unpruned": kept["unpruned"],
                                   f"{part.setting['model']} {100 * max(part.sparsities):.0f} % zeros": kept["sparsest"]},
                                  part.test_set.images[:1])
            latency.append(timed.assign(part=name))
    tables = {"curvature": pd.DataFrame(curvature_rows), "accuracy": pd.DataFrame(rows),
              "latency": pd.concat(latency, ignore_index=True) if latency else pd.DataFrame()}
    meta = {"params": asdict(params)}
    for key, table in tables.items():
        results.write_table(out / f"{key}.csv", table, meta=meta)
    with results.atomic_path(out / "correct.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **correct)
    results.write_json(out / "summary.json", {"verdicts": params.verdicts, "split": params.split,
                                              "merge_factor": params.merge_factor,
                                              "parts": [r["part"] for r in curvature_rows]})
    return tables


# ------------------------------------------------------------------ comparisons (pure, from the files)


def load_correct(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "correct.npz") as blob:
        return {k: blob[k] for k in blob.files}


def final_stage(accuracy: pd.DataFrame, part: str, score: str) -> str:
    """The stage a comparison uses: after fine-tuning when that score was fine-tuned, else right after pruning."""
    rows = accuracy[(accuracy["part"] == part) & (accuracy["score"] == score) & (accuracy["stage"] == "fine-tuned")]
    return "fine-tuned" if len(rows) else "pruned"


def comparisons(accuracy: pd.DataFrame, correct: dict[str, np.ndarray], a: tuple[str, str], b: tuple[str, str],
                stage: str | None = None) -> pd.DataFrame:
    """Paired accuracy difference (a − b, same images) at every sparsity of every part, with a
    bootstrap interval. a, b: (score, rule). `stage`: None = after fine-tuning where both were."""
    rows = []
    for part in accuracy["part"].unique():
        at = stage or ("fine-tuned" if final_stage(accuracy, part, a[0]) == final_stage(accuracy, part, b[0]) == "fine-tuned"
                       else "pruned")
        sub = accuracy[accuracy["part"] == part]
        for sparsity in sorted(sub.loc[sub["score"] == a[0], "sparsity"].unique()):
            ka, kb = config_id(part, *a, sparsity, at), config_id(part, *b, sparsity, at)
            if ka not in correct or kb not in correct:
                continue
            diff, lo, hi = paired_difference(correct[ka], correct[kb])
            rows.append({"part": part, "model": sub["model"].iloc[0], "sparsity": sparsity, "stage": at,
                         "difference": diff, "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=["part", "model", "sparsity", "stage", "difference", "lo", "hi"])


def kept_accuracy(accuracy: pd.DataFrame, correct: dict[str, np.ndarray]) -> pd.DataFrame:
    """The method (|v|, merge) against the equally treated unpruned model, per part and sparsity."""
    rows = []
    for part in accuracy["part"].unique():
        stage = final_stage(accuracy, part, "eigvec")
        ref = config_id(part, "none", "none", 0.0, stage)
        for sparsity in sorted(accuracy.loc[(accuracy["part"] == part) & (accuracy["score"] == "eigvec"), "sparsity"].unique()):
            key = config_id(part, "eigvec", "merge", sparsity, stage)
            if key in correct and ref in correct:
                diff, lo, hi = paired_difference(correct[key], correct[ref])
                rows.append({"part": part, "sparsity": sparsity, "stage": stage, "difference": diff, "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=["part", "sparsity", "stage", "difference", "lo", "hi"])


def verdict_of(diffs: pd.DataFrame) -> str:
    """All intervals above 0: reproduced; any below 0: not reproduced; else inconclusive."""
    if diffs.empty:
        return "not testable here"
    if (diffs["hi"] < 0).any():
        return "not reproduced"
    if (diffs["lo"] > 0).all():
        return "reproduced"
    return "inconclusive"


# ------------------------------------------------------------------ tables and figures


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def curvature_table(curv: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "model": curv["model"], "pruned tensors": curv["tensors"] + " (" + curv["tensor_count"].astype(str) + ")",
        "weights": curv["weights"].map(lambda n: f"{n:,}"), "λ (largest |λ|)": curv["eigenvalue"].map(lambda x: f"{x:.3g}"),
        "iterations": curv["power_iterations"].astype(str) + curv["power_converged"].map({True: " (converged)", False: " (not converged)"}),
        "weights holding 50 % of ‖v‖²": curv["fraction_for_50pct"].map(lambda x: f"{100 * x:.2f} %"),
        "90 %": curv["fraction_for_90pct"].map(lambda x: f"{100 * x:.2f} %"),
        "participation ratio": curv["participation"].map(lambda x: f"{100 * x:.2f} %"),
    })


def accuracy_table(accuracy: pd.DataFrame, part: str) -> pd.DataFrame:
    """Top-1 (%) per score and rule (rows) and sparsity × stage (columns), with the interval."""
    sub = accuracy[(accuracy["part"] == part) & (accuracy["score"] != "none")].copy()
    sub["cell"] = sub.apply(lambda r: f"{_pct(r.top1)} [{_pct(r.top1_lo)}, {_pct(r.top1_hi)}]", axis=1)
    sub["score"] = sub["score"].map(camphive.SCORE_LABELS)
    sub["column"] = sub.apply(lambda r: f"{100 * r.sparsity:.0f} % {r.stage}", axis=1)
    table = sub.pivot_table(index=["score", "rule"], columns="column", values="cell", aggfunc="first", sort=False)
    table.columns.name = None
    return table.reset_index().fillna("–")


def unpruned_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    sub = accuracy[accuracy["score"] == "none"]
    return pd.DataFrame({"model": sub["model"], "stage": sub["stage"].replace({"pruned": "as trained"}),
                         "top-1 (%)": sub.apply(lambda r: f"{_pct(r.top1)} [{_pct(r.top1_lo)}, {_pct(r.top1_hi)}]", axis=1),
                         "images": sub["images"]})


def sparsity_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Achieved sparsity with and without mask enforcement, and MACs if sparse kernels were used."""
    sub = accuracy[(accuracy["score"] == "eigvec") & (accuracy["rule"] == "merge")]
    return pd.DataFrame({"model": sub["model"], "target": sub["sparsity"].map(lambda x: f"{100 * x:.0f} %"),
                         "stage": sub["stage"], "zeros in pruned tensors": sub["achieved_sparsity"].map(lambda x: f"{100 * x:.1f} %"),
                         "top-1 (%)": sub["top1"].map(_pct),
                         "MACs if sparse kernels were used (of dense)": (sub["sparse_macs"] / sub["dense_macs"]).map(lambda x: f"{100 * x:.0f} %")})


def difference_table(diffs: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"model": diffs["model"], "sparsity": diffs["sparsity"].map(lambda x: f"{100 * x:.0f} %"),
                         "stage": diffs["stage"],
                         "difference (points)": diffs.apply(lambda r: f"{100 * r.difference:+.1f} [{100 * r.lo:+.1f}, {100 * r.hi:+.1f}]", axis=1)})


def accuracy_figure(accuracy: pd.DataFrame, part: str, rule: str = "merge"):
    """Top-1 against sparsity, one line per score; left right after pruning, right after fine-tuning."""
    import matplotlib.pyplot as plt

    from heart_lib import plots

    plots.use_style()
    sub = accuracy[accuracy["part"] == part]
    stages = [s for s in ("pruned", "fine-tuned") if ((sub["stage"] == s) & (sub["score"] != "none")).any()]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages) + 2, 3.8), sharey=True, squeeze=False,
                             layout="constrained")
    markers = dict(zip(camphive.SCORES, "osD^v"))
    colours = dict(zip(camphive.SCORES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, stage in zip(axes[0], stages):
        ref = sub[(sub["score"] == "none") & (sub["stage"] == stage)]
        if len(ref):
            ax.axhline(100 * ref["top1"].iloc[0], ls="--", color="grey", label="unpruned")
        for k, score in enumerate(camphive.SCORES):
            line = sub[(sub["score"] == score) & (sub["rule"] == rule) & (sub["stage"] == stage)].sort_values("sparsity")
            if line.empty:
                continue
            # A small horizontal offset per score keeps overlapping intervals apart.
            ax.errorbar(100 * line["sparsity"] + 0.8 * (k - 2), 100 * line["top1"],
                        yerr=[100 * (line["top1"] - line["top1_lo"]), 100 * (line["top1_hi"] - line["top1"])],
                        marker=markers[score], color=colours[score], capsize=3, label=camphive.SCORE_LABELS[score])
        ax.set(xlabel="weights removed (%)", title=f"{stage} ({rule})")
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="outside right center")
    fig.suptitle(sub["model"].iloc[0])
    return fig


def load_tables(out: Path) -> dict[str, pd.DataFrame]:
    return {k: results.read_table(out / f"{k}.csv") for k in ("curvature", "accuracy", "latency")
            if (out / f"{k}.csv").is_file()}


# ------------------------------------------------------------------ claims (rows of the claims summary)


SETTING = ("ours: {models}; CIFAR ResNet trained here ({cifar}); DeiT-Tiny real weights, evaluated on {vit}; "
           "per-tensor split unless stated, fine-tuning {ft}. Paper: ResNet-18/56, MobileNetV2 on CIFAR-10/100 "
           "and ImageNet, full training and 100 fine-tuning epochs (reference code).")


def _setting(folder: Path) -> str:
    curv = results.read_table(folder / "camphive" / "curvature.csv")
    cifar = curv[curv["part"] == "cifar"]
    vit = curv[curv["part"] == "vit"]
    cifar_text = (f"{int(cifar['train_images'].iloc[0])} training images, {int(cifar['train_epochs'].iloc[0])} epochs"
                  if len(cifar) else "not run")
    vit_text = f"{vit['dataset'].iloc[0]}" if len(vit) else "not run"
    params = results.read_json(folder / "camphive" / "summary.json")
    return SETTING.format(models=", ".join(curv["model"]), cifar=cifar_text, vit=vit_text,
                          ft="short (see chapter)").replace("per-tensor split", f"{params['split']} split")


def _claim(folder: Path, claim: str, statement: str, compute: Callable[[pd.DataFrame, dict], tuple[str, str, str]]):

    paper, chapter = "qualitative (abstract; no tables obtainable)", "camphive"
    path = folder / "camphive" / "accuracy.csv"
    if not path.is_file():
        return _missing(claim, statement, paper, chapter, path)
    accuracy, correct = results.read_table(path), load_correct(folder / "camphive")
    summary = results.read_json(folder / "camphive" / "summary.json")
    ours, criterion, verdict = compute(accuracy, correct)
    if not summary.get("verdicts", True):
        verdict, ours = "not testable here", ours + " (smoke profile: plumbing only, no verdict)"
    return Row(claim, statement, paper, ours, _setting(folder), criterion, verdict, chapter)


def _diff_text(diffs: pd.DataFrame) -> str:
    return "; ".join(f"{r.model} {100 * r.sparsity:.0f} % ({r.stage}): {100 * r.difference:+.1f} "
                     f"[{100 * r.lo:+.1f}, {100 * r.hi:+.1f}] pts" for r in diffs.itertuples()) or "no comparison"


def claim_ch1(folder: Path, params: Any):
    def compute(accuracy, correct):
        diffs = comparisons(accuracy, correct, ("eigvec", "merge"), ("magnitude", "merge"))
        return (f"|v| − |w| top-1: {_diff_text(diffs)}",
                "paired 95 % bootstrap interval of the accuracy difference at each sparsity: all above 0 = "
                "reproduced, any below 0 = not reproduced", verdict_of(diffs))
    return _claim(folder, "CH1", "CAMP-HiVe: curvature-guided scores keep accuracy better than magnitude at equal sparsity",
                  compute)


def claim_ch2(folder: Path, params: Any):
    def compute(accuracy, correct):
        diffs = comparisons(accuracy, correct, ("eigvec", "merge"), ("eigvec", "zero"))
        return (f"merge − zero top-1 (|v| scores): {_diff_text(diffs)}",
                "paired 95 % bootstrap interval at each sparsity: all above 0 = reproduced, any below 0 = not reproduced",
                verdict_of(diffs))
    return _claim(folder, "CH2", "CAMP-HiVe: merging pruned weights into partners beats zeroing them", compute)


def claim_ch3(folder: Path, params: Any):
    max_drop = float(getattr(params, "max_top1_drop", 0.01))

    def compute(accuracy, correct):
        kept = kept_accuracy(accuracy, correct)
        if kept.empty:
            return "no comparison", "", "not testable here"
        large = kept[kept["sparsity"] >= 0.5]
        held = large[large["lo"] >= -max_drop]
        lost = large[large["hi"] < -max_drop]
        verdict = ("reproduced" if len(held) else "not reproduced" if len(lost) == len(large) and len(large)
                   else "inconclusive")
        text = "; ".join(f"{r.part} {100 * r.sparsity:.0f} % ({r.stage}): {100 * r.difference:+.1f} "
                         f"[{100 * r.lo:+.1f}, {100 * r.hi:+.1f}] pts vs unpruned" for r in kept.itertuples())
        return (text, f"accuracy kept = the interval of (pruned − equally fine-tuned unpruned) lies above "
                      f"−{100 * max_drop:.0f} pts at some sparsity ≥ 50 %; every such interval below it = not reproduced",
                verdict)
    return _claim(folder, "CH3", "CAMP-HiVe: large reductions (≥ 50 % of the weights) with accuracy kept", compute)


CLAIMS = (claim_ch1, claim_ch2, claim_ch3)
CLAIM_IDS = ("CH1", "CH2", "CH3")


def paper_difference(params: Params) -> str:
    """How this profile's setting differs from the paper's (ResNet-18/56 and MobileNetV2 on
    CIFAR-10/100 and ImageNet; 100 fine-tuning epochs in the reference code), for the claims page."""
    parts = []
    if params.cifar_model:
        train = f"{params.cifar_train_limit:,} CIFAR-10 training images" if params.cifar_train_limit else "CIFAR-10"
        parts.append(f"model: {params.cifar_model}, trained here for {params.cifar_train_epochs} epochs on {train} "
                     "(paper: ResNet-18/56, MobileNetV2)")
        parts.append(f"fine-tuning: {params.cifar_finetune_steps} steps (paper: 100 epochs)")
    if params.vit_model:
        parts.append(f"also {params.vit_model} ({params.vit_weights} weights) on {params.vit_dataset}, which the "
                     "paper does not test")
    return "; ".join(parts) or "no model run"


# ------------------------------------------------------------------ sentences for the chapter (from the tables)


def setting_markdown(curv: pd.DataFrame, params: Params) -> str:
    """What was run, from the results: models, images, training and fine-tuning."""
    lines = []
    for r in curv.itertuples():
        if r.part == "cifar":
            cached = " (checkpoint from the cache)" if bool(r.train_cached) else ""
            lines.append(f"- **{r.model}** trained here from scratch on {int(r.train_images):,} CIFAR-10 training "
                         f"images for {int(r.train_epochs)} epochs ({r.train_seconds:.0f} s{cached}); the paper trains "
                         "ResNet-56 on all 50,000 for the full schedule. Fine-tuning: "
                         f"{params.cifar_finetune_steps} SGD steps of {params.cifar_batch_size} augmented training "
                         f"images, learning rate {params.cifar_finetune_lr}; tested on the {r.dataset} images.")
        else:
            tuned = (f"{params.vit_finetune_steps} SGD steps of {params.vit_batch_size} images of "
                     f"{params.vit_calibration_dataset}, learning rate {params.vit_finetune_lr}, for the scores "
                     f"{', '.join(params.vit_finetune_scores)}" if params.vit_finetune_scores and params.vit_finetune_steps
                     else "none (accuracy right after pruning only)")
            lines.append(f"- **{r.model}** ({r.weights} weights), tensors `{r.tensors}`, tested on {r.dataset}. "
                         f"Fine-tuning: {tuned}.")
        lines.append(f"  Calibration for the curvature: {int(r.calibration_images)} training images; "
                     f"split {params.split}; merge factor {params.merge_factor}.")
    return "\n".join(lines)


def concentration_sentence(curv: pd.DataFrame) -> str:
    """How concentrated v is, and what that means for ranking by |v|."""
    parts = []
    for r in curv.itertuples():
        rest = 1 - r.fraction_for_90pct
        parts.append(f"For {r.model}, half of ‖v‖² sits on {100 * r.fraction_for_50pct:.2f} % of its "
                     f"{int(r.weights):,} pruned weights and 90 % on {100 * r.fraction_for_90pct:.2f} %: any sparsity "
                     f"up to {100 * rest:.0f} % prunes only among weights that together hold 10 % of ‖v‖², where |v| "
                     "is small everywhere and its ranking rests on the least accurate part of the estimate.")
    return " ".join(parts)


def outcome_of(diffs: pd.DataFrame) -> str:
    """The same reading as `verdict_of`, in words for comparisons that are not claims of the paper."""
    return {"reproduced": "higher at every sparsity", "not reproduced": "lower at some sparsity",
            "inconclusive": "not separated by the intervals", "not testable here": "no comparison"}[verdict_of(diffs)]


def findings_markdown(accuracy: pd.DataFrame, correct: dict[str, np.ndarray], verdicts: bool = True) -> str:
    """The paired comparisons as tables; the paper's claims with their verdict (none when `verdicts` is off)."""
    blocks = []
    for title, claim, a, b in (("|v| (CAMP-HiVe) − |w| (magnitude), both merged", "CH1", ("eigvec", "merge"), ("magnitude", "merge")),
                               ("merge − zero, both scored by |v|", "CH2", ("eigvec", "merge"), ("eigvec", "zero")),
                               ("|w·v| − |v|, both merged", None, ("eigvec_weight", "merge"), ("eigvec", "merge")),
                               ("OBD − |v|, both merged", None, ("obd", "merge"), ("eigvec", "merge"))):
        diffs = comparisons(accuracy, correct, a, b)
        if diffs.empty:
            continue
        if not verdicts:
            reading = "smoke profile, no verdict"
        elif claim:
            reading = f"claim {claim} **{verdict_of(diffs)}**"
        else:
            reading = outcome_of(diffs)
        blocks.append(f"**{title}** (top-1, points): {reading}\n\n" + difference_table(diffs).to_markdown(index=False))
    kept = kept_accuracy(accuracy, correct)
    if not kept.empty:
        kept = kept.assign(model=kept["part"].map(dict(zip(accuracy["part"], accuracy["model"]))))
        blocks.append("**CAMP-HiVe − the unpruned model after the same treatment** (top-1, points; claim CH3 on the "
                      "claims page)\n\n" + difference_table(kept).to_markdown(index=False))
    return "\n\n".join(blocks) + ("\n\nReading: all intervals above 0 = reproduced (higher), any below 0 = not "
                                 "reproduced (lower), otherwise inconclusive; the claims page states each criterion.")


def latency_markdown(latency: pd.DataFrame) -> str:
    if latency.empty:
        return ("Dense latency was not measured under this profile (`measure_latency: false`): timings are taken "
                "only on a quiet machine.")
    table = pd.DataFrame({"model": latency["model"], "batch": latency["batch"],
                          "median latency (ms)": latency["latency_median_ms"].map(lambda x: f"{x:.2f}"),
                          "interquartile range (ms)": latency.apply(lambda r: f"{r.latency_p25_ms:.2f} – {r.latency_p75_ms:.2f}", axis=1),
                          "CPU share": latency["cpu_share"].map(lambda x: f"{x:.2f}")})
    return ("**Dense latency** (the project's timing harness `heart_lib.measure`, CPU, fp32; a CPU share well "
            "below 1 means other processes competed):\n\n" + table.to_markdown(index=False))
