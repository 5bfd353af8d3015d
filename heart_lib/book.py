"""Render the Jupyter Book from a profile's executed notebooks (no re-execution).

The book's sources (`book/`) are copied into a build folder, the profile's executed notebooks are
staged into it as `_staged/<name>.ipynb` (a chapter whose notebook has not been run gets a notebook
page saying so, so links to it still resolve), MathJax is served from the local npm copy, the
repository button links to the repository the book was built from (`HEART_REPOSITORY_URL`, else
the git remote `origin`, when there is one), and Jupyter Book builds strictly (warnings are errors).
The build is skipped when none of its inputs changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from heart_lib import config
from heart_lib.paths import PROJECT_ROOT, results_root

BOOK_DIR = PROJECT_ROOT / "book"
BUILD_DIR = PROJECT_ROOT / "build"
MATHJAX_DIR = BUILD_DIR / "npm" / "node_modules" / "mathjax" / "es5"
MATHJAX_FILES = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions")


class BookError(RuntimeError):
    """The book could not be built; the message says why."""


def html_dir(profile: str) -> Path:
    """Where the rendered HTML of a profile goes (`book/_build/html` for the default profile)."""
    return BOOK_DIR / "_build" / "html" if profile == "default" else BUILD_DIR / f"book-{profile}" / "html"


def _book_sources() -> list[Path]:
    return sorted(p for p in BOOK_DIR.rglob("*") if p.is_file() and "_build" not in p.relative_to(BOOK_DIR).parts)


def _inputs_digest(profile: str) -> str:
    h = hashlib.sha256(profile.encode() + str(repository_url()).encode())
    for path in _book_sources() + sorted(results_root().joinpath(profile).glob("*.ipynb")):
        h.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


PARAMETER_TAGS = ("parameters", "injected-parameters")


def without_parameter_cells(notebook: dict) -> dict:
    """The executed notebook with its defaults cell and papermill's injected cell hidden from the page:
    each chapter ends with a generated table of its parameters instead."""
    for cell in notebook.get("cells", []):
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if any(t in tags for t in PARAMETER_TAGS) and "remove-cell" not in tags:
            tags.append("remove-cell")
    return notebook


def repository_url() -> str | None:
    """The web address of the repository: HEART_REPOSITORY_URL, else git's `origin` remote made an
    https address (git@host:owner/name.git -> https://host/owner/name); None when there is neither."""
    url = os.environ.get("HEART_REPOSITORY_URL", "").strip()
    if not url:
        try:
            done = subprocess.run(["git", "-C", str(PROJECT_ROOT), "remote", "get-url", "origin"],
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        url = done.stdout.strip() if done.returncode == 0 else ""
    url = re.sub(r"^git@([^:]+):", r"https://\1/", url)
    url = re.sub(r"\.git$", "", url)
    return url if url.startswith(("https://", "http://")) else None


def _placeholder(name: str, profile: str) -> dict:
    """A one-cell notebook for a chapter that has not been executed (links to `<name>.ipynb` resolve)."""
    text = (f"# {name.capitalize()}\n\nThis chapter has not been executed for the `{profile}` profile yet. "
            f"Run `python -m heart_lib run --profile {profile}` (or `make book`) to compute it.")
    return {"cells": [{"cell_type": "markdown", "metadata": {}, "source": text}], "metadata": {},
            "nbformat": 4, "nbformat_minor": 5}


def _link_repository(source: Path) -> None:
    """Turn the repository button on in the staged configuration when the address is known."""
    import yaml

    url = repository_url()
    if url is None:
        return
    path = source / "_config.yml"
    settings = yaml.safe_load(path.read_text())
    settings.setdefault("repository", {})["url"] = url
    settings.setdefault("html", {})["use_repository_button"] = True
    path.write_text(yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))


def stage(profile: str, source: Path) -> None:
    """Copy the book sources and the profile's executed notebooks into `source`."""
    if source.exists():
        shutil.rmtree(source)
    shutil.copytree(BOOK_DIR, source, ignore=shutil.ignore_patterns("_build"))
    staged = source / "_staged"
    staged.mkdir()
    for name in config.NOTEBOOK_ORDER:
        executed = results_root() / profile / f"{name}.ipynb"
        if executed.is_file():
            (staged / f"{name}.ipynb").write_text(json.dumps(without_parameter_cells(json.loads(executed.read_text()))))
        else:
            (staged / f"{name}.ipynb").write_text(json.dumps(_placeholder(name, profile)))
    _link_repository(source)
    if not (MATHJAX_DIR / "tex-chtml.js").is_file():
        raise BookError(f"local MathJax not found at {MATHJAX_DIR}; run `make mathjax` (npm install mathjax@3)")
    # Only what tex-chtml needs at run time: the component, its fonts and the TeX extensions it
    # may autoload. Served as an extra path (not _static, whose every .js Jupyter Book would load).
    target = source / "_mathjax" / "mathjax"
    for part in MATHJAX_FILES:
        copy = shutil.copytree if (MATHJAX_DIR / part).is_dir() else shutil.copy2
        (target / part).parent.mkdir(parents=True, exist_ok=True)
        copy(MATHJAX_DIR / part, target / part)


def build(profile: str = "default", force: bool = False, out: Path | None = None, log=print) -> Path:
    """Build the book for `profile` into `out` (default: html_dir(profile)); returns the HTML folder."""
    if profile not in config.available_profiles():
        raise config.ConfigError(f"unknown profile {profile!r}; available: {config.available_profiles()}")
    out = Path(out) if out is not None else html_dir(profile)
    stamp = out / ".inputs-digest"
    digest = _inputs_digest(profile)
    if not force and stamp.is_file() and stamp.read_text() == digest and (out / "index.html").is_file():
        log(f"book ({profile}): up to date at {out}")
        return out
    work = out.parent / f".{out.name}-src"
    stage(profile, work)
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(work), "--warningiserror", "--keep-going",
           "--quiet", "--path-output", str(work)]
    log(f"book ({profile}): building ...")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BookError(f"jupyter-book build failed for profile {profile!r}:\n{done.stdout[-6000:]}\n"
                        f"{done.stderr[-6000:]}")
    built = work / "_build" / "html"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(built, tmp)
    (tmp / ".inputs-digest").write_text(digest)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    log(f"book ({profile}): {out / 'index.html'}")
    return out
