"""The runner under faults: killed, failed, signalled, concurrent and read-only runs (issue 16).

Each test drives `python -m heart_lib run` as a user would (a subprocess, real signals, real files)
on a private copy of the smoke profile.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from heart_lib import runner
from heart_lib.paths import PROFILES_DIR

# A baseline that takes about a minute: long enough to be caught mid-notebook.
SLOW = {"limit": 4000, "batch_size": 50, "model_kwargs": {"img_size": 64, "patch_size": 8, "depth": 12}}


@pytest.fixture
def profile(tmp_path, monkeypatch):
    """Private results and a private copy of the smoke profile (as profile 'mine')."""
    shutil.copytree(PROFILES_DIR / "smoke", tmp_path / "profiles" / "mine")
    monkeypatch.setenv("HEART_PROFILES", str(tmp_path / "profiles"))
    monkeypatch.setenv("HEART_RESULTS", str(tmp_path / "results"))
    return tmp_path


def _set(root: Path, notebook: str, **values) -> None:
    path = root / "profiles" / "mine" / f"{notebook}.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **values}))


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under `folder` with its content and inode: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "heart_lib", "run", "--profile", "mine", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_kernel(proc: subprocess.Popen, timeout: float = 120) -> list[psutil.Process]:
    """The kernel processes of `proc`, once one is running a notebook."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kernels = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "ipykernel" in " ".join(c.cmdline())]
        if kernels:
            time.sleep(3)  # past the kernel's start-up, into the notebook's cells
            return kernels
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("no kernel started")


@pytest.fixture(scope="module")
def executed_once(tmp_path_factory):
    """The smoke baseline executed once as profile 'mine' (copied by each test that needs it)."""
    root = tmp_path_factory.mktemp("executed")
    shutil.copytree(PROFILES_DIR / "smoke", root / "profiles" / "mine")
    saved = {k: os.environ.get(k) for k in ("HEART_PROFILES", "HEART_RESULTS")}
    os.environ.update(HEART_PROFILES=str(root / "profiles"), HEART_RESULTS=str(root / "results"))
    try:
        runner.run_profile("mine", only=["baseline"], log=lambda *_: None)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return root / "results" / "mine"


@pytest.fixture
def baseline_done(profile, executed_once):
    """Profile 'mine' with its baseline chapter executed (the results a later run must keep)."""
    shutil.copytree(executed_once, profile / "results" / "mine", symlinks=True)
    assert runner.is_up_to_date("mine", "baseline", runner.notebook_key("mine", "baseline"))
    return profile / "results" / "mine"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_the_kernel_within_seconds_and_keeps_the_old_results(baseline_done, signum, code):
    before = _snapshot(baseline_done)
    _set(baseline_done.parents[1], "baseline", **SLOW)
    proc = _start("--only", "baseline")
    kernels = _wait_for_kernel(proc)
    assert (baseline_done / runner.STAGING).is_dir()  # the new results go to a staging copy
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 15, "the run went on after the signal"
    assert proc.returncode == code
    lines = [line for line in err.strip().splitlines() if not line.startswith("[IPKernelApp]")]  # at start
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0] and "Traceback" not in err
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kernels)
    assert _snapshot(baseline_done) == before  # nothing half-written, no staging left, no timings


