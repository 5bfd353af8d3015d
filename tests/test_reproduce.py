import json
import os

import pandas as pd

from heart_lib import reproduce, runner


def _write(root, name, frame=None, data=None):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if frame is not None:
        frame.to_csv(path, index=False)
    else:
        path.write_text(json.dumps(data))


def test_comparison_classifies_each_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    table = pd.DataFrame({"acc": [0.5, 0.25], "name": ["x", "y"]})
    for root in (a, b):
        _write(root, "nb/same.csv", table)
    _write(a, "nb/close.csv", table)
    _write(b, "nb/close.csv", table.assign(acc=[0.5, 0.25 * (1 + 1e-6)]))
    _write(a, "nb/far.json", data={"top1": 0.7})
    _write(b, "nb/far.json", data={"top1": 0.6})
    _write(a, "nb/renamed.csv", table)
    _write(b, "nb/renamed.csv", table.assign(name=["x", "z"]))
    _write(a, "nb/gone.csv", table)
    _write(a, "nb/speed.csv", table)
    _write(b, "nb/speed.csv", table.assign(acc=[9.0, 9.0]))
    status = {c.file: c.status for c in reproduce.compare_results(a, b, rtol=1e-4)}
    assert status == {"nb/same.csv": "identical", "nb/close.csv": "within tolerance", "nb/far.json": "different",
                      "nb/renamed.csv": "different", "nb/gone.csv": "missing", "nb/speed.csv": "not repeatable"}


def test_smoke_baseline_is_bit_identical_across_runs(tmp_path, monkeypatch):
    outputs = []
    for attempt in ("first", "second"):
        monkeypatch.setenv("HEART_RESULTS", str(tmp_path / attempt))
        runner.run_profile("smoke", only=["baseline"], log=lambda *_: None)
        outputs.append(tmp_path / attempt / "smoke")
    comparisons = reproduce.compare_results(*outputs, rtol=0.0)
    compared = [c for c in comparisons if c.status != "not repeatable"]
    assert compared and all(c.status == "identical" for c in compared), reproduce.report(comparisons)
