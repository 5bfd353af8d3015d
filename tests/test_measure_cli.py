"""The measure command end to end on the CPU, runs that fail, and the summary tables."""

from __future__ import annotations

import json
import math
import time

import pandas as pd
import pytest
import torch

import heart_lib  # noqa: F401 - before timm
from heart_lib.measure import cli, energy, tables, workload
from heart_lib.measure.run import RunSpec, measure_one

TINY = '{"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10}'
TINY_KW = json.loads(TINY)
QUICK = ["--model", "vit_tiny_patch16_224", "--model-kwargs", TINY, "--warmup", "1", "--min-iters", "2",
         "--min-time", "0.05", "--threads", "1"]


def _session(out):
    csvs = sorted(out.glob("*.csv"))
    assert len(csvs) == 1, csvs
    return pd.read_csv(csvs[0]), json.loads(csvs[0].with_suffix(".meta.json").read_text())


def test_cli_end_to_end_with_pruning_and_a_batch_that_does_not_fit(tmp_path):
    out = tmp_path / "dev"
    code = cli.run_cli(QUICK + ["--pruning", "none", "--pruning", "tokens=0.5@1;selector=cls_attention",
                                "--batch", "1,2,1000000000", "--repeats", "2", "--in-process", "--out", str(out)])
    assert code == 0
    runs, meta = _session(out)
    # 2 prunings x 3 batches x 2 repeats, the huge batch reported once and its repeat skipped
    assert len(runs) == 12
    huge = runs[runs["batch_size"] == 1000000000]
    # predicted before allocating (or, if the prediction let it through, the failed allocation is caught)
    assert set(huge["status"]) in ({"oom_predicted", "skipped"}, {"oom", "skipped"})
    assert (huge["status"] != "skipped").sum() == 2
    ok = runs[runs["status"] == "ok"]
    assert len(ok) == 8 and (ok["throughput_img_s"] > 0).all() and (ok["latency_median_ms"] > 0).all()
    assert ok["iters"].min() >= 2 and (ok["threads"] == 1).all()
    # every row is stamped with the device and the software
    for col in ("device_name", "cpu_model", "torch", "timm", "precision", "energy_source"):
        assert runs[col].notna().all(), col
    # the pruned model has fewer FLOPs than the dense one, from the same source
    flops = ok.groupby("pruning")["flops_per_image"].first()
    assert flops["tokens=0.5@1;selector=cls_attention"] < flops["none"]
    assert ok["flops_source"].str.contains("heart_lib.flops|FlopCounterMode").all()
    # energy: a measured value or an explicit reason, never a silent number
    if (ok["energy_source"] == "none").all():
        assert ok["energy_per_image_j"].isna().all() and ok["energy_reason"].str.contains("no energy source").all()
    assert meta["fingerprint"]["threads"] == 1 and meta["runs_planned"] == 12
    raw = list((out / "raw").rglob("*.json"))
    assert len(raw) == 10  # skipped runs leave no raw file
    summary = tables.summarize(tables.load_runs(tmp_path))
    assert len(summary) == 6  # configurations, failures included
    assert summary.loc[summary["batch_size"] == 1000000000, "runs_ok"].eq(0).all()


def test_cli_fresh_process_runs_append_cleanly_to_the_same_folder(tmp_path):
    out = tmp_path / "dev"
    assert cli.run_cli(QUICK + ["--batch", "1", "--repeats", "2", "--out", str(out), "--energy", "none"]) == 0
    time.sleep(1.1)  # a new session id (second resolution)
    assert cli.run_cli(QUICK + ["--batch", "1", "--repeats", "1", "--in-process", "--out", str(out),
                                "--energy", "none", "--pruning", "heads=0:1"]) == 0
    runs = tables.load_runs(tmp_path)
    assert len(runs) == 3 and runs["session"].nunique() == 2
    assert runs.loc[runs["pruning"] == "none", "fresh_process"].all()
    assert (runs["status"] == "ok").all() and (runs["energy_source"] == "none").all()
    relative = tables.add_relative(tables.summarize(runs))
    pruned = relative[relative["pruning"] != "none"].iloc[0]
    assert pruned["flops_change"] < 0  # one head removed


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "unknown device"),
    (["--model", "vit_nonexistent_model"], "unknown model"),
    (["--pruning", "tokens=0.5@99;selector=random", "--model", "vit_tiny_patch16_224"], "layer 99 is out of range"),
    (["--pruning", "tokens=0.5@1;selector=norm", "--model", "resnet18", "--model-kwargs", "{}"],
     "not a ViT/DeiT"),
    (["--repeats", "0"], "repeats"),
    (["--energy", "rapl"], None),
])
def test_bad_input_is_exit_code_2_with_a_message(tmp_path, capsys, args, message):
    if "--energy" in args:
        try:
            energy.RaplSource().close()
            pytest.skip("RAPL is readable here")
        except energy.SourceUnavailable:
            pass
    base = ["--model-kwargs", TINY, "--out", str(tmp_path), "--in-process", "--min-time", "0"]
    if "--model" not in args:
        base = ["--model", "vit_tiny_patch16_224"] + base
    code = cli.run_cli(base + args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:")
    if message:
        assert message in err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_default_out_honours_heart_results_and_a_typo_writes_nothing(tmp_path):
    import os
    import subprocess
    import sys

    from heart_lib.paths import RESULTS_DIR

    committed = sorted(p for p in (RESULTS_DIR / "devices").rglob("*")) if (RESULTS_DIR / "devices").is_dir() else []
    env = {**os.environ, "HEART_RESULTS": str(tmp_path)}
    command = [sys.executable, "-m", "heart_lib", "measure", *QUICK, "--batch", "1", "--repeats", "1",
               "--in-process", "--energy", "none"]
    bad = subprocess.run(command + ["--pruning", "tokens=0.5@7;selector=norm"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "layer 7 is out of range" in bad.stderr and "Traceback" not in bad.stderr
    assert not list(tmp_path.iterdir())
    ok = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "devices").glob("*/*.csv"))) == 1
    assert sorted(p for p in (RESULTS_DIR / "devices").rglob("*")) == committed  # the committed folder is untouched


