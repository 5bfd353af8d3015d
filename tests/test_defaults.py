"""One source of defaults: `Params`. Notebook parameters cells and profiles agree with it; a direct
papermill run writes to the scratch profile and a misspelt `-p` or `-f` name fails."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys

import nbformat
import pytest

from heart_lib import config, runner
from heart_lib.paths import PROFILES_DIR, PROJECT_ROOT


def _parameters_cell(name: str) -> str:
    nb = nbformat.read(config.NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged parameters"
    return cells[0].source


@pytest.mark.parametrize("name", config.NOTEBOOK_ORDER)
def test_parameters_cell_is_params(name):
    source = _parameters_cell(name)
    assert source == config.parameters_cell(name), f"{name}: regenerate the cell from Params (config.parameters_cell)"
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body}
    fields = dataclasses.fields(config.params_class(name))
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory() for f in fields}
    assert values == {"profile": config.SCRATCH_PROFILE, **defaults}


@pytest.mark.parametrize("profile", config.available_profiles())
def test_every_profile_key_is_a_parameter(profile):
    for name in config.profile_notebooks(profile):
        fields = {f.name for f in dataclasses.fields(config.params_class(name))}
        unknown = set(config.raw_profile_params(profile, name)) - fields
        assert not unknown, f"profile {profile}, notebook {name}: {sorted(unknown)} are not Params fields"


def test_stray_injected_values_are_unknown_parameters():
    namespace = {"profile": "scratch", "limit": 8, "limt": 8, "In": [""], "Out": {}, "_i1": "x", "config": config}
    with pytest.raises(config.ConfigError, match=r"baseline: unknown parameter\(s\) \['limt'\]"):
        config.notebook_params("baseline", namespace)
    del namespace["limt"]
    assert config.notebook_params("baseline", namespace).limit == 8


def _papermill(tmp_path, *args: str) -> subprocess.CompletedProcess:
    runner.pin_kernel()  # kernel python3 = this interpreter
    env = {**os.environ, "HEART_RESULTS": str(tmp_path / "results"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    smoke = PROFILES_DIR / "smoke" / "baseline.yaml"  # a random tiny model: seconds
    command = [sys.executable, "-m", "papermill", str(config.NOTEBOOKS_DIR / "baseline.ipynb"),
               str(tmp_path / "out.ipynb"), "-f", str(smoke), "--cwd", str(config.NOTEBOOKS_DIR), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_direct_papermill_writes_scratch_and_rejects_misspelt_names(tmp_path):
    done = _papermill(tmp_path, "-p", "limit", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "results" / "scratch" / "baseline" / "summary.json").is_file()
    assert not (tmp_path / "results" / "default").exists()
    failed = _papermill(tmp_path, "-p", "limt", "4")
    assert failed.returncode != 0
    assert "unknown parameter(s) ['limt']" in failed.stderr + failed.stdout


def test_direct_papermill_rejects_a_misspelt_name_in_a_parameters_file(tmp_path):
    import yaml

    values = yaml.safe_load((PROFILES_DIR / "smoke" / "baseline.yaml").read_text())
    values["limt"] = values.pop("limit")  # the typo a user makes in their own -f file
    bad = tmp_path / "mine.yaml"
    bad.write_text(yaml.safe_dump(values))
    failed = _papermill(tmp_path, "-f", str(bad))
    assert failed.returncode != 0
    assert "unknown parameter(s) ['limt']" in failed.stderr + failed.stdout
    assert not (tmp_path / "results" / "scratch" / "baseline" / "summary.json").exists()
