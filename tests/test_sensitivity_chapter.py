"""The sensitivity chapter's C1 tables: pre-registered primaries, paired differences, both truths."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from heart_lib import catalogue, stats
from heart_lib.experiments import sensitivity as chapter


def _per_image(rho_by_score: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for score, values in rho_by_score.items():
        for component in ("tokens@3", "tokens@6", "heads"):
            rows += [{"image": i, "component": component, "score": score, "variant": "raw", "spearman": v,
                      "kendall": v} for i, v in enumerate(values)]
    return pd.DataFrame(rows)


def test_primaries_compare_heart_with_each_family_paired_over_images():
    rng = np.random.default_rng(0)
    base = rng.normal(0.3, 0.2, 40)  # images differ a lot; the paired difference removes that spread
    scores = {catalogue.primary(f): base + (0.05 if f == "heart" else 0.0) for f in catalogue.FAMILIES}
    scores[catalogue.primary("norm")] = base + 0.2  # one family beats HEART
    scores["taylor"] = base + 0.5  # a non-primary variant never enters the comparison
    table = chapter.primary_comparison(_per_image(scores), n_boot=500)
    assert set(table["component"]) == {"tokens (mean over layers)", "heads"}
    tokens = table[table["component"] == "tokens (mean over layers)"].set_index("family")
    assert tokens.loc["first_order", "relation"] == "better"  # +0.05 on every image: a tight paired interval
    assert tokens.loc["norm", "relation"] == "worse"
    assert "taylor" not in set(table["score"])
    # unpaired intervals overlap although the paired difference is clear: pairing is what decides
    assert tokens.loc["first_order", "spearman_lo"] < tokens.loc["heart", "spearman_hi"]
    np.testing.assert_allclose(tokens.loc["first_order", "heart_minus"], 0.05)
    assert (table["n_images"] == 40).all()


def test_best_of_variants_counts_each_familys_variants():
    table = pd.DataFrame([
        {"component": "heads", "score": "heart", "variant": v, "spearman": r, "spearman_lo": r - 0.1,
         "spearman_hi": r + 0.1, "n_images": 8} for v, r in (("raw", 0.1), ("abs", 0.4), ("clamp", 0.2))
    ] + [{"component": "heads", "score": "norm", "variant": "raw", "spearman": 0.3, "spearman_lo": 0.2,
          "spearman_hi": 0.4, "n_images": 8}])
    best = chapter.best_of_variants(table).set_index("family")
    assert best.loc["heart", "variants"] == 3 and best.loc["heart", "variant"] == "abs"
    assert best.loc["norm", "variants"] == 1


def test_truth_agreement_reports_rank_and_sign_agreement():
    gen = np.random.default_rng(1)
    drop = gen.normal(size=(6, 11))
    zero = drop.copy()
    zero[:, 1:6] *= -1  # half the patch tokens flip sign
    drop[:, 0] = zero[:, 0] = np.nan  # the class token has no dropping truth
    raw = chapter.RawScores(tokens={}, heads={}, loo_tokens={3: drop}, loo_heads=np.zeros((6, 1, 1)),
                            loss=np.zeros(6), labels=np.zeros(6), predictions=np.zeros(6), num_prefix_tokens=1,
                            seconds={}, loo_tokens_zero={3: zero})
    row = chapter.truth_agreement(raw, n_boot=200).iloc[0]
    assert row["layer"] == 3 and row["n_images"] == 6
    assert row["same_sign"] == pytest.approx(0.5)
    assert row["tokens_per_image"] == 10


def test_bootstrap_intervals_are_as_wide_as_the_spread_allows():
    """A mean's 95 % interval cannot be narrower than about ±1.96·sd/√n (checked at n = 16)."""
    values = np.random.default_rng(2).normal(0.3, 0.25, 16)
    mean, lo, hi = stats.mean_interval(values, 4000, 0)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert mean == pytest.approx(values.mean())
    assert 0.8 * half < (hi - lo) / 2 < 1.2 * half


def test_committed_per_image_intervals_are_as_wide_as_their_spread():
    """Every committed "per image, mean" interval of correlations.csv is at least 0.8·1.96·sd/√n
    wide (half-width), with sd and n from that row's per-image values in per_image_correlations.csv."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "results" / "default" / "sensitivity"
    table_path, per_image_path = folder / "correlations.csv", folder / "per_image_correlations.csv"
    if not (table_path.is_file() and per_image_path.is_file()):
        pytest.skip(f"no committed sensitivity results in {folder}")
    table = pd.read_csv(table_path)
    per_image = pd.read_csv(per_image_path)
    # The per-layer-mean component is the per-image mean over the token layers (chapter._with_layer_mean).
    tokens = per_image[per_image["component"].str.startswith("tokens@")]
    layer_mean = (tokens.groupby(["image", "score", "variant"], as_index=False)[["spearman", "kendall"]].mean()
                  .assign(component="tokens (mean over layers)"))
    groups = pd.concat([per_image, layer_mean], ignore_index=True).groupby(["component", "score", "variant"])
    rows = table[table["aggregation"] == "per image, mean"]
    assert len(rows) > 0
    checked = 0
    for _, row in rows.iterrows():
        values = groups.get_group((row["component"], row["score"], row["variant"]))
        for stat in ("spearman", "kendall"):
            v = values[stat].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            assert len(v) == row["n_images"], (row["component"], row["score"], row["variant"], stat)
            if len(v) < 2:
                continue
            assert row[stat] == pytest.approx(v.mean(), abs=1e-5)
            floor = 0.8 * 1.96 * v.std(ddof=1) / np.sqrt(len(v))
            half = (row[f"{stat}_hi"] - row[f"{stat}_lo"]) / 2
            assert half >= floor, (f"{row['component']}, {row['score']} ({row['variant']}), {stat}: half-width "
                                   f"{half:.4g} < 0.8·1.96·sd/√n = {floor:.4g} (n = {len(v)})")
            checked += 1
    assert checked == 2 * len(rows)