def test_killed_run_leaves_results_whole_and_its_leftovers_are_removed_later(baseline_done):
    before = _snapshot(baseline_done)
    root = baseline_done.parents[1]
    _set(root, "baseline", **SLOW)
    proc = _start("--only", "baseline")
    kernels = _wait_for_kernel(proc)
    proc.kill()
    for kernel in kernels:
        with contextlib.suppress(psutil.Error):
            kernel.kill()
    proc.communicate()
    assert {k: v for k, v in _snapshot(baseline_done).items() if not k.startswith(runner.STAGING)} == before
    assert (baseline_done / runner.STAGING).is_dir()  # what the killed run left ...
    # ... and temporary files of interrupted atomic writes (heart_lib.results.atomic_path names them
    # .<name>.<random>.tmp), one outside any chapter folder and one inside the chapter.
    planted = [baseline_done / ".timings.json.k1ll3d.tmp", baseline_done / "baseline" / ".per_image.csv.k1ll3d.tmp"]
    for leftover in planted:
        leftover.write_text("half-written")

    _set(root, "baseline", limit=16, model_kwargs={"img_size": 32, "patch_size": 8, "depth": 4})
    done = subprocess.run([sys.executable, "-m", "heart_lib", "run", "--profile", "mine", "--only", "baseline"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (baseline_done / runner.STAGING).exists()  # ... is removed by the next run
    assert not list(baseline_done.rglob(".*.tmp"))
    assert not any(leftover.exists() for leftover in planted)
    assert len((baseline_done / "baseline" / "per_image.csv").read_text().splitlines()) == 1 + 16


def test_a_chapter_folder_changed_after_its_run_is_not_trusted(baseline_done):
    key = runner.notebook_key("mine", "baseline")
    assert runner.is_up_to_date("mine", "baseline", key)
    table = baseline_done / "baseline" / "per_image.csv"
    table.write_text(table.read_text().replace(",", ";", 1))  # e.g. left half-rewritten by a killed run
    assert not runner.is_up_to_date("mine", "baseline", key)
    outcomes = runner.run_profile("mine", only=["baseline"], log=lambda *_: None)
    assert [o.status for o in outcomes] == ["executed"]
    assert runner.is_up_to_date("mine", "baseline", key)


def test_a_failed_run_keeps_every_file_of_the_previous_results(baseline_done, monkeypatch):
    before = _snapshot(baseline_done)
    monkeypatch.delenv("HEART_IMAGENET_VAL", raising=False)
    _set(baseline_done.parents[1], "baseline", dataset="imagenet-val")
    done = subprocess.run([sys.executable, "-m", "heart_lib", "run", "--profile", "mine", "--only", "baseline"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "cell" in done.stderr and "Traceback" not in done.stderr
    after = _snapshot(baseline_done)
    assert after.pop("baseline.failed.ipynb") and after == before


def test_second_run_of_a_profile_waits_for_the_first(profile):
    with runner.profile_lock("mine", log=lambda *_: None):  # a run in progress
        proc = _start("--only", "baseline")
        line = proc.stdout.readline()
        assert "another run of this profile is in progress" in line
        time.sleep(2)
        assert not (profile / "results" / "mine" / runner.STAGING).exists()  # it has not started
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "1 executed" in out


def test_up_to_date_run_writes_nothing(baseline_done):
    before = _snapshot(baseline_done)
    done = subprocess.run([sys.executable, "-m", "heart_lib", "run", "--profile", "mine", "--only", "baseline"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "0 executed, 1 up to date" in done.stdout, done.stderr
    assert _snapshot(baseline_done) == before


@contextlib.contextmanager
def _read_only(folder: Path):
    """Make `folder` read-only for this process: chmod, or (as root, whom chmod does not stop) a
    read-only tmpfs mounted over a copy of it; skip when neither works."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    copy = folder.with_name(folder.name + ".copy")
    shutil.copytree(folder, copy, symlinks=True)
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root and cannot mount a read-only tmpfs: no way to make a folder read-only")
    try:
        shutil.copytree(copy, folder, symlinks=True, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_results_give_one_line_and_up_to_date_runs_still_work(baseline_done):
    with _read_only(baseline_done):
        ok = subprocess.run([sys.executable, "-m", "heart_lib", "run", "--profile", "mine", "--only", "baseline"],
                            capture_output=True, text=True, timeout=300)
        assert ok.returncode == 0 and "1 up to date" in ok.stdout, ok.stderr
        forced = subprocess.run([sys.executable, "-m", "heart_lib", "run", "--profile", "mine", "--only",
                                 "baseline", "--force"], capture_output=True, text=True, timeout=300)
    assert forced.returncode == 1, forced.stderr
    lines = forced.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write results" in lines[0] and "HEART_RESULTS" in lines[0], forced.stderr


def test_results_honour_the_umask(tmp_path):
    from heart_lib import results

    old = os.umask(0o022)
    try:
        path = results.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
