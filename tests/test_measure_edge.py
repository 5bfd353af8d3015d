"""The edge chapter's tables and figure from measurement folders (synthetic rows: no timing here)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

import heart_lib  # noqa: F401
from heart_lib import config
from heart_lib.experiments import edge
from heart_lib.measure import run, tables


def _rows(device, pruning, batch, latencies_ms, flops, energy=None, status="ok"):
    rows = []
    for i, lat in enumerate(latencies_ms):
        rows.append({"session": "s1", "run_id": f"m__{pruning}__b{batch}__r{i}", "device_name": device, "model": "m",
                     "pruning": pruning, "batch_size": batch, "repeat": i, "status": status, "status_detail": "",
                     "latency_median_ms": lat, "latency_per_image_ms": lat / batch,
                     "throughput_img_s": batch / lat * 1e3, "peak_memory_mb": 100.0, "flops_per_image": flops,
                     "flops_source": "analytic", "precision": "fp32", "threads": 2, "fresh_process": True,
                     "energy_source": "jtop" if energy else "none",
                     "energy_reason": "jtop total" if energy else "no energy source: test",
                     "energy_status": "ok" if energy else "none",
                     "energy_per_image_j": energy[i] if energy else math.nan, "cpu_share": 0.95,
                     "load_avg_1m_start": 0.5})
    return rows


@pytest.fixture
def devices(tmp_path):
    root = tmp_path / "devices"
    orin = _rows("orin", "none", 1, [10, 11, 12, 13, 30], 2e9, energy=[1.0, 1.1, 1.2, 1.3, 1.4]) + \
        _rows("orin", "tokens=0.6@3", 1, [6, 7, 8, 8, 9], 1e9, energy=[0.5, 0.6, 0.7, 0.7, 0.8])
    cpu = _rows("cpu", "none", 1, [100, 100, 100], 2e9) + _rows("cpu", "none", 64, [math.nan], 2e9, status="oom_predicted")
    (root / "orin").mkdir(parents=True)
    (root / "cpu").mkdir()
    run.tidy(orin).to_csv(root / "orin" / "s1.csv", index=False)
    run.tidy(cpu).to_csv(root / "cpu" / "s1.csv", index=False)
    return root


def test_summary_takes_medians_over_runs_and_keeps_failures(devices):
    summary = tables.summarize(tables.load_runs(devices))
    base = summary[(summary.device_name == "orin") & (summary.pruning == "none")].iloc[0]
    assert base["latency_median_ms"] == 12 and base["runs_ok"] == 5  # the 30 ms outlier does not move it
    assert base["latency_iqr_ms"] == 2 and base["energy_per_image_j"] == pytest.approx(1.2)
    failed = summary[(summary.device_name == "cpu") & (summary.batch_size == 64)].iloc[0]
    assert failed["runs_ok"] == 0 and failed["statuses"] == "oom_predicted" and math.isnan(failed["latency_median_ms"])
    rel = tables.add_relative(summary)
    pruned = rel[rel.pruning != "none"].iloc[0]
    assert pruned["latency_change"] == pytest.approx(8 / 12 - 1)
    assert pruned["flops_change"] == pytest.approx(-0.5)
    assert pruned["energy_change"] == pytest.approx(0.7 / 1.2 - 1)


def test_edge_run_writes_tables_and_the_figure(devices, tmp_path):
    params = config.validate("edge", {"devices_root": str(devices)})
    out = tmp_path / "out"
    out.mkdir()
    result = edge.run(params, out)
    for name in ("runs.csv", "summary.csv", "devices.csv", "comparison.csv", "latency_throughput_energy_vs_flops.png"):
        assert (out / name).is_file(), name
    comparison = result["comparison"]
    assert list(comparison["latency"]) == ["-33.3 %"] and list(comparison["FLOPs"]) == ["-50.0 %"]
    devices_table = result["devices"].set_index("device")
    assert "no energy source" in devices_table.loc["cpu", "energy_reason"]
    assert len(edge.display_summary(result["summary"])) == 4


def test_edge_params_are_validated():
    with pytest.raises(config.ConfigError, match="live_repeats"):
        config.validate("edge", {"live_repeats": 0})
    with pytest.raises(config.ConfigError, match="unknown model"):
        config.validate("edge", {"live_model": "not_a_model"})
    with pytest.raises(config.ConfigError):
        config.validate("edge", {"live_prunings": ["tokens=2@1"]})
    with pytest.raises(FileNotFoundError, match="no measurements"):
        edge.load(config.validate("edge", {"devices_root": "/nonexistent/devices"}), None)


def test_contended_cpu_runs_are_marked_not_dropped(devices):
    runs = tables.load_runs(devices)
    runs = runs.sort_values(["device_name", "batch_size", "repeat"]).reset_index(drop=True)  # cpu first
    runs["device"] = ["cpu"] * 4 + ["cuda"] * 10
    runs["cpu_share"] = [0.5, 0.95, 0.97, 0.99] + [0.1] * 10
    marked = edge.mark_contended(runs, 0.9)
    assert len(marked) == len(runs)
    assert marked["status"].tolist()[4:] == runs["status"].tolist()[4:]  # GPU rows untouched
    assert marked["status"].iloc[0] == "contended" and "cpu_share 0.50" in marked["status_detail"].iloc[0]
    summary = tables.summarize(marked)
    cpu1 = summary[(summary.device_name == "cpu") & (summary.batch_size == 1)].iloc[0]
    assert cpu1["runs_ok"] == 2 and cpu1["statuses"] == "contended"
