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
from scipy import stats as st

from heart_lib import data, models, results
from heart_lib import display as D
from heart_lib import sensitivity as S
from heart_lib.experiments.common import model_and_dataset
from heart_lib.gates import vit_info
from heart_lib.progress import progress as progress_bar

SCORES_VERSION = 1  # bump when the meaning of the stored raw scores changes (invalidates reuse)
CURVATURE_SCORES = ("heart", "heart_global", "heart_hutchinson", "heart_exact")
ALL_SCORES = CURVATURE_SCORES + ("second_order", "second_order_exact", "taylor", "fisher", "cls_attention", "norm",
                                 "random")
EXACT_SCORES = ("heart_exact", "second_order_exact")  # computed on the first `exact_limit` images only


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
    exact_limit: int = 8  # images that also get the exact diagonal (one HVP per component); 0 = none
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
    loo_tokens: dict[int, np.ndarray]
    loo_heads: np.ndarray
    loss: np.ndarray  # [I] per-image loss of the unpruned model
    labels: np.ndarray
    predictions: np.ndarray
    num_prefix_tokens: int
    seconds: dict[str, float]  # compute time per score family, all images it was computed for
    exact_images: int = 0  # images that have the exact scores (the first ones)


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
    curv = lambda d, k: d.curvature[k]  # noqa: E731
    hutch = _timed(seconds, "heart_hutchinson", lambda: S.gate_derivatives(
        model, images, curvature_estimator="hutchinson", probes=params.probes, seed=params.seed, **kw))
    tok["heart_hutchinson"], hd["heart_hutchinson"] = _collect(layers, heads, hutch, curv)
    # The gradient is exact whatever the curvature estimator: first-order scores come from here.
    tok["second_order"], hd["second_order"] = _collect(layers, heads, hutch,
                                                       lambda d, k: -d.grad[k] + 0.5 * d.curvature[k])
    tok["taylor"], hd["taylor"] = _collect(layers, heads, hutch, lambda d, k: d.grad[k].abs())
    tok["fisher"], hd["fisher"] = _collect(layers, heads, hutch, lambda d, k: d.grad[k].square())
    for name, scope in (("heart", "layer"), ("heart_global", "global")):
        if name in wanted:
            deriv = _timed(seconds, name, lambda: S.gate_derivatives(model, images, curvature_estimator="single",
                                                                     scope=scope, **kw))
            tok[name], hd[name] = _collect(layers, heads, deriv, curv)
    for name in ("cls_attention", "norm", "random"):
        if name in wanted:
            res = _timed(seconds, name, lambda: S.score_components(
                model, images, layers=layers, heads=True, method=name, loss=params.loss, labels=labels,
                seed=params.seed))
            tok[name], hd[name] = res.tokens, res.heads
    loo_t = _timed(seconds, "leave_one_out", lambda: S.leave_one_out_tokens(
        model, images, layers=layers, loss=params.loss, labels=labels, tokens=_loo_subset(params, images, model)))
    loo_h = _timed(seconds, "leave_one_out", lambda: S.leave_one_out_heads(
        model, images, loss=params.loss, labels=labels))
    tok = {k: v for k, v in tok.items() if k in wanted}
    hd = {k: v for k, v in hd.items() if k in wanted}
    return tok, hd, loo_t, loo_h, hutch


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
    exact = _timed(seconds, "heart_exact", lambda: S.gate_derivatives(
        model, images, token_layers=layers, head_layers=heads, loss=params.loss, labels=labels,
        curvature_estimator="exact", components=components))
    tok, hd = {}, {}
    tok["heart_exact"], hd["heart_exact"] = _collect(layers, heads, exact, lambda d, k: d.curvature[k])
    tok["second_order_exact"], hd["second_order_exact"] = _collect(
        layers, heads, exact, lambda d, k: -d.grad[k] + 0.5 * d.curvature[k])
    return tok, hd


def params_key(params: Params, stage: str = "scores") -> str:
    """Digest of what the stored raw scores of `stage` ("scores" or "exact") depend on
    (display settings excluded; the cheap stage does not depend on exact_limit)."""
    skip = {"bootstrap", "heatmap_images", "heatmap_layer", "reuse"}
    if stage == "scores":
        skip.add("exact_limit")  # (the exact stage depends on loo_tokens too: it scores those tokens)
    relevant = {k: v for k, v in asdict(params).items() if k not in skip}
    relevant.update(version=SCORES_VERSION, stage=stage)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        loo_tokens={l: _cat([p[2][l] for p in parts]) for l in params.layers},
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
    heads: dict[str, np.ndarray] = {}
    for name in z.files:
        parts = name.split("/")
        if parts[0] == "tokens":
            tokens.setdefault(parts[1], {})[int(parts[2])] = z[name]
        elif parts[0] == "loo_tokens":
            loo_tokens[int(parts[1])] = z[name]
        elif parts[0] == "heads":
            heads[parts[1]] = z[name]
    raw = RawScores(tokens=tokens, heads=heads, loo_tokens=loo_tokens, loo_heads=z["loo_heads"], loss=z["loss"],
                    labels=z["labels"], predictions=z["predictions"], num_prefix_tokens=meta["num_prefix_tokens"],
                    seconds=meta["seconds"])
    return raw, meta["key"]


