"""Execute a profile's notebooks with papermill, re-running only what changed.

A notebook's *key* is a digest of everything its output depends on: the notebook source, its
parameters, the source of the heart_lib modules its experiment module and its cells import
(transitively, `provenance.code_digest`; an edit to an unrelated module re-runs nothing) and the
pinned packages (the claims summary also depends on the other notebooks' keys, since it reads
their results). An executed notebook is stored as
`results/<profile>/<name>.ipynb` with its key in the metadata; it is re-executed only when the key
changes. Each executed notebook is written atomically, so an interrupted run resumes where it left off.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nbformat

from heart_lib import config
from heart_lib.paths import PROJECT_ROOT
from heart_lib.provenance import code_digest, notebook_modules, requirements_digest
from heart_lib.results import atomic_path, results_dir, write_json

KERNEL = "python3"


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
        code_digest(*notebook_code(name)),
        requirements_digest(),
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


def execute(profile: str, name: str, key: str) -> Path:
    """Run one notebook through papermill into results/<profile>/<name>.ipynb (atomically)."""
    import papermill

    pin_kernel()
    target = results_dir(profile) / f"{name}.ipynb"
    parameters = {"profile": profile, **config.raw_profile_params(profile, name)}
    with atomic_path(target) as tmp:
        tmp_nb = tmp.with_suffix(".ipynb")
        try:
            papermill.execute_notebook(
                str(config.NOTEBOOKS_DIR / f"{name}.ipynb"), str(tmp_nb), parameters=parameters,
                kernel_name=KERNEL, cwd=str(config.NOTEBOOKS_DIR), progress_bar=False, log_output=False,
            )
        except papermill.PapermillExecutionError as err:
            failed = results_dir(profile) / f"{name}.failed.ipynb"
            if tmp_nb.exists():
                tmp_nb.replace(failed)
            raise NotebookFailed(
                f"notebook {name!r} (profile {profile!r}) failed in cell {err.exec_count}: "
                f"{err.ename}: {err.evalue}\n  executed copy for inspection: {failed}") from err
        nb = nbformat.read(tmp_nb, as_version=4)
        nb.metadata["heart"] = {"key": key, "profile": profile, "notebook": name}
        nbformat.write(nb, tmp)
        tmp_nb.unlink(missing_ok=True)
    (results_dir(profile) / f"{name}.failed.ipynb").unlink(missing_ok=True)
    return target


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
        keys["claims"] = notebook_key(profile, "claims", tuple(keys[n] for n in sorted(keys)))

    def one(name: str) -> Outcome:
        path = results_dir(profile) / f"{name}.ipynb"
        if not force and stored_key(path) == keys[name]:
            log(f"[{profile}] {name}: up to date")
            return Outcome(name, "cached", 0.0, path)
        log(f"[{profile}] {name}: executing ...")
        start = time.perf_counter()
        execute(profile, name, keys[name])
        seconds = time.perf_counter() - start
        log(f"[{profile}] {name}: done in {seconds:.0f} s")
        return Outcome(name, "executed", seconds, path)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes = list(pool.map(one, first))
    if "claims" in selected:
        outcomes.append(one("claims"))
    record_timings(profile, outcomes)
    return outcomes


def record_timings(profile: str, outcomes: list[Outcome]) -> None:
    """Keep the latest execution time of each notebook in results/<profile>/timings.json."""
    path = results_dir(profile) / "timings.json"
    try:
        timings = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        timings = {}
    for outcome in outcomes:
        if outcome.status == "executed":
            timings[outcome.notebook] = round(outcome.seconds, 1)
    write_json(path, timings)
