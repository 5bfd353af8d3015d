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
from heart_lib.paths import results_root


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


def test_the_landing_page_answers_first(smoke_book):
    """index.html opens the claims page: bottom line, verdict table, headline figure; smoke gives no verdicts."""
    _, html = smoke_book
    assert "_staged/claims.html" in (html / "index.html").read_text()
    page = (html / "_staged" / "claims.html").read_text()
    assert page.index("The bottom line") < page.index("<table") < page.index('id="fig-headline"')
    assert "no verdicts" in page
    for verdict in ("reproduced", "inconclusive", "not testable here"):
        assert f"<strong>{verdict}</strong>" not in page  # a plumbing profile assesses nothing


def test_every_chapter_ends_with_its_parameters(smoke_book):
    _, html = smoke_book
    for name in config.NOTEBOOK_ORDER:
        page = (html / "_staged" / f"{name}.html").read_text()
        assert "Parameters of this page" in page, name
        assert page.count('class="heart-table"') >= 1, name
        assert "profile = " not in page, f"{name}: a parameters cell is shown"


def test_exercises_have_unfolding_solutions(smoke_book):
    _, html = smoke_book
    page = (html / "course.html").read_text()
    assert page.count('class="exercise admonition"') >= 5
    assert page.count('class="solution dropdown admonition"') >= 3  # solutions fold
    assert page.count('class="dropdown admonition"') >= 3  # and so do the hints


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


# ------------------------------------------------------------------------------------ layout, in a browser

# Injected into a scratch copy of each page (the book itself carries nothing): records load errors,
# then after layout every table/figure/image that reaches past the content column without a scroll
# box of its own, and each image's load state, alt text and caption.
_CHECK = """<script>
window.__heartErrors = [];
window.addEventListener("error", e => window.__heartErrors.push(String(e.message || (e.target && (e.target.src || e.target.href)))), true);
window.addEventListener("load", () => setTimeout(() => {
  const column = document.querySelector("article.bd-article") || document.querySelector("main");
  const limit = column.getBoundingClientRect().right + 1;
  const box = el => { for (let a = el; a && a !== column; a = a.parentElement) {
      const o = getComputedStyle(a).overflowX; if (o === "auto" || o === "scroll" || o === "hidden") return a; } return el; };
  const overflow = [];
  for (const el of column.querySelectorAll("table, img, figure, pre")) {
    const right = box(el).getBoundingClientRect().right;
    if (right > limit) overflow.push(`${el.tagName.toLowerCase()}.${el.className} ends at ${Math.round(right)} px > ${Math.round(limit)} px`);
  }
  const images = [...column.querySelectorAll("img")].map(i => ({src: i.getAttribute("src"), loaded: i.complete && i.naturalWidth > 0,
      alt: i.getAttribute("alt") || "", caption: !!(i.closest("figure") && i.closest("figure").querySelector("figcaption"))}));
  const out = document.createElement("pre"); out.id = "heart-check";
  out.textContent = JSON.stringify({errors: window.__heartErrors, overflow, images});
  document.body.appendChild(out);
}, 300));
</script>"""


def _pages(html: Path) -> list[Path]:
    skip = {"genindex.html", "search.html", "index.html"}  # generated indexes; index.html only redirects
    return sorted(p for p in html.rglob("*.html") if p.name not in skip and not p.name.endswith(".check.html")
                  and not {"_static", "_sources", "_images"} & set(p.relative_to(html).parts))


def page_reports(html: Path, tmp: Path) -> dict[str, dict]:
    """Each page of a built book, laid out by headless Chromium at 1280 px: what _CHECK recorded."""
    import json

    reports = {}
    for page in _pages(html):
        text = page.read_text()
        scratch = page.with_name(page.stem + ".check.html")
        scratch.write_text(text.replace("<head>", "<head>" + _CHECK, 1))
        try:
            done = _headless([f"--user-data-dir={tmp / 'profile'}", "--window-size=1280,900", "--dump-dom",
                              scratch.as_uri()])
        finally:
            scratch.unlink()
        found = re.search(r'<pre id="heart-check"[^>]*>(.*?)</pre>', done.stdout, re.S)  # the theme adds attributes
        import html as html_text

        reports[str(page.relative_to(html))] = (json.loads(html_text.unescape(found.group(1))) if found else
                                                 {"errors": [f"no layout report: {done.stderr[-300:]}"],
                                                  "overflow": [], "images": []})
        reports[str(page.relative_to(html))]["text"] = text
    return reports