def raw_scores(params: Params, out: Path, progress: bool = True) -> RawScores:
    """Raw scores, reused from `out/raw_scores.npz` (and `raw_exact.npz`) when they were computed
    with the same parameters and reuse is on; else computed and stored (each stage separately, so
    an interrupted exact pass does not redo the leave-one-out)."""
    path, exact_path = out / "raw_scores.npz", out / "raw_exact.npz"
    key, exact_key = params_key(params, "scores"), params_key(params, "exact")
    raw = None
    if params.reuse and path.is_file():
        raw, stored = load_raw(path)
        if stored != key:
            raw = None
    if raw is None:
        raw = compute_raw(params, progress)
        save_raw(raw, path, key)
    wanted = [s for s in EXACT_SCORES if s in params.scores]
    if params.exact_limit and wanted:
        exact = None
        if params.reuse and exact_path.is_file():
            exact, stored = load_raw(exact_path)
            if stored != exact_key:
                exact = None
        if exact is None:
            tok, hd, seconds = compute_exact(params, raw, progress)
            exact = RawScores(tokens=tok, heads=hd, loo_tokens={}, loo_heads=np.zeros(0), loss=np.zeros(0),
                              labels=np.zeros(0), predictions=np.zeros(0), num_prefix_tokens=raw.num_prefix_tokens,
                              seconds=seconds)
            save_raw(exact, exact_path, exact_key)
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
    return S.VARIANTS if name in CURVATURE_SCORES else ("raw",)


def _finite_rows(a: np.ndarray) -> np.ndarray:
    return np.isfinite(a.reshape(len(a), -1)).all(1)


def _valid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.isfinite(a) & np.isfinite(b)


