"""The claims summary's verdicts follow its criteria, computed from result files."""

import json

import pandas as pd
import pytest

from heart_lib.experiments import claims


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("HEART_RESULTS", str(tmp_path))
    folder = tmp_path / "p"
    folder.mkdir()
    return folder


def _params(tmp_path, **kw):
    return claims.Params(speed_benchmark=str(tmp_path / "bench.json"), devices_root=str(tmp_path / "devices"), **kw)


def _primaries(folder, heart, other):
    """A primaries table: HEART against every opponent family's primary, each at `other`."""
    from heart_lib import catalogue

    rows = []
    for component in ("tokens (mean over layers)", "heads"):
        for family in catalogue.FAMILIES:
            rho = heart if family == "heart" else other
            row = {"component": component, "family": family, "score": catalogue.primary(family), "n_images": 64,
                   "spearman": rho, "spearman_lo": rho - 0.05, "spearman_hi": rho + 0.05}
            if family != "heart":
                d = heart - other
                row.update(heart_minus=d, heart_minus_lo=d - 0.04, heart_minus_hi=d + 0.04,
                           relation="better" if d - 0.04 > 0 else "worse" if d + 0.04 < 0 else "overlap")
            rows.append(row)
    (folder / "sensitivity").mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "sensitivity" / "primaries.csv", index=False)


@pytest.mark.parametrize("heart, other, verdict", [(0.6, 0.3, "reproduced"), (0.3, 0.6, "not reproduced"),
                                                   (0.5, 0.48, "inconclusive")])
def test_c1_verdict_follows_the_paired_intervals(results, tmp_path, heart, other, verdict):
    _primaries(results, heart, other)
    row = claims.claim_c1(results, _params(tmp_path))
    assert row.verdict == verdict
    assert f"HEART ρ = {heart:.2f}" in row.ours and f"{heart - other:+.2f}" in row.ours


def test_c1_ignores_the_full_second_order():
    """The full second order (also curvature) is shown beside HEART, never counted as its opponent."""
    assert "second_order" not in claims.c1_opponents() and "heart" not in claims.c1_opponents()
    assert {"first_order", "fisher", "attention", "norm", "random"} <= set(claims.c1_opponents())


def _sweep(folder, rows):
    frame = pd.DataFrame(rows, columns=["family", "method", "flops_reduction", "top1"])
    frame["images"] = "all"
    frame["dense_top1_same_images"] = 0.80
    (folder / "pruning").mkdir(exist_ok=True)
    frame.to_csv(folder / "pruning" / "sweep.csv", index=False)


def test_c2_and_c3_from_the_sweep(results, tmp_path):
    _sweep(results, [("dense", "unpruned", 0.0, 0.80), ("token", "heart", 0.30, 0.795), ("token", "heart", 0.45, 0.70),
                     ("head", "heart", 0.10, 0.80), ("head", "heart", 0.20, 0.60),
                     ("joint", "heart", 0.50, 0.795)])
    params = _params(tmp_path)
    assert claims.claim_c2(results, params).verdict == "reproduced"
    c3 = claims.claim_c3(results, params)
    assert c3.verdict == "reproduced" and "50.0 %" in c3.ours
    assert claims.claim_c3(results, _params(tmp_path, max_top1_drop=0.0)).verdict == "not reproduced"


def test_c4_reads_the_speed_benchmark(results, tmp_path):
    rows = [{"model": "vit", "batch": b, "kind": "joint", "flops_reduction": 0.49, "latency_reduction": lat,
             "throughput_gain": gain} for b, lat, gain in ((1, 0.40, 0.66), (32, 0.45, 0.80))]
    (tmp_path / "bench.json").write_text(json.dumps({"rows": rows, "device": {"cpu_model": "x", "threads": 2}}))
    assert claims.claim_c4(results, _params(tmp_path)).verdict == "reproduced"
    rows[1]["latency_reduction"], rows[1]["throughput_gain"] = 0.2, 0.25
    (tmp_path / "bench.json").write_text(json.dumps({"rows": rows, "device": {}}))
    assert claims.claim_c4(results, _params(tmp_path)).verdict == "inconclusive"


