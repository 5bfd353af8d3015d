"""The install verbs on a scratch copy of the Makefile, with fake interpreters and npm (issue 16)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from heart_lib.paths import PROJECT_ROOT

FAKE_PYTHON = """#!/bin/bash
# A stand-in interpreter: version {version}; `-m venv DIR` makes DIR/bin/python a copy of this one.
case "$1" in
  --version) echo "Python {version}";;
  -c) [[ "{version}" == 3.1[1-9]* ]];;
  -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi;;
esac
"""


@pytest.fixture
def scratch(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "requirements.txt", "pyproject.toml"):
        shutil.copy(PROJECT_ROOT / name, tmp_path / name)
    return tmp_path


def _python(folder: Path, version: str) -> Path:
    path = folder / f"python{version}"
    path.write_text(FAKE_PYTHON.format(version=version))
    path.chmod(0o755)
    return path


def _make(scratch: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    return subprocess.run(["make", "-C", str(scratch), *args], capture_output=True, text=True, timeout=120, env=env)


def test_old_python_is_refused_before_a_venv_is_made(scratch, tmp_path):
    done = _make(scratch, "env", f"PYTHON={_python(tmp_path, '3.10.12')}")
    assert done.returncode != 0
    assert "needs Python 3.11 or newer" in done.stderr and "3.10.12" in done.stderr
    assert not (scratch / ".venv").exists()


def test_a_broken_venv_does_not_block_the_next_attempt(scratch, tmp_path):
    broken = scratch / ".venv" / "bin" / "python"
    broken.parent.mkdir(parents=True)
    shutil.copy(_python(tmp_path, "3.10.12"), broken)  # left by an attempt with the wrong Python
    done = _make(scratch, "env", f"PYTHON={_python(tmp_path, '3.11.7')}")
    assert done.returncode == 0, done.stderr
    assert "replacing the unusable .venv" in done.stdout
    assert (scratch / ".venv" / ".installed").is_file()
    assert "3.11.7" in subprocess.run([broken, "--version"], capture_output=True, text=True).stdout


def test_mathjax_failure_shows_npm_reason(scratch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/bash\necho 'npm error code ENOTFOUND' >&2\n"
                   "echo 'npm error network request to https://registry.npmjs.org/mathjax failed' >&2\nexit 1\n")
    npm.chmod(0o755)
    done = _make(scratch, "mathjax", path=f"{bin_dir}:{os.environ['PATH']}")
    assert done.returncode != 0
    assert "npm could not install mathjax@3" in done.stderr and "ENOTFOUND" in done.stderr
