"""The built documentation site, opened in a real browser (headless Chromium).

Checks every page of ``docs/_build/html`` (built by ``make docs`` or ``.ci/run``), served on
127.0.0.1 by a local HTTP server:

* the equations are rendered: MathJax turned every math element into an ``mjx-container``, none
  is an error or draws a backslash (TeX it did not understand), and no raw TeX (``\\frac``,
  ``\\(``, ``$$``, ``\\begin`` ...) is left in the visible text outside code;
* every notebook page shows at least one figure that loaded (``naturalWidth > 0``), and every
  image of every page loaded;
* every local link resolves (HTTP 200, and its ``#fragment`` names an element of the target
  page), nothing the browser requested got a 404, and no page loads a script, a stylesheet or an
  image from another host (the site works offline);
* screenshots of the algebra page and of one notebook page are saved in
  ``docs/_build/screenshots/`` (CI artifacts).

Skipped in the normal test run when the site has not been built, Chromium or chromedriver is
missing, or selenium is not installed. With ``REPNP_DOCS_CHECK=1`` (what ``.ci/run`` sets after
building the site) any of these is an error instead of a skip.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "docs" / "_build" / "html"
SCREENSHOTS = ROOT / "docs" / "_build" / "screenshots"
CHROMIUM = os.environ.get("REPNP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("REPNP_CHROMEDRIVER", "/usr/bin/chromedriver")
REQUIRED = os.environ.get("REPNP_DOCS_CHECK", "") not in ("", "0")

# Raw TeX that must not survive into the visible text (MathJax removes its delimiters).
RAW_TEX = re.compile(r"\\frac|\\begin\{|\\end\{|\\\(|\\\)|\\\[|\\\]|\$\$|\\sqrt|\\sum|\\gamma|\\mathrm")
# Pages Sphinx generates that hold no content of ours.
SKIP_PAGES = {"genindex.html", "search.html", "py-modindex.html"}


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"REPNP_DOCS_CHECK is set but {reason}")
    pytest.skip(reason)


def _pages() -> list[str]:
    pages = []
    for path in sorted(SITE.rglob("*.html")):
        rel = path.relative_to(SITE).as_posix()
        if rel.split("/")[0] in {"_static", "_sources", "_images", "plot_directive"} or rel in SKIP_PAGES:
            continue
        pages.append(rel)
    return pages


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; remembers every request that did not succeed."""

    failures: list = []

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def send_error(self, code, message=None, explain=None):
        type(self).failures.append((code, self.path))
        super().send_error(code, message, explain)