def test_c5_compares_with_the_equally_fine_tuned_baseline(results, tmp_path):
    (results / "finetune").mkdir()
    frame = pd.DataFrame([
        ("transfer", "tokens", "vs_before", 0.05, 0.02, 0.08),
        ("transfer", "tokens", "vs_unpruned_tuned", -0.03, -0.05, -0.01),
    ], columns=["experiment", "setting", "comparison", "difference", "lo", "hi"])
    frame.to_csv(results / "finetune" / "recovery.csv", index=False)
    row = claims.claim_c5(results, _params(tmp_path))
    assert row.verdict == "not reproduced" and "+5.0 pts" in row.ours


def test_missing_results_are_named_not_guessed(results, tmp_path):
    table = claims.claims_table("p", _params(tmp_path))
    assert list(table["claim"]) == ["C1", "C2", "C3", "C4", "C5", "C6", "CH1", "CH2", "CH3"]
    assert set(table["verdict"]) == {"not testable here"}
    assert "primaries.csv" in table.set_index("claim").loc["C1", "ours"]


def test_c6_needs_a_jetson(results, tmp_path):
    devices = tmp_path / "devices" / "some-cpu"
    devices.mkdir(parents=True)
    (devices / "s.meta.json").write_text(json.dumps({"fingerprint": {"cpu_model": "AMD EPYC", "l4t": None,
                                                                      "jetson_model": None}}))
    row = claims.claim_c6(results, _params(tmp_path))
    assert row.verdict == "not testable here" and "1 other device" in row.ours
    orin = tmp_path / "devices" / "orin"
    orin.mkdir()
    (orin / "s.meta.json").write_text(json.dumps({"fingerprint": {"device_name": "orin", "l4t": "36.4.0",
                                                                   "jetson_model": "NVIDIA Jetson AGX Orin"}}))
    (results / "edge").mkdir()
    pd.DataFrame([{"device": "orin", "model": "vit", "batch": 1, "pruning": "tokens=0.6@3,6,9",
                   "latency": "-30.0 %", "energy/img": "-25.0 %"}]).to_csv(results / "edge" / "comparison.csv", index=False)
    assert claims.claim_c6(results, _params(tmp_path)).verdict == "reproduced"


def test_bad_criteria_are_refused():
    from heart_lib import config

    with pytest.raises(config.ConfigError, match="max_top1_drop"):
        config.validate("claims", {"max_top1_drop": 2})


def test_claims_markdown_keeps_every_claim_and_escapes_cells(results, tmp_path):
    table = claims.claims_table("p", _params(tmp_path))
    table.loc[0, "ours"] = "a | b\nc"
    overview = [line for line in claims.verdict_markdown(table, "p").splitlines() if line.startswith("| **C")]
    assert [line.split("**")[1] for line in overview] == list(table["claim"])
    assert all(line.count(" | ") == 4 for line in overview)  # five cells each, none broken by the text
    text = claims.claims_markdown(table, "p")
    assert "| ours | a \\| b c |" in text
    for claim, verdict in zip(table["claim"], table["verdict"]):
        assert f"### {claim}: " in text and f"**{verdict}**" in text


def test_a_plumbing_profile_gives_no_verdicts(results, tmp_path):
    table = claims.claims_table("p", _params(tmp_path))
    assert not claims.gives_verdicts("smoke") and claims.gives_verdicts("default")
    shown = claims.bottom_line(table, "smoke") + claims.verdict_markdown(table, "smoke") + claims.claims_markdown(
        table, "smoke")
    assert not any(f"**{verdict}**" in shown for verdict in claims.VERDICTS)
    assert "no verdicts" in shown


def test_the_bottom_line_counts_the_verdicts(results, tmp_path):
    table = claims.claims_table("p", _params(tmp_path))
    line = claims.bottom_line(table, "p")
    assert f"**{len(table)}** not testable here" in line  # no result files: nothing can be tested


def test_each_claim_says_how_the_setting_differs():
    table = claims.claims_table("default", claims.Params())
    assert table["differs"].str.len().gt(0).all()
    assert table.set_index("claim").loc["C5", "differs"].count("paper:") >= 1
