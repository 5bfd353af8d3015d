"""The whole smoke profile through papermill, and the book rendered from it, checked as a reader would."""

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from heart_lib import book, config, runner


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """Run every smoke notebook into a private results folder and build the book from it."""
    root = tmp_path_factory.mktemp("smoke")
    env = {"HEART_RESULTS": str(root / "results")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        outcomes = runner.run_profile("smoke", jobs=2, log=lambda *_: None)
        html = book.build("smoke", force=True, out=root / "html", log=lambda *_: None)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return outcomes, html


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for attr in ("src", "href"):
            if attrs.get(attr) and tag in {"img", "a", "script", "link"}:
                self.refs.append((tag, attrs[attr]))


def test_every_smoke_notebook_executes(smoke_book):
    outcomes, _ = smoke_book
    assert [o.notebook for o in outcomes] == config.profile_notebooks("smoke")
    assert all(o.status == "executed" for o in outcomes)


def test_executed_notebooks_print_no_warnings(smoke_book):
    """Executed notebooks are book pages: a warning or traceback on stderr would be shown to readers."""
    import nbformat

    outcomes, _ = smoke_book
    for outcome in outcomes:
        nb = nbformat.read(outcome.path, as_version=4)
        for index, cell in enumerate(nb.cells):
            for output in cell.get("outputs", []):
                assert output.get("name") != "stderr", f"{outcome.notebook} cell {index}: {output.get('text', '')[:300]}"


def test_every_chapter_page_exists(smoke_book):
    _, html = smoke_book
    for page in ("index.html", "intro.html", "method.html", "rerun.html", "course.html", "references.html"):
        assert (html / page).is_file(), page
    for name in config.NOTEBOOK_ORDER:
        assert (html / "_staged" / f"{name}.html").is_file(), name


def test_every_image_and_internal_link_resolves(smoke_book):
    _, html = smoke_book
    broken, external_scripts, images = [], [], 0
    for page in html.rglob("*.html"):
        if "_static" in page.relative_to(html).parts:
            continue  # theme templates copied verbatim, not pages
        parser = _Links()
        parser.feed(page.read_text(errors="replace"))
        for tag, ref in parser.refs:
            url = urlparse(ref)
            if url.scheme in {"http", "https"}:
                if tag in {"script", "link", "img"}:
                    external_scripts.append(f"{page.name}: {ref}")
                continue
            if url.scheme or not url.path:
                continue  # mailto:, data:, javascript:, or a same-page anchor
            images += tag == "img"
            if not (page.parent / unquote(url.path)).resolve().exists():
                broken.append(f"{page.relative_to(html)} -> {ref}")
    assert not broken, broken[:20]
    assert not external_scripts, external_scripts[:20]  # the book must work offline
    assert images > 0


def test_notebook_figures_are_embedded(smoke_book):
    _, html = smoke_book
    page = (html / "_staged" / "baseline.html").read_text()
    assert re.search(r'<img[^>]+src="[^"]+\.png"', page)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _headless(args: list[str], timeout: int = 90) -> subprocess.CompletedProcess:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed on CI (make browser installs it)")
        pytest.skip("chromium not installed (make browser)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             "--virtual-time-budget=5000"]
    return subprocess.run(["timeout", str(timeout), browser, *flags, *args], capture_output=True, text=True)


@pytest.mark.browser
@pytest.mark.parametrize("page", ["intro.html", "_staged/baseline.html"])
def test_headless_chromium_renders_pages(smoke_book, tmp_path, page):
    _, html = smoke_book
    shot = tmp_path / "page.png"
    done = _headless([f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                      "--window-size=1280,1600", (html / page).as_uri()])
    assert shot.is_file(), done.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("L").getextrema()
    assert image.size == (1280, 1600) and colours[1] - colours[0] > 100  # not a blank page


@pytest.mark.browser
def test_local_mathjax_typesets_the_method_chapter(smoke_book, tmp_path):
    _, html = smoke_book
    done = _headless([f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (html / "method.html").as_uri()])
    assert "mjx-container" in done.stdout, done.stderr[-2000:]  # MathJax ran, from the book's own copy