class _OOMModel(torch.nn.Module):
    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_during_the_run_is_a_status_not_a_crash():
    fake = workload.Workload(_OOMModel().eval(), "fake", "none", 32, 0.0)
    row, raw = measure_one(RunSpec(model="fake", energy="none", min_time_s=0, count_flops=False),
                           build=lambda spec: fake)
    assert row["status"] == "oom" and "out of memory" in row["status_detail"]


def test_power_source_lost_mid_run_keeps_the_run_and_marks_it():
    start = time.perf_counter()

    def read():
        if time.perf_counter() - start > 0.45:  # after the 0.3 s idle window, during the timed window
            raise OSError(19, "No such device")
        return 9.0

    source = energy.CallableSource(read, "power", "flaky-meter")
    spec = RunSpec(model="vit_tiny_patch16_224", model_kwargs=TINY_KW, threads=1, warmup_iters=1, min_iters=2,
                   min_time_s=0.5, idle_s=0.3, interval_s=0.02)
    row, raw = measure_one(spec, source=source)
    assert row["status"] == "ok" and row["latency_median_ms"] > 0
    assert row["energy_status"] == "lost" and "No such device" in row["energy_status_detail"]
    assert math.isnan(row["energy_total_j"]) and raw["trace"]["lost_reason"]


def test_working_power_source_gives_energy_per_image_and_low_overhead():
    source = energy.CallableSource(lambda: 10.0, "power", "constant-meter")
    spec = RunSpec(model="vit_tiny_patch16_224", model_kwargs=TINY_KW, threads=1, warmup_iters=1, min_iters=2,
                   min_time_s=0.5, idle_s=0.2, interval_s=energy.DEFAULT_INTERVAL_S, batch_size=2)
    row, raw = measure_one(spec, source=source)
    assert row["energy_status"] == "ok"
    images = row["iters"] * 2
    assert row["energy_total_j"] == pytest.approx(10.0 * row["timed_s"], rel=1e-6)
    assert row["energy_per_image_j"] == pytest.approx(row["energy_total_j"] / images)
    assert row["idle_power_w"] == pytest.approx(10.0) and row["energy_above_idle_j"] == pytest.approx(0.0, abs=1e-6)
    assert row["sampler_overhead_frac"] < 0.01


def test_contended_runs_are_kept_marked_and_measured_again(tmp_path, monkeypatch):
    from heart_lib.measure import run as run_mod

    shares = iter([0.3, 0.95, 0.5, 0.4, 0.2])

    def fake_measure(spec, source=None, build=None):
        row = run_mod._blank_row(spec)
        row.update(cpu_share=next(shares), latency_median_ms=10.0, load_avg_1m_start=3.0, device_name="d")
        return row, {}

    monkeypatch.setattr(run_mod, "measure_one", fake_measure)
    specs = run_mod.expand(["m"], ["none"], [1], 2)
    rows = run_mod.run_session(specs, tmp_path, "s", fresh_process=False, log=lambda _: None,
                               discipline=run_mod.Discipline(min_cpu_share=0.9, max_retries=2))
    # run 0: contended, then ok on the second attempt; run 1: contended three times (retries exhausted)
    assert rows["status"].tolist() == ["contended", "ok", "contended", "contended", "contended"]
    assert rows["attempt"].tolist() == [0, 1, 0, 1, 2] and rows["repeat"].tolist() == [0, 0, 1, 1, 1]
    assert rows["status_detail"].iloc[0].startswith("cpu_share 0.30 < 0.9")
    assert tables.summarize(rows)["runs_ok"].iloc[0] == 1  # only the clean run enters the medians


def test_waiting_for_a_quiet_machine(monkeypatch):
    from heart_lib.measure import run as run_mod

    loads = iter([5.0, 4.0, 1.0])
    monkeypatch.setattr(run_mod, "_load_average", lambda: next(loads))
    waited = run_mod.wait_for_quiet(2.0, max_wait_s=10.0, poll_s=0.01)
    assert 0.015 < waited < 1.0
    assert run_mod.wait_for_quiet(None, 10.0) == 0.0
    with pytest.raises(ValueError, match="min_cpu_share"):
        run_mod.Discipline(min_cpu_share=1.5).check()
