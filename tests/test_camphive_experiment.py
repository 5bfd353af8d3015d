"""The CAMP-HiVe chapter: parameters, comparisons and claim verdicts computed from hand-made result files."""

import ast
import dataclasses

import nbformat
import numpy as np
import pandas as pd
import pytest

from heart_lib import config, results
from heart_lib.experiments import camphive, claims


def _write(folder, eigvec_correct: int, magnitude_correct: int, n: int = 400, verdicts: bool = True):
    """Results of one CIFAR part at 50 % sparsity: eigvec and magnitude get the given number right."""
    out = folder / "camphive"
    rows, correct = [], {}
    for score, rule, hits in (("none", "none", n - 10), ("eigvec", "merge", eigvec_correct),
                              ("eigvec", "zero", eigvec_correct - 40), ("magnitude", "merge", magnitude_correct)):
        sparsity = 0.0 if score == "none" else 0.5
        rows.append({"part": "cifar", "model": "resnet20", "score": score, "rule": rule, "sparsity": sparsity,
                     "stage": "pruned", "top1": hits / n, "top1_lo": 0, "top1_hi": 1, "loss": 1.0,
                     "achieved_sparsity": sparsity, "dense_macs": 10, "sparse_macs": 5, "images": n})
        correct[camphive.config_id("cifar", score, rule, sparsity, "pruned")] = np.arange(n) < hits
    results.write_table(out / "accuracy.csv", pd.DataFrame(rows))
    results.write_table(out / "curvature.csv", pd.DataFrame([{
        "part": "cifar", "model": "resnet20", "train_images": 1000, "train_epochs": 2, "dataset": "cifar10 test"}]))
    np.savez(out / "correct.npz", **correct)
    results.write_json(out / "summary.json", {"verdicts": verdicts, "split": "per_tensor"})
    return folder


def test_claims_follow_the_paired_intervals(tmp_path):
    better = _write(tmp_path / "a", eigvec_correct=300, magnitude_correct=200)
    assert camphive.claim_ch1(better, claims.Params()).verdict == "reproduced"
    assert camphive.claim_ch2(better, claims.Params()).verdict == "reproduced"  # merge beats zero by 40 images
    worse = _write(tmp_path / "b", eigvec_correct=200, magnitude_correct=300)
    assert camphive.claim_ch1(worse, claims.Params()).verdict == "not reproduced"
    close = _write(tmp_path / "c", eigvec_correct=300, magnitude_correct=299)
    assert camphive.claim_ch1(close, claims.Params()).verdict == "inconclusive"
    # CH3: 90 points below the unpruned model at 50 % sparsity: accuracy not kept
    assert camphive.claim_ch3(worse, claims.Params()).verdict == "not reproduced"


def test_smoke_results_give_no_verdict_and_missing_results_say_which_file(tmp_path):
    smoke = _write(tmp_path / "s", eigvec_correct=300, magnitude_correct=200, verdicts=False)
    row = camphive.claim_ch1(smoke, claims.Params())
    assert row.verdict == "not testable here" and "smoke" in row.ours
    assert "accuracy.csv" in camphive.claim_ch2(tmp_path / "none", claims.Params()).ours


def test_the_claims_summary_lists_the_camphive_rows():
    assert {f.__name__ for f in camphive.CLAIMS} <= {f.__name__ for f in claims.CLAIMS}


@pytest.mark.parametrize("values, message", [
    ({"cifar_sparsities": [0.5, 1.0]}, "cifar_sparsities.*must be in \\(0, 1\\)"),
    ({"vit_scores": ["eigvec", "taylor"]}, "vit_scores.*unknown \\['taylor'\\]"),
    ({"cifar_scores": ["magnitude"]}, "must include 'eigvec'"),
    ({"split": "layerwise"}, "'split' = 'layerwise'"),
    ({"cifar_model": "resnet18"}, "'cifar_model' = 'resnet18'"),
])
def test_bad_parameters_are_named(values, message):
    with pytest.raises(config.ConfigError, match=message):
        config.validate("camphive", values)


def test_notebook_defaults_are_the_params_defaults():
    nb = nbformat.read(config.NOTEBOOKS_DIR / "camphive.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}
    defaults = camphive.Params()
    assert {k: v for k, v in values.items() if k != "profile"} == {
        f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