@pytest.fixture(scope="session")
def smoke_reports(smoke_book, tmp_path_factory):
    _, html = smoke_book
    return page_reports(html, tmp_path_factory.mktemp("chromium"))


def _assert_readable(reports: dict[str, dict]) -> None:
    problems = []
    for page, report in reports.items():
        problems += [f"{page}: error {e}" for e in report["errors"]]
        problems += [f"{page}: overflows the column: {o}" for o in report["overflow"]]
        for image in report["images"]:
            if not image["loaded"]:
                problems.append(f"{page}: image does not load: {image['src']}")
            if not image["caption"]:
                problems.append(f"{page}: image without a caption: {image['src']}")
            if not image["alt"] or image["alt"].endswith(".png") or "/" in image["alt"]:
                problems.append(f"{page}: image without real alt text: {image['src']} ({image['alt']!r})")
        if "PosixPath(" in report["text"]:
            problems.append(f"{page}: shows a PosixPath")
    assert not problems, "\n".join(problems[:40])


@pytest.mark.browser
def test_every_smoke_page_loads_and_fits_the_column(smoke_reports):
    assert len(smoke_reports) >= len(config.NOTEBOOK_ORDER) + 5
    assert sum(len(r["images"]) for r in smoke_reports.values()) > 0
    _assert_readable(smoke_reports)


@pytest.mark.browser
def _current_default_chapters() -> tuple[list[str], list[str]]:
    """(chapters whose committed default results match the code, the others): a stale chapter is
    not what a reader gets (`make book` re-executes it first), so its old page is not judged here."""
    names = config.profile_notebooks("default")
    keys = {n: runner.notebook_key("default", n) for n in names if n != "claims"}
    keys["claims"] = runner.claims_key("default", names)
    current = [n for n in names if runner.is_up_to_date("default", n, keys[n])]
    return current, [n for n in names if n not in current]


def test_the_default_book_loads_and_fits_the_column(tmp_path_factory):
    """The committed default results, rendered (never re-executed) and checked like the smoke book:
    the prose pages and every chapter whose committed results are current."""
    if not (results_root() / "default" / "claims.ipynb").is_file():
        pytest.skip("no default results")
    current, stale = _current_default_chapters()
    assert current, "no chapter of the committed default results matches the code"
    html = book.build("default", log=lambda *_: None)
    reports = page_reports(html, tmp_path_factory.mktemp("chromium-default"))
    judged = {page: r for page, r in reports.items()
              if not page.startswith("_staged/") or Path(page).stem in current}
    if stale:
        print(f"not judged (committed results older than the code; `make book` re-executes them): {stale}")
    _assert_readable(judged)


@pytest.mark.parametrize("remote, url", [("git@github.com:someone/heart-vit.git", "https://github.com/someone/heart-vit"),
                                         ("https://example.org/a/b.git", "https://example.org/a/b"),
                                         ("/srv/git/heart.git", None)])
def test_the_repository_button_links_a_web_address_only(monkeypatch, remote, url):
    monkeypatch.setenv("HEART_REPOSITORY_URL", remote)
    assert book.repository_url() == url


def test_a_chapter_not_yet_executed_is_a_page_that_links_resolve_to(tmp_path, monkeypatch):
    """Its placeholder is a notebook page, so `[camphive](camphive.ipynb)` on the claims page resolves,
    and the staged configuration turns the repository button on when the address is known."""
    import json

    import yaml

    monkeypatch.setenv("HEART_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("HEART_REPOSITORY_URL", "https://example.org/heart")
    if not (book.MATHJAX_DIR / "tex-chtml.js").is_file():
        pytest.skip("local MathJax not installed (make mathjax)")
    book.stage("smoke", tmp_path / "src")
    page = json.loads((tmp_path / "src" / "_staged" / "camphive.ipynb").read_text())
    assert "has not been executed" in page["cells"][0]["source"]
    assert not list((tmp_path / "src" / "_staged").glob("*.md"))
    settings = yaml.safe_load((tmp_path / "src" / "_config.yml").read_text())
    assert settings["repository"]["url"] == "https://example.org/heart" and settings["html"]["use_repository_button"]