def _ranks(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Average ranks (1..n) along rows over the valid entries; NaN elsewhere."""
    filled = np.where(valid, x, np.inf)  # invalid entries rank last, then are blanked
    ranks = st.rankdata(filled, axis=1, method="average")
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


def _mean_ci(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    boots = values[idx].mean(1)
    return float(values.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def _static_ci(score: np.ndarray, truth: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """Correlation of image-averaged scores with image-averaged ΔL, bootstrap over images."""
    keep = _finite_rows(score)
    score, truth = score[keep].reshape(keep.sum(), -1), truth[keep].reshape(keep.sum(), -1)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([np.arange(len(score))[None], rng.integers(0, len(score), (n_boot, len(score)))])
    s_mean, t_mean = score[idx].mean(1), truth[idx].mean(1)  # [1 + n_boot, components]
    rho, tau = rowwise_spearman(s_mean, t_mean), rowwise_kendall(s_mean, t_mean)
    return {"spearman": rho[0], "spearman_lo": np.nanquantile(rho[1:], 0.025),
            "spearman_hi": np.nanquantile(rho[1:], 0.975), "kendall": tau[0],
            "kendall_lo": np.nanquantile(tau[1:], 0.025), "kendall_hi": np.nanquantile(tau[1:], 0.975)}


def per_image_correlations(raw: RawScores) -> pd.DataFrame:
    """One row per (image, component, score, variant) with Spearman and Kendall."""
    rows = []
    p = raw.num_prefix_tokens
    for name, per_layer in raw.tokens.items():
        for variant in _variants(name):
            for layer, values in per_layer.items():
                score = S.apply_variant(torch.from_numpy(values), variant).numpy()[:, p:]
                truth = raw.loo_tokens[layer][:, p:]
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


def correlation_table(raw: RawScores, per_image: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean per-image correlations with bootstrap intervals, plus the static head ranking."""
    rows = []
    token_rows = per_image[per_image["component"].str.startswith("tokens@")]
    layer_mean = (token_rows.groupby(["image", "score", "variant"], as_index=False)[["spearman", "kendall"]].mean()
                  .assign(component="tokens (mean over layers)"))
    for (component, name, variant), group in pd.concat([per_image, layer_mean]).groupby(
            ["component", "score", "variant"], sort=False):
        group = group.sort_values("image")
        row = {"component": component, "score": name, "variant": variant, "aggregation": "per image, mean",
               "n_images": int(group["spearman"].notna().sum())}
        for stat in ("spearman", "kendall"):
            mean, lo, hi = _mean_ci(group[stat].to_numpy(dtype=float), n_boot, seed)
            row.update({stat: mean, f"{stat}_lo": lo, f"{stat}_hi": hi})
        rows.append(row)
    for name, values in raw.heads.items():
        for variant in _variants(name):
            score = S.apply_variant(torch.from_numpy(values), variant).numpy()
            rows.append({"component": "heads (image-mean ranking)", "score": name, "variant": variant,
                         "aggregation": "pooled: mean over images, then one ranking",
                         "n_images": int(_finite_rows(values).sum()),
                         **_static_ci(score, raw.loo_heads, n_boot, seed)})
    order = {c: i for i, c in enumerate(["tokens (mean over layers)"] + [f"tokens@{l}" for l in sorted(raw.loo_tokens)]
                                        + ["heads", "heads (image-mean ranking)"])}
    table = pd.DataFrame(rows)
    table["_o"] = table["component"].map(order)
    return table.sort_values(["_o", "spearman"], ascending=[True, False]).drop(columns="_o").reset_index(drop=True)


def estimator_agreement(raw: RawScores, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """How well each fast curvature estimator ranks like the exact diagonal (images with exact scores)."""
    if "heart_exact" not in raw.tokens or raw.exact_images == 0:
        return pd.DataFrame()
    p, k = raw.num_prefix_tokens, raw.exact_images
    rows = []
    for name in ("heart", "heart_global", "heart_hutchinson"):
        if name not in raw.tokens:
            continue
        per_layer = [rowwise_spearman(raw.tokens[name][l][:k, p:], raw.tokens["heart_exact"][l][:k, p:])
                     for l in sorted(raw.tokens[name])]
        token_mean, lo, hi = _mean_ci(np.mean(per_layer, 0), n_boot, seed)
        heads = rowwise_spearman(raw.heads[name][:k].reshape(k, -1), raw.heads["heart_exact"][:k].reshape(k, -1))
        h_mean, h_lo, h_hi = _mean_ci(heads, n_boot, seed)
        rows.append({"estimator": name, "images": k, "tokens_spearman": token_mean, "tokens_lo": lo, "tokens_hi": hi,
                     "heads_spearman": h_mean, "heads_lo": h_lo, "heads_hi": h_hi})
    return pd.DataFrame(rows)


def best_scores(table: pd.DataFrame) -> pd.DataFrame:
    """The best-ranking (score, variant) per component, and the best variant of each HEART score."""
    best = table.loc[table.groupby("component", sort=False)["spearman"].idxmax()]
    return best[["component", "score", "variant", "spearman", "spearman_lo", "spearman_hi"]].reset_index(drop=True)


def variant_table(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman of raw / |S| / clamped side by side for the curvature scores."""
    curv = table[table["score"].isin(CURVATURE_SCORES)]
    return curv.pivot_table(index=["component", "score"], columns="variant", values="spearman",
                            sort=False).reset_index()


# ---------------------------------------------------------------------------------------------
# the chapter's entry point and figures


def run(params: Params, out: Path, progress: bool = True) -> dict[str, Any]:
    """Compute (or reuse) raw scores; write the correlation tables and a summary under `out`."""
    raw = raw_scores(params, out, progress)
    per_image = per_image_correlations(raw)
    table = correlation_table(raw, per_image, params.bootstrap, params.seed)
    meta = {"params": asdict(params)}
    results.write_table(out / "per_image_correlations.csv", per_image, meta=meta)
    results.write_table(out / "correlations.csv", table, meta=meta)
    best = best_scores(table)
    results.write_table(out / "best.csv", best, meta=meta)
    agreement = estimator_agreement(raw, params.bootstrap, params.seed)
    if len(agreement):
        results.write_table(out / "estimator_vs_exact.csv", agreement, meta=meta)
    images = len(raw.loss)
    summary = {
        "model": params.model, "weights": str(params.weights), "dataset": params.dataset, "images": images,
        "loss": params.loss, "layers": list(params.layers), "num_prefix_tokens": raw.num_prefix_tokens,
        "mean_loss": float(raw.loss.mean()), "pseudo_label_accuracy": float((raw.labels == raw.predictions).mean()),
        "exact_images": raw.exact_images,
        "seconds_per_image": {k: v / (raw.exact_images if k == "heart_exact" else images)
                              for k, v in raw.seconds.items()},
        "best": best.to_dict(orient="records"),
        "aggregation": "tokens: Spearman/Kendall per image across non-prefix tokens of one layer, mean over "
                       "images; heads: per image across all heads, mean over images, and pooled image-mean "
                       "ranking; 95 % percentile bootstrap over images",
    }
    results.write_json(out / "summary.json", summary)
    return {"raw": raw, "per_image": per_image, "table": table, "best": best, "agreement": agreement,
            "summary": summary}


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
