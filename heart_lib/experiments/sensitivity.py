"""Sensitivity chapter: how well does each score rank tokens and heads by their real loss change?

For each image, every score of book/method.md, 'Components, gates and the sensitivity score' is computed for the tokens entering the chosen blocks and
for every head, together with the leave-one-out ground truth ΔL (the measured loss change when
that one component is removed). The direct test of claim C1 is the rank correlation (Spearman and
Kendall) between each score and ΔL:

- tokens: per image, across the non-prefix tokens of one layer; then averaged over images (the
  selection of tokens is per image, so that is the question a token pruner faces);
- heads: per image across all L×H heads, averaged over images; and, since heads are pruned
  statically, the correlation between the image-averaged score and the image-averaged ΔL.

95 % intervals are percentile bootstraps over images. HEART curvature comes in three variants
(raw S, |S|, max(S, 0)) because the activation Hessian is not PSD.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from heart_lib import catalogue, data, models, results
from heart_lib import display as D
from heart_lib import sensitivity as S
from heart_lib.experiments.common import model_and_dataset
from heart_lib.gates import vit_info
from heart_lib.progress import progress as progress_bar
from heart_lib.stats import (mean_interval, paired_difference, pooled_rank_correlation, rowwise_kendall,
                             rowwise_spearman)

# Every score of the catalogue; the per-component ones (one HVP per component) on the first
# `exact_limit` images only.
CURVATURE_SCORES = catalogue.scores(family="heart")
ALL_SCORES = tuple(catalogue.SCORES)
EXACT_SCORES = catalogue.scores(per_component=True)
SCORE_LABELS = {name: entry.label for name, entry in catalogue.SCORES.items()}
# The chapter's one gradient pass: Hutchinson curvature, whose exact gradient also serves the
# first-order scores and the full second order.
BASE_CURVATURE = "hutchinson"
BASE_SCORE = catalogue.scores(family="heart", curvature=BASE_CURVATURE)[0]  # names the base pass's time
EXACT_TIMING = EXACT_SCORES[0]  # names the exact pass's time (its images: exact_limit)


@dataclass(frozen=True)
class Params:
    model: str = "deit_tiny_patch16_224"
    weights: str = "mirror"  # none | mirror | hub | auto | path to a state_dict
    dataset: str = "imagenet-sample-1000"
    data_path: str | None = None
    limit: int = 64  # images (a seeded subset)
    batch_size: int = 16
    seed: int = 0
    num_classes: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    layers: list[int] = field(default_factory=lambda: [3, 6, 9])  # token layers (block inputs)
    loo_tokens: int | None = None  # leave-one-out on this many random non-prefix tokens per layer and batch
    loss: str = "pseudo"  # true | pseudo | kl
    probes: int = 8  # Hutchinson probes
    exact_limit: int = 16  # images that also get the exact diagonal (one HVP per component); 0 = none
    scores: list[str] = field(default_factory=lambda: list(ALL_SCORES))
    bootstrap: int = 2000
    heatmap_images: int = 4
    heatmap_layer: int = 6
    reuse: bool = True  # reuse stored raw scores computed with the same parameters

    def check(self) -> None:
        models.check_model_name(self.model)
        if self.dataset not in data.DATASETS:
            raise ValueError(f"parameter 'dataset' = {self.dataset!r}: allowed values are {list(data.DATASETS)}")
        for name in ("limit", "batch_size", "probes", "bootstrap"):
            if getattr(self, name) <= 0:
                raise ValueError(f"parameter {name!r} = {getattr(self, name)}: must be a positive integer")
        if self.loss not in S.LOSSES:
            raise ValueError(f"parameter 'loss' = {self.loss!r}: allowed values are {list(S.LOSSES)}")
        unknown = [s for s in self.scores if s not in ALL_SCORES]
        if unknown:
            raise ValueError(f"parameter 'scores' has unknown entries {unknown}: allowed {list(ALL_SCORES)}")
        if self.loo_tokens is not None and self.loo_tokens < 3:
            raise ValueError(f"parameter 'loo_tokens' = {self.loo_tokens}: must be >= 3 or null (all tokens)")
        if self.exact_limit < 0 or self.exact_limit > self.limit:
            raise ValueError(f"parameter 'exact_limit' = {self.exact_limit}: must be in 0..limit ({self.limit})")
        if self.exact_limit == 0 and any(s in EXACT_SCORES for s in self.scores):
            raise ValueError(f"parameter 'scores' asks for {list(EXACT_SCORES)} but 'exact_limit' is 0")
        if not self.layers:
            raise ValueError("parameter 'layers' = []: name at least one block index")
        if self.heatmap_layer not in self.layers:
            raise ValueError(f"parameter 'heatmap_layer' = {self.heatmap_layer}: must be one of layers {self.layers}")
        if self.heatmap_images < 0:
            raise ValueError(f"parameter 'heatmap_images' = {self.heatmap_images}: must be >= 0")


# ---------------------------------------------------------------------------------------------
# computing raw scores


@dataclass
class RawScores:
    """Everything per image: tokens[name][layer] -> [I, N]; heads[name] -> [I, L, H]; LOO alike."""

    tokens: dict[str, dict[int, np.ndarray]]
    heads: dict[str, np.ndarray]
    loo_tokens: dict[int, np.ndarray]  # the truth pruning faces: ΔL of dropping the token from the sequence
    loo_heads: np.ndarray  # ΔL of removing the head (zeroing its output = slicing it out)
    loss: np.ndarray  # [I] per-image loss of the unpruned model
    labels: np.ndarray
    predictions: np.ndarray
    num_prefix_tokens: int
    seconds: dict[str, float]  # compute time per score family, all images it was computed for
    exact_images: int = 0  # images that have the exact scores (the first ones)
    loo_tokens_zero: dict[int, np.ndarray] = field(default_factory=dict)  # ΔL of zeroing the token's row


def build(params: Params):
    model, dataset = model_and_dataset(params)
    for p in model.parameters():  # gates are the only inputs we differentiate
        p.requires_grad_(False)
    return model, dataset


def _timed(seconds: dict[str, float], name: str, fn):
    start = time.perf_counter()
    out = fn()
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return out


def _collect(layers, heads, deriv, values):
    return ({l: values(deriv, ("token", l)) for l in layers},
            torch.stack([values(deriv, ("head", l)) for l in heads], 1))


def _batch_scores(model, images, labels, params: Params, seconds: dict[str, float]):
    """Every score except the exact ones, and the leave-one-out ground truth, for one batch."""
    layers = tuple(params.layers)
    heads = tuple(range(vit_info(model).depth))
    kw = dict(token_layers=layers, head_layers=heads, loss=params.loss, labels=labels)
    tok: dict[str, dict[int, torch.Tensor]] = {}
    hd: dict[str, torch.Tensor] = {}
    wanted = set(params.scores)
    base = _timed(seconds, BASE_SCORE, lambda: S.gate_derivatives(
        model, images, curvature_estimator=BASE_CURVATURE, probes=params.probes, seed=params.seed, **kw))
    own: list[str] = []
    for name, entry in catalogue.SCORES.items():
        if entry.per_component:
            continue  # compute_exact
        if entry.formula is not None and entry.curvature in (None, BASE_CURVATURE, "chosen"):
            tok[name], hd[name] = _collect(layers, heads, base, _formula(entry))
        elif name in wanted:
            own.append(name)
    for name in own:  # scores that need a pass of their own, in catalogue order
        entry = catalogue.SCORES[name]
        if entry.formula is not None:
            deriv = _timed(seconds, name, lambda: S.gate_derivatives(
                model, images, curvature_estimator=entry.curvature, scope=entry.scope or "layer", **kw))
            tok[name], hd[name] = _collect(layers, heads, deriv, _formula(entry))
        else:
            res = _timed(seconds, name, lambda: S.score_components(
                model, images, layers=layers, heads=True, method=name, loss=params.loss, labels=labels,
                seed=params.seed))
            tok[name], hd[name] = res.tokens, res.heads
    subset = _loo_subset(params, images, model)
    # Two truths for tokens: removal as pruning performs it (dropped from the sequence: C1 is judged
    # by this one) and zeroing its residual row (the perturbation δ = −z the Taylor scores model).
    loo_t = {removal: _timed(seconds, f"leave_one_out_{removal}", lambda removal=removal: S.leave_one_out_tokens(
        model, images, layers=layers, loss=params.loss, labels=labels, tokens=subset, removal=removal))
        for removal in S.REMOVALS}
    # heads: zeroing a head's output is slicing it out (tests/test_pruning.py), so one truth serves
    loo_h = _timed(seconds, "leave_one_out_heads", lambda: S.leave_one_out_heads(
        model, images, loss=params.loss, labels=labels))
    tok = {k: v for k, v in tok.items() if k in wanted}
    hd = {k: v for k, v in hd.items() if k in wanted}
    return tok, hd, loo_t, loo_h, base


def _formula(entry: catalogue.ScoreEntry):
    return lambda d, k: entry.formula(d.grad[k], d.curvature.get(k))


def _loo_subset(params: Params, images: torch.Tensor, model) -> dict[int, list[int]] | None:
    """Which tokens get leave-one-out ΔL (None = all). A seeded random subset of non-prefix tokens
    per layer, drawn from the batch's first pixels too, so batches differ but runs repeat."""
    if params.loo_tokens is None:
        return None
    prefix = vit_info(model).num_prefix_tokens
    n = int(model.patch_embed.num_patches)
    if params.loo_tokens >= n:
        return None
    salt = int(hashlib.sha256(images[:, :, :2, :2].numpy().tobytes()).hexdigest()[:8], 16)
    gen = torch.Generator().manual_seed(params.seed * 1_000_003 + salt)
    return {l: sorted((torch.randperm(n, generator=gen)[: params.loo_tokens] + prefix).tolist()) for l in params.layers}