@pytest.fixture(scope="module")
def server():
    if not (SITE / "index.html").is_file():
        _unavailable(f"the site is not built ({SITE / 'index.html'} missing; run `make docs`)")
    handler = type("Handler", (_Handler,), {"failures": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(SITE)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", handler.failures
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[docs]')")
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not (Path(exe).is_file() and os.access(exe, os.X_OK)):
            _unavailable(f"{exe} is missing (apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="repnp-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Without the background-networking flags Chromium tries to reach Google services, which a
    # closed network refuses; a fresh profile keeps runs independent.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager is never asked to download anything.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


_WAIT_FOR_MATH = """
// MathJax is loaded with `defer`: poll until its startup promise exists, then wait for the
// typesetting to finish. "no math" for a page without math, "timeout" after 45 s.
const done = arguments[arguments.length - 1];
const t0 = Date.now();
const poll = () => {
  if (Date.now() - t0 > 45000) { done("timeout"); return; }
  // The page itself first: its deferred scripts (MathJax) have run once it is complete.
  if (document.readyState !== 'complete') { setTimeout(poll, 50); return; }
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done(true), () => done(false));
  } else if (document.querySelector('.math') === null) { done("no math"); }
  else { setTimeout(poll, 50); }
};
poll();
"""

_WAIT_FOR_IMAGES = """
// Every <img> settled (loaded or failed), at most 30 s.
const done = arguments[arguments.length - 1];
const t0 = Date.now();
const poll = () => {
  if (Array.from(document.images).every(i => i.complete) || Date.now() - t0 > 30000) done(true);
  else setTimeout(poll, 50);
};
poll();
"""

_VISIBLE_TEXT = """
// The visible text of the page, without code (code may legitimately show TeX) and without
// what MathJax drew (its output is glyphs, plus hidden assistive MathML).
const skip = new Set(['SCRIPT', 'STYLE', 'PRE', 'CODE', 'MJX-CONTAINER', 'NOSCRIPT', 'TEXTAREA']);
const out = [];
const walk = (node) => {
  if (node.nodeType === Node.TEXT_NODE) { out.push(node.textContent); return; }
  if (node.nodeType !== Node.ELEMENT_NODE || skip.has(node.tagName)) return;
  const style = getComputedStyle(node);
  if (style.display === 'none' || style.visibility === 'hidden') return;
  for (const child of node.childNodes) walk(child);
};
walk(document.body);
return out.join(' ');
"""

_PAGE_FACTS = """
const imgs = Array.from(document.images).map(i => ({src: i.currentSrc || i.src,
    ok: i.complete && i.naturalWidth > 0, inCell: !!i.closest('.cell_output, .output')}));
const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
const resources = Array.from(document.querySelectorAll('script[src], link[href], img[src]'))
    .filter(e => e.tagName !== 'LINK' || /stylesheet|icon|preload/.test(e.rel))
    .map(e => e.src || e.href);
return {
  imgs, links, resources,
  math: document.querySelectorAll('.math, span.math, div.math').length,
  mjx: document.querySelectorAll('mjx-container').length,
  mjxErrors: document.querySelectorAll('mjx-merror').length,
  // A backslash drawn as a glyph: TeX that MathJax did not understand (an unknown macro is shown
  // as its name by noundefined; `\\_` inside \\text{} without textmacros stays as typed).
  mjxBackslashes: document.querySelectorAll('mjx-container mjx-c.mjx-c5C').length,
  title: document.title,
};
"""


@pytest.fixture(scope="module")
def visited(server, browser):
    """Every page opened once: its facts, its visible text."""
    base, _ = server
    pages = _pages()
    assert pages, f"no pages under {SITE}"
    facts = {}
    for rel in pages:
        browser.get(base + rel)
        math_ok = browser.execute_async_script(_WAIT_FOR_MATH)
        browser.execute_async_script(_WAIT_FOR_IMAGES)
        info = browser.execute_script(_PAGE_FACTS)
        info["math_ok"] = math_ok
        info["text"] = browser.execute_script(_VISIBLE_TEXT)
        facts[rel] = info
    return facts


def test_site_has_the_sections(visited):
    pages = set(visited)
    for page in ("index.html", "algebra.html", "porting/index.html", "converter.html", "golden.html",
                 "sources.html", "api/index.html", "api/fusion.html", "learn/index.html"):
        assert page in pages, f"{page} is not in the built site"
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for nb in notebooks:
        assert f"learn/notebooks/{nb.stem}.html" in pages, f"notebook {nb.name} has no page"


def test_equations_are_rendered(visited):
    for rel, info in visited.items():
        raw = RAW_TEX.findall(info["text"])
        assert not raw, f"{rel}: raw TeX in the visible text: {sorted(set(raw))}"
        if info["math"]:
            assert info["math_ok"] is True, \
                f"{rel}: MathJax did not finish ({info['math_ok']}; math elements: {info['math']})"
            assert info["mjx"] >= info["math"], f"{rel}: {info['math']} math elements, {info['mjx']} rendered"
        assert info["mjxErrors"] == 0, f"{rel}: {info['mjxErrors']} MathJax errors"
        assert info["mjxBackslashes"] == 0, f"{rel}: {info['mjxBackslashes']} backslashes drawn in equations"
    for rel in ("index.html", "algebra.html", "porting/index.html"):
        assert visited[rel]["mjx"] > 0, f"{rel}: no rendered equation"


def test_notebook_pages_have_figures(visited):
    notebook_pages = [rel for rel in visited if rel.startswith("learn/notebooks/")]
    assert notebook_pages
    for rel in notebook_pages:
        figures = [i for i in visited[rel]["imgs"] if i["inCell"] and i["ok"]]
        assert figures, f"{rel}: no figure in the notebook's outputs"


def test_images_load(visited):
    for rel, info in visited.items():
        broken = [i["src"] for i in info["imgs"] if not i["ok"]]
        assert not broken, f"{rel}: images that did not load: {broken}"
    assert len([i for i in visited["algebra.html"]["imgs"] if i["ok"]]) >= 8, "algebra page: pictures missing"


def test_offline_no_external_resources(server, visited):
    base, _ = server
    for rel, info in visited.items():
        external = [r for r in info["resources"] if r and not r.startswith(base) and not r.startswith("data:")]
        assert not external, f"{rel}: loads resources from other hosts: {external}"


@functools.lru_cache(maxsize=None)
def _fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
            text = body.decode("utf-8", "replace") if url.endswith((".html", "/")) else ""
            return response.status, text
    except urllib.error.HTTPError as err:
        return err.code, ""


def test_local_links_resolve(server, visited):
    base, failures = server
    problems = []
    for rel, info in visited.items():
        for href in info["links"]:
            if not href.startswith(base):
                continue                      # external links: not checked offline
            url, _, fragment = href.partition("#")
            status, text = _fetch(url)
            if status != 200:
                problems.append(f"{rel}: {href} -> HTTP {status}")
            elif fragment and text and not re.search(
                    r"""\bid=["']%s["']""" % re.escape(urllib.parse.unquote(fragment)), text):
                problems.append(f"{rel}: {href} -> no element with id {fragment!r}")
    assert not problems, "broken links:\n" + "\n".join(problems[:40])
    assert not failures, f"requests that failed while browsing: {failures[:20]}"


def _full_page_screenshot(browser, url: str, path: Path) -> None:
    """The whole page, however long (DevTools' captureBeyondViewport; a window is capped in height)."""
    import base64

    browser.set_window_size(1280, 900)
    browser.get(url)
    browser.execute_async_script(_WAIT_FOR_MATH)
    browser.execute_async_script(_WAIT_FOR_IMAGES)
    height = browser.execute_script("return Math.max(document.body.scrollHeight, "
                                    "document.documentElement.scrollHeight)")
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": 1280, "height": int(height), "scale": 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def test_screenshots(server, browser, visited):
    base, _ = server
    _full_page_screenshot(browser, base + "algebra.html", SCREENSHOTS / "algebra.png")
    notebook = "learn/notebooks/03_repvgg.html"
    if notebook not in visited:
        notebook = sorted(rel for rel in visited if rel.startswith("learn/notebooks/"))[0]
    _full_page_screenshot(browser, base + notebook, SCREENSHOTS / "notebook.png")
    for name in ("algebra.png", "notebook.png"):
        assert (SCREENSHOTS / name).stat().st_size > 10_000, f"{name} looks empty"
