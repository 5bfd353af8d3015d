"""The papermill runner: execution, caching by content, validation first, failures named."""

import shutil
import subprocess
import sys

import nbformat
import pytest
import yaml

from heart_lib import runner
from heart_lib.config import ConfigError
from heart_lib.paths import PROFILES_DIR


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Private results and a private copy of the smoke profile (as profile 'mine')."""
    profiles = tmp_path / "profiles"
    shutil.copytree(PROFILES_DIR / "smoke", profiles / "mine")
    monkeypatch.setenv("HEART_PROFILES", str(profiles))
    monkeypatch.setenv("HEART_RESULTS", str(tmp_path / "results"))
    return tmp_path


def _set(sandbox, notebook, **values):
    path = sandbox / "profiles" / "mine" / f"{notebook}.yaml"
    params = yaml.safe_load(path.read_text())
    params.update(values)
    path.write_text(yaml.safe_dump(params))


def test_executes_then_caches_then_reruns_on_change(sandbox):
    first = runner.run_profile("mine", only=["baseline"], log=lambda *_: None)
    assert [o.status for o in first] == ["executed"]
    executed = sandbox / "results" / "mine" / "baseline.ipynb"
    nb = nbformat.read(executed, as_version=4)
    assert nb.metadata["heart"]["key"] == runner.notebook_key("mine", "baseline")
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))
    assert (sandbox / "results" / "mine" / "baseline" / "per_image.csv").is_file()

    again = runner.run_profile("mine", only=["baseline"], log=lambda *_: None)
    assert [o.status for o in again] == ["cached"]

    _set(sandbox, "baseline", limit=16)
    third = runner.run_profile("mine", only=["baseline"], log=lambda *_: None)
    assert [o.status for o in third] == ["executed"]
    lines = (sandbox / "results" / "mine" / "baseline" / "per_image.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 16


def test_invalid_parameter_stops_before_any_compute(sandbox):
    _set(sandbox, "baseline", batch_size=-1)
    with pytest.raises(ConfigError, match="baseline.*batch_size"):
        runner.run_profile("mine", log=lambda *_: None)
    assert not (sandbox / "results" / "mine").exists()


def test_failing_cell_is_named_and_previous_result_kept(sandbox, monkeypatch):
    runner.run_profile("mine", only=["baseline"], log=lambda *_: None)
    good = (sandbox / "results" / "mine" / "baseline.ipynb").read_bytes()
    monkeypatch.delenv("HEART_IMAGENET_VAL", raising=False)
    _set(sandbox, "baseline", dataset="imagenet-val")
    with pytest.raises(runner.NotebookFailed, match=r"'baseline'.*cell \d+.*DataError.*HEART_IMAGENET_VAL"):
        runner.run_profile("mine", only=["baseline"], log=lambda *_: None)
    assert (sandbox / "results" / "mine" / "baseline.ipynb").read_bytes() == good
    assert (sandbox / "results" / "mine" / "baseline.failed.ipynb").is_file()
    leftovers = [p.name for p in (sandbox / "results" / "mine").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_cli_reports_a_bad_profile_with_exit_code_2():
    done = subprocess.run([sys.executable, "-m", "heart_lib", "run", "--profile", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown profile 'nope'" in done.stderr and "default" in done.stderr


def test_claims_key_follows_the_chapters_as_they_are(monkeypatch):
    """The claims summary is keyed by the stored keys of the chapters it reads: re-executing a stale
    chapter makes the summary stale too."""
    stored = {"baseline": "a", "sensitivity": "b"}
    monkeypatch.setattr(runner, "stored_key", lambda path: stored.get(path.stem))
    names = ["baseline", "sensitivity", "claims"]
    before = runner.claims_key("smoke", names)
    stored["sensitivity"] = "c"  # that chapter was re-executed
    assert runner.claims_key("smoke", names) != before
    stored["sensitivity"] = "b"
    assert runner.claims_key("smoke", names) == before