def _batch_exact(model, images, labels, params: Params, seconds: dict[str, float],
                 tokens: dict[int, list[int]] | None = None):
    layers = tuple(params.layers)
    heads = tuple(range(vit_info(model).depth))
    components = None if tokens is None else {("token", l): tokens[l] for l in layers}
    exact = _timed(seconds, EXACT_TIMING, lambda: S.gate_derivatives(
        model, images, token_layers=layers, head_layers=heads, loss=params.loss, labels=labels,
        curvature_estimator="exact", components=components))
    tok, hd = {}, {}
    for name in EXACT_SCORES:
        tok[name], hd[name] = _collect(layers, heads, exact, _formula(catalogue.SCORES[name]))
    return tok, hd


def stage_params(params: Params, stage: str = "scores") -> dict[str, Any]:
    """The parameters the stored raw scores of `stage` ("scores" or "exact") depend on (display
    settings excluded; the cheap stage does not depend on exact_limit, the exact stage depends on
    loo_tokens too: it scores those tokens)."""
    skip = {"bootstrap", "heatmap_images", "heatmap_layer", "reuse"}
    if stage == "scores":
        skip.add("exact_limit")
    return {k: v for k, v in asdict(params).items() if k not in skip}


def raw_folder(params: Params, stage: str) -> Path:
    """Where a stage's raw scores are cached (the cache rule of `results.cache_folder`)."""
    return results.cache_folder(f"sensitivity-{stage}", stage_params(params, stage), (__name__,))


