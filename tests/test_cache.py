"""One cache rule: key = stage + parameters + digest of the heart_lib modules the stage depends on;
the runner's notebook keys follow the same rule, so an edit to an unrelated module re-runs nothing."""

from __future__ import annotations

import shutil

import pytest

from heart_lib import provenance, results, runner


def test_imports_are_found_lazy_relative_and_from_package():
    source = '''
import heart_lib.flops
from heart_lib import data, paths
from heart_lib.pruning.config import PruningConfig
import numpy

def later():
    from heart_lib import sensitivity  # lazy: still a dependency
    from . import budget
'''
    found = provenance.imported_modules(source, "heart_lib.experiments.pruning")
    # `from . import budget` names heart_lib.experiments (there is no heart_lib.experiments.budget)
    assert found == {"heart_lib.flops", "heart_lib", "heart_lib.data", "heart_lib.paths", "heart_lib.pruning.config",
                     "heart_lib.sensitivity", "heart_lib.experiments"}


def test_closure_follows_lazy_imports_and_stops_at_unrelated_modules():
    baseline = provenance.module_closure("heart_lib.experiments.baseline")
    assert "heart_lib.models" in baseline and "heart_lib.experiments" in baseline  # package __init__ too
    # display labels come from the catalogue, whose entries run the pruning maths lazily: that code
    # counts (conservatively); what the baseline never imports does not
    assert not {"heart_lib.flops", "heart_lib.measure", "heart_lib.finetune", "heart_lib.camphive"} & baseline
    # the pruned model imports the sensitivity engine inside a function only
    assert "heart_lib.sensitivity" in provenance.module_closure("heart_lib.pruning.model")
    with pytest.raises(ValueError, match="not heart_lib modules"):
        provenance.module_closure("heart_lib.nope")


def test_cache_key_reads_stage_params_and_code():
    key = results.cache_key("s", {"a": 1}, ("heart_lib.stats",))
    assert key == results.cache_key("s", {"a": 1}, ("heart_lib.stats",))
    assert key != results.cache_key("t", {"a": 1}, ("heart_lib.stats",))
    assert key != results.cache_key("s", {"a": 2}, ("heart_lib.stats",))
    assert key != results.cache_key("s", {"a": 1}, ("heart_lib.stats", "heart_lib.flops"))


def test_cache_folder_is_under_heart_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEART_CACHE", str(tmp_path))
    folder = results.cache_folder("stage", {"a": 1}, ("heart_lib.stats",))
    assert folder.is_dir() and folder.parent == tmp_path / "stage"


@pytest.fixture()
def library_copy(tmp_path, monkeypatch):
    """A copy of heart_lib whose files a test may edit; the digests read it instead."""
    copy = tmp_path / "heart_lib"
    shutil.copytree(provenance.LIBRARY_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "LIBRARY_DIR", copy)
    provenance.module_closure.cache_clear()
    yield copy
    provenance.module_closure.cache_clear()


def test_an_edit_reruns_only_the_chapters_that_depend_on_it(library_copy):
    before = {name: runner.notebook_key("smoke", name) for name in ("baseline", "pruning")}
    sweep = results.cache_key("pruning", {"x": 1}, ("heart_lib.experiments.pruning",))
    with open(library_copy / "flops.py", "a") as fh:
        fh.write("\n# an edit\n")
    provenance.module_closure.cache_clear()
    assert runner.notebook_key("smoke", "baseline") == before["baseline"]
    assert runner.notebook_key("smoke", "pruning") != before["pruning"]
    assert results.cache_key("pruning", {"x": 1}, ("heart_lib.experiments.pruning",)) != sweep


def test_package_versions_follow_what_the_code_imports(monkeypatch):
    """The code digest holds the installed versions of the packages the modules import (and what those
    require): a new torch changes it, a documentation package never enters it."""
    pins = provenance.package_versions(frozenset({"timm", "os"}))
    names = {p.split("==")[0] for p in pins}
    assert {"timm", "torch", "safetensors"} <= names  # timm and what it requires; os is the standard library
    assert not {"jupyter-book", "sphinx", "papermill"} & names
    before = provenance.code_digest("heart_lib.experiments.baseline")
    real = provenance.package_versions.__wrapped__

    def bumped(names):
        return tuple(p.replace("torch==", "torch==999.") for p in real(names))

    monkeypatch.setattr(provenance, "package_versions", bumped)
    assert provenance.code_digest("heart_lib.experiments.baseline") != before
