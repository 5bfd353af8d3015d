"""Execute a profile's notebooks with papermill, re-running only what changed.

A notebook's *key* is a digest of everything its output depends on: the notebook source, its
parameters, the source of the heart_lib modules its experiment module and its cells import
(transitively, `provenance.code_digest`; an edit to an unrelated module re-runs nothing) and the
installed versions of the packages that code imports (a documentation package added to the pins
re-runs nothing either; the claims summary also depends on the other notebooks' keys, since it
reads their results). An executed notebook is stored as `results/<profile>/<name>.ipynb` with its key and
the digests of the files it wrote in `results/<profile>/<name>/` in the metadata; it is re-executed
when the key changes or those files no longer match.

Nothing is half-written: each notebook writes into a staging copy of its chapter folder, swapped in
whole (with the executed notebook) only when it succeeds; a failure or a signal leaves the previous
results as they were. One run per results profile at a time (a lock on the profile's folder).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nbformat

from heart_lib import config
from heart_lib.data import sha256_file
from heart_lib.paths import PROJECT_ROOT, results_root
from heart_lib.provenance import code_digest, notebook_modules
from heart_lib.results import STAGE_FOR_ENV, STAGE_TO_ENV, ResultsNotWritable, file_mode, write_json

KERNEL = "python3"
STAGING = ".staging"  # inside results/<profile>/: chapter folders being rewritten


class NotebookFailed(RuntimeError):
    """A notebook raised during execution; the message names the notebook and the cell."""


@dataclass(frozen=True)
class Outcome:
    notebook: str
    status: str  # "executed" | "cached"
    seconds: float
    path: Path


def input_digest(profile: str, name: str) -> str:
    """Digest of the files a notebook reads besides its parameters.

    An experiment module may define `input_paths(params) -> list[Path]` (files or folders), e.g. the
    edge chapter reads the device measurements under results/devices/.
    """
    module = importlib.import_module(f"heart_lib.experiments.{name}")
    finder = getattr(module, "input_paths", None)
    if finder is None:
        return ""
    files: list[Path] = []
    for path in finder(config.load_params(profile, name)):
        path = Path(path)
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] * path.is_file()
    h = hashlib.sha256()
    for path in files:  # names relative to the project, so a clone elsewhere gets the same key
        name = path.resolve().relative_to(PROJECT_ROOT) if path.resolve().is_relative_to(PROJECT_ROOT) else path
        h.update(str(name).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def notebook_code(name: str) -> tuple[str, ...]:
    """heart_lib modules a notebook runs: its experiment module and what its code cells import."""
    cells = [cell.source for cell in nbformat.read(config.NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4).cells
             if cell.cell_type == "code"]
    return tuple(sorted({f"heart_lib.experiments.{name}", "heart_lib.config", *notebook_modules(cells)}))


def notebook_key(profile: str, name: str, upstream: tuple[str, ...] = ()) -> str:
    """Digest of what the executed notebook depends on."""
    h = hashlib.sha256()
    for part in (
        profile,
        name,
        (config.NOTEBOOKS_DIR / f"{name}.ipynb").read_bytes().decode(),
        json.dumps(config.raw_profile_params(profile, name), sort_keys=True),
        code_digest(*notebook_code(name)),  # with the versions of the packages that code imports
        input_digest(profile, name),
        *upstream,
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def stored_key(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return nbformat.read(path, as_version=4).metadata.get("heart", {}).get("key")
    except Exception:  # noqa: BLE001 - an unreadable notebook is simply not a valid cache entry
        return None


def pin_kernel() -> None:
    """Make kernel `python3` mean this interpreter, whatever kernelspecs the user has installed.

    Jupyter looks in JUPYTER_PATH before the user's and the system's folders, so a kernelspec
    placed there wins; without it a user-level `python3` spec could run another Python.
    """
    folder = Path(tempfile.gettempdir()) / f"heart-kernels-{os.getuid()}" / hashlib.sha256(
        sys.executable.encode()).hexdigest()[:12]
    spec = folder / "kernels" / KERNEL / "kernel.json"
    if not spec.is_file():
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (heart_lib)", "language": "python"}))
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if str(folder) not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([str(folder), *filter(None, paths)])


def profile_dir(profile: str) -> Path:
    return results_root() / profile


def outputs_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file a chapter wrote (relative names; hidden temporary files excluded)."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def is_up_to_date(profile: str, name: str, key: str) -> bool:
    """The stored notebook has this key and its chapter folder still holds what it recorded.

    Notebooks executed before outputs were recorded (no "outputs" entry) are judged by the key alone.
    """
    path = profile_dir(profile) / f"{name}.ipynb"
    meta = _stored_meta(path)
    if meta.get("key") != key:
        return False
    recorded = meta.get("outputs")
    return recorded is None or recorded == outputs_digest(profile_dir(profile) / name)


def _stored_meta(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return dict(nbformat.read(path, as_version=4).metadata.get("heart", {}))
    except Exception:  # noqa: BLE001 - an unreadable notebook is simply not a valid cache entry
        return {}


def _kernel_manager(env: dict[str, str]):
    """A kernel manager class whose kernels get `env` on top of ours (thread-safe: no os.environ)."""
    from jupyter_client.manager import AsyncKernelManager

    class StagedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            kw["env"] = {**os.environ, **kw.get("env", {}), **env}
            return await super().start_kernel(**kw)

    return StagedKernelManager


def execute(profile: str, name: str, key: str) -> Path:
    """Run one notebook through papermill; swap its notebook and chapter folder in whole on success."""
    import papermill

    pin_kernel()
    root = profile_dir(profile)
    final, target = root / name, root / f"{name}.ipynb"
    stage = root / STAGING / f"{name}.{uuid.uuid4().hex[:8]}"
    try:
        stage.mkdir(parents=True)
    except OSError as err:
        raise not_writable(root, err) from err
    try:
        folder, executed = stage / name, stage / f"{name}.ipynb"
        if final.is_dir():  # chapters may reuse what they computed before (pruning, sensitivity)
            shutil.copytree(final, folder, symlinks=True)
        parameters = {"profile": profile, **config.raw_profile_params(profile, name)}
        env = {STAGE_FOR_ENV: str(final.absolute()), STAGE_TO_ENV: str(folder.absolute()),
               "HEART_RESULTS": str(results_root().absolute())}  # the kernel runs in notebooks/
        try:
            papermill.execute_notebook(
                str(config.NOTEBOOKS_DIR / f"{name}.ipynb"), str(executed), parameters=parameters,
                kernel_name=KERNEL, cwd=str(config.NOTEBOOKS_DIR), progress_bar=False, log_output=False,
                kernel_manager_class=_kernel_manager(env),
            )
        except papermill.PapermillExecutionError as err:
            failed = root / f"{name}.failed.ipynb"
            if executed.exists():
                os.chmod(executed, file_mode())
                executed.replace(failed)
            raise NotebookFailed(
                f"notebook {name!r} (profile {profile!r}) failed in cell {err.exec_count}: "
                f"{err.ename}: {err.evalue}\n  executed copy for inspection: {failed}") from err
        nb = nbformat.read(executed, as_version=4)
        nb.metadata["heart"] = {"key": key, "profile": profile, "notebook": name,
                                "outputs": outputs_digest(folder)}
        nbformat.write(nb, executed)
        os.chmod(executed, file_mode())
        _swap_in(stage, final, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        with contextlib.suppress(OSError):  # still used by a notebook running beside this one
            stage.parent.rmdir()
    (root / f"{name}.failed.ipynb").unlink(missing_ok=True)
    return target


def _swap_in(stage: Path, final: Path, target: Path) -> None:
    """Replace the chapter folder, then the executed notebook (whose recorded digests tie the two)."""
    name = final.name
    if final.exists():
        os.rename(final, stage / ".previous")
    if (stage / name).exists():
        os.rename(stage / name, final)
    os.replace(stage / f"{name}.ipynb", target)


def not_writable(folder: Path, err: OSError) -> ResultsNotWritable:
    return ResultsNotWritable(
        f"cannot write results under {folder}: {err.strerror or err}; make the folder writable "
        "or set HEART_RESULTS to a writable folder")


def clean_leftovers(profile: str) -> None:
    """Remove what killed runs left (staging copies, temporary files); put back a folder caught mid-swap.

    Called with the profile's lock held, so nothing found here belongs to a live run.
    """
    root = profile_dir(profile)
    for stage in sorted((root / STAGING).glob("*")) if (root / STAGING).is_dir() else []:
        final = root / stage.name.split(".")[0]
        if (stage / ".previous").is_dir() and not final.exists():
            os.rename(stage / ".previous", final)
        shutil.rmtree(stage, ignore_errors=True)
    if (root / STAGING).is_dir():
        shutil.rmtree(root / STAGING, ignore_errors=True)
    for tmp in root.rglob(".*.tmp") if root.is_dir() else []:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def profile_lock(profile: str, log=print):
    """Hold the profile's lock (flock on its folder: no lock file, so a read-only folder works)."""
    root = profile_dir(profile)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise not_writable(root.parent, err) from err
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            log(f"[{profile}] another run of this profile is in progress; waiting for it to finish ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# Set when the run is being stopped (a signal); kernels started after it are killed too.
_stop = threading.Event()


def stop_kernels() -> None:
    """Kill every process this one started (the notebooks' kernels and what they started)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


def claims_key(profile: str, names: list[str]) -> str:
    """The claims summary reads the other chapters' results as they are on disk, so its key holds
    their *stored* keys: a summary made from a stale chapter goes stale when that chapter is
    re-executed (the keys the chapters ought to have would trust it wrongly)."""
    upstream = tuple(stored_key(profile_dir(profile) / f"{n}.ipynb") or "not executed"
                     for n in sorted(names) if n != "claims")
    return notebook_key(profile, "claims", upstream)


def run_profile(profile: str, jobs: int = 1, force: bool = False, only: list[str] | None = None,
                log=print) -> list[Outcome]:
    """Execute the profile's notebooks that are out of date; the claims summary runs last."""
    names = config.profile_notebooks(profile)
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise config.ConfigError(f"profile {profile!r} has no notebook(s) {unknown}; it has {names}")
    for name in names:  # validate every parameter before any compute
        config.load_params(profile, name)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    selected = [n for n in names if not only or n in only]
    first = [n for n in selected if n != "claims"]
    keys = {n: notebook_key(profile, n) for n in names if n != "claims"}
    if "claims" in names:
        keys["claims"] = claims_key(profile, names)
    if not force and all(is_up_to_date(profile, n, keys[n]) for n in selected):
        for name in selected:  # nothing to do: write nothing (a read-only checkout still works)
            log(f"[{profile}] {name}: up to date")
        return [Outcome(n, "cached", 0.0, profile_dir(profile) / f"{n}.ipynb") for n in selected]

    def one(name: str) -> Outcome:
        path = profile_dir(profile) / f"{name}.ipynb"
        if _stop.is_set():
            raise NotebookFailed(f"notebook {name!r} (profile {profile!r}) not started: the run was stopped")
        if not force and is_up_to_date(profile, name, keys[name]):
            log(f"[{profile}] {name}: up to date")
            return Outcome(name, "cached", 0.0, path)
        log(f"[{profile}] {name}: executing ...")
        start = time.perf_counter()
        execute(profile, name, keys[name])
        seconds = time.perf_counter() - start
        log(f"[{profile}] {name}: done in {seconds:.0f} s")
        return Outcome(name, "executed", seconds, path)

    with profile_lock(profile, log):
        clean_leftovers(profile)
        _stop.clear()
        pool = ThreadPoolExecutor(max_workers=jobs)
        futures: list[Future] = []
        try:  # notebooks run in worker threads; this thread only waits, so a signal lands here
            futures = [pool.submit(one, n) for n in first]
            outcomes = [f.result() for f in futures]
            if "claims" in selected:
                keys["claims"] = claims_key(profile, names)  # the chapters as they now are
                futures.append(pool.submit(one, "claims"))
                outcomes.append(futures[-1].result())
        except Exception:  # a notebook failed: the others still finish and are kept
            pool.shutdown(wait=True)
            raise
        except BaseException:  # a signal: stop everything now
            _stop.set()
            logging.getLogger("papermill").disabled = True  # "kernel died" is what we asked for
            for future in futures:
                future.cancel()
            while not all(f.done() for f in futures):  # kill kernels until every worker has given up
                stop_kernels()
                time.sleep(0.2)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        record_timings(profile, outcomes)
    return outcomes


def record_timings(profile: str, outcomes: list[Outcome]) -> None:
    """Keep the latest execution time of each notebook in results/<profile>/timings.json."""
    if not any(o.status == "executed" for o in outcomes):
        return  # nothing ran: leave the file (and a read-only checkout) alone
    path = profile_dir(profile) / "timings.json"
    try:
        timings = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        timings = {}
    for outcome in outcomes:
        if outcome.status == "executed":
            timings[outcome.notebook] = round(outcome.seconds, 1)
    write_json(path, timings)