def _cat(xs) -> np.ndarray:
    return torch.cat([x.detach().cpu().float() for x in xs]).numpy()


def compute_raw(params: Params, progress: bool = True) -> RawScores:
    """Cheap scores and leave-one-out ground truth for every image (the expensive part is the
    leave-one-out: one forward per component)."""
    params.check()
    torch.manual_seed(params.seed)
    model, dataset = build(params)
    loader = data.make_loader(dataset, params.batch_size)
    parts: list[tuple] = []
    labels_all, preds_all, loss_all = [], [], []
    seconds: dict[str, float] = {}
    for images, labels in (progress_bar(loader, "sensitivity: scores + leave-one-out") if progress else loader):
        labels = torch.as_tensor(labels)
        tok, hd, loo_t, loo_h, deriv = _batch_scores(model, images, labels, params, seconds)
        parts.append((tok, hd, loo_t, loo_h))
        with torch.no_grad():
            preds_all.append(model(images).argmax(-1))
        labels_all.append(labels)
        loss_all.append(deriv.loss.cpu())
    return RawScores(
        tokens={n: {l: _cat([p[0][n][l] for p in parts]) for l in params.layers} for n in parts[0][0]},
        heads={n: _cat([p[1][n] for p in parts]) for n in parts[0][1]},
        loo_tokens={l: _cat([p[2]["drop"][l] for p in parts]) for l in params.layers},
        loo_tokens_zero={l: _cat([p[2]["zero"][l] for p in parts]) for l in params.layers},
        loo_heads=_cat([p[3] for p in parts]),
        loss=_cat(loss_all), labels=torch.cat(labels_all).numpy(), predictions=torch.cat(preds_all).numpy(),
        num_prefix_tokens=vit_info(model).num_prefix_tokens, seconds=seconds,
    )


def compute_exact(params: Params, raw: RawScores | None = None, progress: bool = True
                  ) -> tuple[dict, dict, dict[str, float]]:
    """Exact-diagonal scores for the first `exact_limit` images (same order as compute_raw), for the
    tokens that have leave-one-out ΔL in `raw` (all tokens when raw is None or complete)."""
    model, dataset = build(params)
    subset = torch.utils.data.Subset(dataset, list(range(params.exact_limit)))
    loader = data.make_loader(subset, params.batch_size)
    seconds: dict[str, float] = {}
    parts = []
    first = 0
    for images, labels in (progress_bar(loader, "sensitivity: exact diagonal") if progress else loader):
        tokens = None
        if raw is not None and params.loo_tokens is not None:
            rows = slice(first, first + len(images))
            tokens = {l: np.flatnonzero(np.isfinite(raw.loo_tokens[l][rows]).any(0)).tolist() for l in params.layers}
        first += len(images)
        parts.append(_batch_exact(model, images, torch.as_tensor(labels), params, seconds, tokens))
    tok = {n: {l: _cat([p[0][n][l] for p in parts]) for l in params.layers} for n in parts[0][0]}
    hd = {n: _cat([p[1][n] for p in parts]) for n in parts[0][1]}
    return tok, hd, seconds


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """Extend along images with NaN (scores not computed for those images)."""
    out = np.full((rows, *a.shape[1:]), np.nan, dtype=a.dtype)
    out[: len(a)] = a
    return out


def save_raw(raw: RawScores, path: Path, key: str) -> None:
    arrays = {"loo_heads": raw.loo_heads, "loss": raw.loss, "labels": raw.labels, "predictions": raw.predictions}
    for layer, a in raw.loo_tokens.items():
        arrays[f"loo_tokens/{layer}"] = a
    for layer, a in raw.loo_tokens_zero.items():
        arrays[f"loo_tokens_zero/{layer}"] = a
    for name, per_layer in raw.tokens.items():
        for layer, a in per_layer.items():
            arrays[f"tokens/{name}/{layer}"] = a
    for name, a in raw.heads.items():
        arrays[f"heads/{name}"] = a
    meta = {"key": key, "num_prefix_tokens": raw.num_prefix_tokens, "seconds": raw.seconds}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with results.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def load_raw(path: Path) -> tuple[RawScores, str]:
    z = np.load(path)
    meta = json.loads(bytes(z["meta"]).decode())
    tokens: dict[str, dict[int, np.ndarray]] = {}
    loo_tokens: dict[int, np.ndarray] = {}
    loo_zero: dict[int, np.ndarray] = {}
    heads: dict[str, np.ndarray] = {}
    for name in z.files:
        parts = name.split("/")
        if parts[0] == "tokens":
            tokens.setdefault(parts[1], {})[int(parts[2])] = z[name]
        elif parts[0] == "loo_tokens":
            loo_tokens[int(parts[1])] = z[name]
        elif parts[0] == "loo_tokens_zero":
            loo_zero[int(parts[1])] = z[name]
        elif parts[0] == "heads":
            heads[parts[1]] = z[name]
    raw = RawScores(tokens=tokens, heads=heads, loo_tokens=loo_tokens, loo_heads=z["loo_heads"], loss=z["loss"],
                    labels=z["labels"], predictions=z["predictions"], num_prefix_tokens=meta["num_prefix_tokens"],
                    seconds=meta["seconds"], loo_tokens_zero=loo_zero)
    return raw, meta["key"]


def raw_scores(params: Params, progress: bool = True) -> RawScores:
    """Raw scores, reused from the cache (`raw_folder`) when reuse is on; else computed and stored
    (each stage separately, so an interrupted exact pass does not redo the leave-one-out)."""
    path = raw_folder(params, "scores") / "raw_scores.npz"
    exact_path = raw_folder(params, "exact") / "raw_exact.npz"
    raw = load_raw(path)[0] if params.reuse and path.is_file() else None
    if raw is None:
        raw = compute_raw(params, progress)
        save_raw(raw, path, path.parent.name)
    wanted = [s for s in EXACT_SCORES if s in params.scores]
    if params.exact_limit and wanted:
        exact = load_raw(exact_path)[0] if params.reuse and exact_path.is_file() else None
        if exact is None:
            tok, hd, seconds = compute_exact(params, raw, progress)
            exact = RawScores(tokens=tok, heads=hd, loo_tokens={}, loo_heads=np.zeros(0), loss=np.zeros(0),
                              labels=np.zeros(0), predictions=np.zeros(0), num_prefix_tokens=raw.num_prefix_tokens,
                              seconds=seconds)
            save_raw(exact, exact_path, exact_path.parent.name)
        images = len(raw.loss)
        for name in wanted:
            raw.tokens[name] = {l: _pad_rows(a, images) for l, a in exact.tokens[name].items()}
            raw.heads[name] = _pad_rows(exact.heads[name], images)
        raw.seconds = {**raw.seconds, **exact.seconds}
        raw.exact_images = params.exact_limit
    return raw


# ---------------------------------------------------------------------------------------------
# correlations (pure functions of the raw arrays)


def _variants(name: str) -> tuple[str, ...]:
    return catalogue.score(name).variants


def _finite_rows(a: np.ndarray) -> np.ndarray:
    return np.isfinite(a.reshape(len(a), -1)).all(1)


def per_image_correlations(raw: RawScores, removal: str = "drop") -> pd.DataFrame:
    """One row per (image, component, score, variant) with Spearman and Kendall against the token
    truth of `removal` ("drop": the token leaves the sequence, as pruning does; "zero": its residual
    row is zeroed). Heads have one truth (zeroing a head's output is slicing it out)."""
    if removal not in S.REMOVALS:
        raise ValueError(f"removal = {removal!r}: allowed values are {list(S.REMOVALS)}")
    token_truth = raw.loo_tokens if removal == "drop" else raw.loo_tokens_zero
    rows = []
    p = raw.num_prefix_tokens
    for name, per_layer in raw.tokens.items():
        for variant in _variants(name):
            for layer, values in per_layer.items():
                score = S.apply_variant(torch.from_numpy(values), variant).numpy()[:, p:]
                truth = token_truth[layer][:, p:]
                rho, tau = rowwise_spearman(score, truth), rowwise_kendall(score, truth)
                rows += [{"image": i, "component": f"tokens@{layer}", "score": name, "variant": variant,
                          "spearman": rho[i], "kendall": tau[i]} for i in range(len(rho))]
    for name, values in raw.heads.items():
        for variant in _variants(name):
            score = S.apply_variant(torch.from_numpy(values), variant).numpy().reshape(len(values), -1)
            truth = raw.loo_heads.reshape(len(values), -1)
            rho, tau = rowwise_spearman(score, truth), rowwise_kendall(score, truth)
            rows += [{"image": i, "component": "heads", "score": name, "variant": variant,
                      "spearman": rho[i], "kendall": tau[i]} for i in range(len(rho))]
    return pd.DataFrame(rows)


def _with_layer_mean(per_image: pd.DataFrame) -> pd.DataFrame:
    """The per-image rows plus, per image, the mean over token layers ("tokens (mean over layers)")."""
    token_rows = per_image[per_image["component"].str.startswith("tokens@")]
    layer_mean = (token_rows.groupby(["image", "score", "variant"], as_index=False)[["spearman", "kendall"]].mean()
                  .assign(component="tokens (mean over layers)"))
    return pd.concat([per_image, layer_mean], ignore_index=True)


def correlation_table(raw: RawScores, per_image: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean per-image correlations with bootstrap intervals, plus the static head ranking."""
    rows = []
    for (component, name, variant), group in _with_layer_mean(per_image).groupby(
            ["component", "score", "variant"], sort=False):
        group = group.sort_values("image")
        row = {"component": component, "score": name, "variant": variant, "aggregation": "per image, mean",
               "n_images": int(group["spearman"].notna().sum())}
        for stat in ("spearman", "kendall"):
            mean, lo, hi = mean_interval(group[stat].to_numpy(dtype=float), n_boot, seed)
            row.update({stat: mean, f"{stat}_lo": lo, f"{stat}_hi": hi})
        rows.append(row)
    for name, values in raw.heads.items():
        for variant in _variants(name):
            score = S.apply_variant(torch.from_numpy(values), variant).numpy()
            rows.append({"component": "heads (image-mean ranking)", "score": name, "variant": variant,
                         "aggregation": "pooled: mean over images, then one ranking",
                         "n_images": int(_finite_rows(values).sum()),
                         **pooled_rank_correlation(score, raw.loo_heads, n_boot, seed)})
    order = {c: i for i, c in enumerate(["tokens (mean over layers)"] + [f"tokens@{l}" for l in sorted(raw.loo_tokens)]
                                        + ["heads", "heads (image-mean ranking)"])}
    table = pd.DataFrame(rows)
    table["_o"] = table["component"].map(order)
    return table.sort_values(["_o", "spearman"], ascending=[True, False]).drop(columns="_o").reset_index(drop=True)


def estimator_agreement(raw: RawScores, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """How well each fast curvature estimator ranks like the exact diagonal (images with exact scores)."""
    exact = [n for n in CURVATURE_SCORES if catalogue.SCORES[n].per_component]
    if not exact or exact[0] not in raw.tokens or raw.exact_images == 0:
        return pd.DataFrame()
    exact = exact[0]
    p, k = raw.num_prefix_tokens, raw.exact_images
    rows = []
    for name in CURVATURE_SCORES:
        if name not in raw.tokens or name == exact:
            continue
        per_layer = [rowwise_spearman(raw.tokens[name][l][:k, p:], raw.tokens[exact][l][:k, p:])
                     for l in sorted(raw.tokens[name])]
        token_mean, lo, hi = mean_interval(np.mean(per_layer, 0), n_boot, seed)
        heads = rowwise_spearman(raw.heads[name][:k].reshape(k, -1), raw.heads[exact][:k].reshape(k, -1))
        h_mean, h_lo, h_hi = mean_interval(heads, n_boot, seed)
        rows.append({"estimator": name, "images": k, "tokens_spearman": token_mean, "tokens_lo": lo, "tokens_hi": hi,
                     "heads_spearman": h_mean, "heads_lo": h_lo, "heads_hi": h_hi})
    return pd.DataFrame(rows)


def best_scores(table: pd.DataFrame) -> pd.DataFrame:
    """The best-ranking (score, variant) per component, and the best variant of each HEART score."""
    best = table.loc[table.groupby("component", sort=False)["spearman"].idxmax()]
    return best[["component", "score", "variant", "spearman", "spearman_lo", "spearman_hi"]].reset_index(drop=True)


PRIMARY_COMPONENTS = ("tokens (mean over layers)", "heads")  # per-image rankings, as a pruner faces them


def primary_comparison(per_image: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """C1 as pre-registered: each family's primary score (catalogue.FAMILIES) against the truth, and
    HEART's primary minus each other primary, paired over the same images (bootstrap of the mean
    per-image difference). `relation`: better / worse / overlap (the difference's interval vs 0)."""
    values = _with_layer_mean(per_image)
    values = values[values["variant"] == "raw"]
    heart = catalogue.primary("heart")
    rows = []
    for component in PRIMARY_COMPONENTS:
        part = values[values["component"] == component].pivot_table(index="image", columns="score",
                                                                    values="spearman")
        if heart not in part:
            continue
        for family in catalogue.FAMILIES:
            name = catalogue.primary(family)
            if name not in part:
                continue
            rho, lo, hi = mean_interval(part[name].to_numpy(dtype=float), n_boot, seed)
            row = {"component": component, "family": family, "score": name, "n_images": int(part[name].notna().sum()),
                   "spearman": rho, "spearman_lo": lo, "spearman_hi": hi}
            if family != "heart":
                diff = (part[heart] - part[name]).to_numpy(dtype=float)
                d, d_lo, d_hi = paired_difference(part[heart].to_numpy(dtype=float),
                                                  part[name].to_numpy(dtype=float), n_boot, seed)
                row.update(heart_minus=d, heart_minus_lo=d_lo, heart_minus_hi=d_hi,
                           n_paired=int(np.isfinite(diff).sum()),
                           relation="better" if d_lo > 0 else "worse" if d_hi < 0 else "overlap")
            rows.append(row)
    return pd.DataFrame(rows)


def best_of_variants(table: pd.DataFrame) -> pd.DataFrame:
    """Secondary view: each family's best (score, variant) per component, with how many variants the
    family had there (best-of-many favours the families with more)."""
    rows = []
    for component, part in table.groupby("component", sort=False):
        families = part["score"].map(lambda n: catalogue.score(n).family)
        for family in catalogue.FAMILIES:
            mine = part[families == family]
            if mine.empty or not mine["spearman"].notna().any():
                continue
            best = mine.loc[mine["spearman"].idxmax()]
            rows.append({"component": component, "family": family, "variants": len(mine), "score": best["score"],
                         "variant": best["variant"], "spearman": best["spearman"], "spearman_lo": best["spearman_lo"],
                         "spearman_hi": best["spearman_hi"], "n_images": best["n_images"]})
    return pd.DataFrame(rows)


def truth_agreement(raw: RawScores, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """How the two token truths differ, per layer: the per-image rank correlation of dropping ΔL with
    zeroing ΔL, and the share of tokens whose ΔL has the same sign under both (tokens with both)."""
    p = raw.num_prefix_tokens
    rows = []
    for layer in sorted(raw.loo_tokens):
        drop, zero = raw.loo_tokens[layer][:, p:], raw.loo_tokens_zero.get(layer, np.full(0, np.nan))
        if zero.size == 0:
            continue
        zero = zero[:, p:]
        both = np.isfinite(drop) & np.isfinite(zero)
        with np.errstate(invalid="ignore"):
            same_sign = np.where(both, np.sign(drop) == np.sign(zero), np.nan)
            agree = np.nanmean(same_sign, axis=1)
        rho, lo, hi = mean_interval(rowwise_spearman(drop, zero), n_boot, seed)
        share, s_lo, s_hi = mean_interval(agree, n_boot, seed)
        rows.append({"layer": layer, "n_images": int(np.isfinite(agree).sum()),
                     "tokens_per_image": float(both.sum(1).mean()), "spearman": rho, "spearman_lo": lo,
                     "spearman_hi": hi, "same_sign": share, "same_sign_lo": s_lo, "same_sign_hi": s_hi})
    return pd.DataFrame(rows)


def variant_table(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman of raw / |S| / clamped side by side for the curvature scores."""
    curv = table[table["score"].isin(CURVATURE_SCORES)]
    return curv.pivot_table(index=["component", "score"], columns="variant", values="spearman",
                            sort=False).reset_index()


# ---------------------------------------------------------------------------------------------
# the chapter's entry point and figures


def run(params: Params, out: Path, progress: bool = True) -> dict[str, Any]:
    """Compute (or reuse) raw scores; write the correlation tables and a summary under `out`."""
    raw = raw_scores(params, progress)
    per_image = per_image_correlations(raw)
    table = correlation_table(raw, per_image, params.bootstrap, params.seed)
    meta = {"params": asdict(params)}
    results.write_table(out / "per_image_correlations.csv", per_image, meta=meta)
    results.write_table(out / "correlations.csv", table, meta=meta)
    best = best_scores(table)
    results.write_table(out / "best.csv", best, meta=meta)
    # C1 as pre-registered (primary vs primary, dropping truth), the best-of-variants view beside it,
    # the token correlations against the zeroing truth, and how the two truths differ
    primaries = primary_comparison(per_image, params.bootstrap, params.seed)
    results.write_table(out / "primaries.csv", primaries, meta=meta)
    variants = best_of_variants(table)
    results.write_table(out / "best_of_variants.csv", variants, meta=meta)
    per_image_zero = per_image_correlations(raw, "zero")
    per_image_zero = per_image_zero[per_image_zero["component"].str.startswith("tokens@")]
    table_zero = correlation_table(raw, per_image_zero, params.bootstrap, params.seed)
    table_zero = table_zero[table_zero["component"].str.startswith("tokens")]
    results.write_table(out / "correlations_zeroing.csv", table_zero, meta=meta)
    truths = truth_agreement(raw, params.bootstrap, params.seed)
    results.write_table(out / "truths.csv", truths, meta=meta)
    agreement = estimator_agreement(raw, params.bootstrap, params.seed)
    if len(agreement):
        results.write_table(out / "estimator_vs_exact.csv", agreement, meta=meta)
    images = len(raw.loss)
    summary = {
        "model": params.model, "weights": str(params.weights), "dataset": params.dataset, "images": images,
        "loss": params.loss, "layers": list(params.layers), "num_prefix_tokens": raw.num_prefix_tokens,
        "mean_loss": float(raw.loss.mean()), "pseudo_label_accuracy": float((raw.labels == raw.predictions).mean()),
        "exact_images": raw.exact_images,
        "seconds_per_image": {k: v / (raw.exact_images if k == EXACT_TIMING else images)
                              for k, v in raw.seconds.items()},
        "best": best.to_dict(orient="records"),
        "aggregation": "tokens: Spearman/Kendall per image across non-prefix tokens of one layer, mean over "
                       "images; heads: per image across all heads, mean over images, and pooled image-mean "
                       "ranking; 95 % percentile bootstrap over images",
        "truth": "leave-one-out ΔL of dropping the token from the sequence (as the pruned model does); "
                 "heads: of removing the head",
        "primaries": {family: catalogue.primary(family) for family in catalogue.FAMILIES},
    }
    results.write_json(out / "summary.json", summary)
    return {"raw": raw, "per_image": per_image, "table": table, "best": best, "agreement": agreement,
            "summary": summary, "primaries": primaries, "best_of_variants": variants, "table_zero": table_zero,
            "truths": truths}


def findings_markdown(primaries: pd.DataFrame, truths: pd.DataFrame) -> str:
    """The chapter's findings in a few sentences, every number from the tables (C1 as pre-registered)."""
    if primaries.empty:
        return "No primary comparison was computed (HEART's primary score is not among this run's scores)."
    heart = catalogue.primary("heart")
    lines = [f"HEART's score is the paper's: the raw curvature S of the per-layer single probe "
             f"(`{heart}`, {catalogue.score(heart).label}); each other family's primary was declared in the "
             "library before any result was read, and the truth is the loss change of dropping the token "
             "from the sequence, as the pruned model does (for heads, of removing the head).", ""]
    for component, part in primaries.groupby("component", sort=False):
        own = part[part["family"] == "heart"].iloc[0]
        others = part[part["family"] != "heart"]
        counts = others["relation"].value_counts()
        described = "; ".join(
            f"{catalogue.score(r.score).label}: {r.heart_minus:+.2f} [{r.heart_minus_lo:+.2f}, {r.heart_minus_hi:+.2f}]"
            for r in others.itertuples())
        lines.append(f"- **{component}** (n = {own.n_images} images): HEART ρ = {own.spearman:.2f} "
                     f"[{own.spearman_lo:.2f}, {own.spearman_hi:.2f}]; it ranks better than "
                     f"{counts.get('better', 0)}, worse than {counts.get('worse', 0)} and indistinguishably from "
                     f"{counts.get('overlap', 0)} of the {len(others)} other primaries (HEART minus other, paired "
                     f"over images: {described}).")
    if not truths.empty:
        lines += ["", "The two token truths differ: per layer, dropping and zeroing a token rank the tokens alike "
                  f"(ρ between {truths.spearman.min():.2f} and {truths.spearman.max():.2f}) but give the same sign of ΔL "
                  f"for only {100 * truths.same_sign.min():.0f}–{100 * truths.same_sign.max():.0f} % of the tokens."]
    return "\n".join(lines)


def primaries_display(primaries: pd.DataFrame):
    """C1's table for reading: each family's primary, its ρ, and HEART minus it (paired over images)."""
    return D.table(primaries, {
        "component": "component", "family": lambda t: t["family"].str.replace("_", " "),
        "primary score": lambda t: t["score"].map(D.label), "images": "n_images",
        "Spearman ρ, 95 % CI": lambda t: [D.with_interval(r.spearman, r.spearman_lo, r.spearman_hi, 2, 1)
                                          for r in t.itertuples()],
        "HEART − this, paired 95 % CI": lambda t: [
            "" if r.family == "heart" else D.with_interval(r.heart_minus, r.heart_minus_lo, r.heart_minus_hi, 2, 1,
                                                           signed=True) for r in t.itertuples()],
        "HEART ranks": lambda t: t["relation"].fillna("").map(
            {"better": "better", "worse": "worse", "overlap": "alike (interval spans 0)", "": ""}),
    })


def best_of_variants_display(variants: pd.DataFrame):
    """The secondary view: each family's best variant, with how many variants it had (per-layer
    token rows stay in the CSV)."""
    variants = variants[~variants["component"].str.contains("@")]
    return D.table(variants, {
        "component": "component", "family": lambda t: t["family"].str.replace("_", " "),
        "variants tried": "variants",
        "best": lambda t: [D.label(r.score) + ("" if r.variant == "raw" else f", {VARIANT_LABELS[r.variant]}")
                           for r in t.itertuples()],
        "images": "n_images",
        "Spearman ρ, 95 % CI": lambda t: [D.with_interval(r.spearman, r.spearman_lo, r.spearman_hi, 2, 1)
                                          for r in t.itertuples()],
    })


def truths_display(truths: pd.DataFrame):
    """How the dropping and zeroing truths differ, per layer."""
    return D.table(truths, {
        "block input": "layer", "images": "n_images",
        "tokens per image": lambda t: t["tokens_per_image"].round().astype(int),
        "Spearman ρ, drop vs zero, 95 % CI": lambda t: [D.with_interval(r.spearman, r.spearman_lo, r.spearman_hi, 2, 1)
                                                        for r in t.itertuples()],
        "same sign of ΔL, % (95 % CI)": lambda t: [D.with_interval(r.same_sign, r.same_sign_lo, r.same_sign_hi, 0)
                                                   for r in t.itertuples()],
    })


def display_table(table: pd.DataFrame, component: str | None = None):
    """Readable rows: score, variant, Spearman ρ and Kendall τ with their 95 % bootstrap intervals."""
    t = table if component is None else table[table["component"] == component]
    columns = {} if component is not None else {"component": "component"}
    return D.table(t, {
        **columns, "score": lambda t: t["score"].map(D.label), "variant": lambda t: t["variant"].map(VARIANT_LABELS),
        "images": "n_images",
        "Spearman ρ, 95 % CI": lambda t: [D.with_interval(r.spearman, r.spearman_lo, r.spearman_hi, 2, 1)
                                          for r in t.itertuples()],
        "Kendall τ, 95 % CI": lambda t: [D.with_interval(r.kendall, r.kendall_lo, r.kendall_hi, 2, 1)
                                         for r in t.itertuples()],
    })


VARIANT_LABELS = {"raw": "raw S", "abs": "|S|", "clamp": "max(S, 0)"}


def variant_display(table: pd.DataFrame):
    """Spearman ρ of each curvature estimator in its three variants, side by side."""
    wide = variant_table(table)
    return D.table(wide, {"component": "component", "score": lambda t: t["score"].map(D.label),
                          **{f"ρ, {VARIANT_LABELS[v]}": (lambda t, v=v: t[v].map(lambda x: D.number(x, 2)))
                             for v in VARIANT_LABELS if v in wide}})


def agreement_table(agreement: pd.DataFrame):
    """Each fast estimator's Spearman ρ with the exact diagonal, tokens and heads, 95 % intervals."""
    return D.table(agreement, {
        "estimator": lambda t: t["estimator"].map(D.label), "images": "images",
        "tokens: ρ with exact, 95 % CI": lambda t: [D.with_interval(r.tokens_spearman, r.tokens_lo, r.tokens_hi, 2, 1)
                                                    for r in t.itertuples()],
        "heads: ρ with exact, 95 % CI": lambda t: [D.with_interval(r.heads_spearman, r.heads_lo, r.heads_hi, 2, 1)
                                                   for r in t.itertuples()],
    })


COMPONENT_TITLES = {"tokens (mean over layers)": "tokens", "heads": "heads (per image)",
                    "heads (image-mean ranking)": "heads (image mean)"}


def correlation_figure(table: pd.DataFrame):
    """Spearman with 95 % intervals per score (its best variant, named beside the point), one panel per
    component, scores in one shared order (by the token correlation)."""
    from heart_lib import plots
    import matplotlib.pyplot as plt

    plots.use_style()
    comps = [c for c in ("tokens (mean over layers)", "heads", "heads (image-mean ranking)")
             if c in set(table["component"])]
    best = {c: (lambda t: t.loc[t.groupby("score")["spearman"].idxmax()].set_index("score"))(
        table[table["component"] == c]) for c in comps}
    order = best[comps[0]].sort_values("spearman").index.tolist()
    fig, axes = plt.subplots(1, len(comps), figsize=(plots.COLUMN_WIDTH, 0.3 * len(order) + 1.4),
                             sharey=True, squeeze=False)
    y = np.arange(len(order))
    for ax, comp in zip(axes[0], comps):
        t = best[comp].reindex(order)
        ax.errorbar(t["spearman"], y, xerr=[t["spearman"] - t["spearman_lo"], t["spearman_hi"] - t["spearman"]],
                    fmt="o", capsize=3)
        for yi, (rho, hi, var) in enumerate(zip(t["spearman"], t["spearman_hi"], t["variant"])):
            if var != "raw" and np.isfinite(rho):
                ax.annotate(VARIANT_LABELS[var], (hi, yi), xytext=(3, -3), textcoords="offset points", fontsize=7,
                            color="dimgrey")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set(xlabel="Spearman ρ", title=COMPONENT_TITLES.get(comp, comp), xlim=(-0.3, 1.1))
    axes[0][0].set_yticks(y, [D.label(s) for s in order])
    return fig


def token_heatmap_figure(raw: RawScores, images: torch.Tensor, layer: int, indices: list[int],
                         scores: tuple[str, ...] = ("heart_exact", "heart", "heart_hutchinson", "taylor",
                                                    "cls_attention")):
    """Per image: the picture, the leave-one-out ΔL map and each score's map at `layer` (patch grid)."""
    from heart_lib import plots
    import matplotlib.pyplot as plt

    plots.use_style()
    scores = tuple(s for s in scores if s in raw.tokens)
    p = raw.num_prefix_tokens
    n = raw.loo_tokens[layer].shape[1] - p
    side = int(round(n ** 0.5))
    cols = 2 + len(scores)
    fig, axes = plt.subplots(len(indices), cols, figsize=(plots.COLUMN_WIDTH, plots.COLUMN_WIDTH / cols * len(indices) + 0.5),
                             squeeze=False)
    for row, i in enumerate(indices):
        img = images[row].permute(1, 2, 0).numpy()
        img = (img - img.min()) / max(img.max() - img.min(), 1e-8)
        panels = [("image", None), ("leave-one-out ΔL", raw.loo_tokens[layer][i, p:])]
        panels += [(D.label(s), raw.tokens[s][layer][i, p:]) for s in scores]
        for col, (title, values) in enumerate(panels):
            ax = axes[row, col]
            if values is None:
                ax.imshow(img)
            else:
                ax.imshow(values.reshape(side, side), cmap="magma")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(textwrap.fill(title, 14), fontsize=7)
    return fig


def head_map_figure(raw: RawScores, scores: tuple[str, ...] = ("heart_exact", "heart", "taylor", "cls_attention")):
    """Layer × head maps of the image-averaged ΔL and scores; a score computed on a subset of the
    images (the exact diagonal) is averaged over that subset, and a score with no value is left out."""
    from heart_lib import plots
    import matplotlib.pyplot as plt

    plots.use_style()
    panels = [("leave-one-out ΔL", "ΔL (nats)", raw.loo_heads)]
    panels += [(D.label(s), "score", raw.heads[s]) for s in scores if s in raw.heads]
    panels = [(title, unit, np.nanmean(np.asarray(v, dtype=float), axis=0)) for title, unit, v in panels
              if np.isfinite(np.asarray(v, dtype=float)).any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(plots.COLUMN_WIDTH, 2.9), squeeze=False)
    for ax, (title, unit, values) in zip(axes[0], panels):
        im = ax.imshow(values, cmap="viridis", aspect="auto")
        ax.grid(False)
        ax.set_title(textwrap.fill(title, 18), fontsize=8)
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(0, values.shape[0], 2 if values.shape[0] > 6 else 1))
        ax.set(xlabel="head", ylabel="layer" if ax is axes[0][0] else "")
        ax.tick_params(labelsize=7)
        bar = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.04)
        bar.set_label(unit, fontsize=7)
        bar.ax.tick_params(labelsize=6)
    return fig


def heatmap_images(params: Params) -> tuple[list[int], torch.Tensor]:
    """The first `heatmap_images` images of the run (indices and pixels, model-normalised)."""
    model, dataset = build(params)
    idx = list(range(min(params.heatmap_images, len(dataset))))
    return idx, torch.stack([dataset[i][0] for i in idx]) if idx else torch.empty(0)


def summary_markdown(summary: dict[str, Any]) -> str:
    """A short generated paragraph: data, and the best score per component (numbers from results)."""
    lines = [f"{summary['images']} images, {summary['model']} ({summary['weights']} weights), loss "
             f"`{summary['loss']}`; mean unpruned loss {summary['mean_loss']:.3f}; the model's prediction "
             f"matches the label on {100 * summary['pseudo_label_accuracy']:.1f} % of these images.", "",
             "Best-ranking score per component (Spearman ρ with leave-one-out ΔL, 95 % bootstrap CI):", ""]
    for row in summary["best"]:
        lines.append(f"- {row['component']}: **{D.label(row['score'])}** ({VARIANT_LABELS.get(row['variant'], row['variant'])}), "
                     f"ρ = {row['spearman']:.3f} [{row['spearman_lo']:.3f}, {row['spearman_hi']:.3f}]")
    secs = summary.get("seconds_per_image", {})
    if secs:
        lines += ["", "Compute time per image on this machine: " + ", ".join(
            f"{D.label(k)} {v:.2f} s" for k, v in sorted(secs.items(), key=lambda kv: -kv[1]))
            + "."]
    return "\n".join(lines)
