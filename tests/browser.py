"""The browser for the browser tests: the system's Chromium (``dashboards.report.find_browser``, which ``make browser``
installs) driven by playwright, with every request of every page recorded, so a test can assert that a page asked
no host but this machine. Playwright's own browser download is not used (it needs the internet).

    from browser import chromium  # noqa: F401  (the fixture)

    def test_page(chromium):
        page = chromium.page()
        page.goto("http://127.0.0.1:8050/")
        chromium.screenshot(page, "front")      # <shots>/front.png
        chromium.assert_local()                 # every request to 127.0.0.1/localhost or file:/data:/blob:/about:

Without a Chromium the tests skip with "no Chromium: run `make browser`"; with ``RPG_REQUIRE_BROWSER=1`` (CI) they
fail instead. Screenshots go to a folder named by the test module under pytest's tmp path, or, with
``RPG_SCREENSHOTS=DIR``, to ``DIR/<that name>`` (kept).
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

LOCAL_HOSTS = ("127.0.0.1", "localhost")
LOCAL_SCHEMES = ("file", "data", "blob", "about")


def executable() -> str:
    """The Chromium to drive; skips the test without one (fails with ``RPG_REQUIRE_BROWSER=1``)."""
    from dashboards.report import find_browser

    path = find_browser()
    if path is None:
        _missing("no Chromium: run `make browser`")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing('no playwright: pip install -c constraints.txt -e ".[dev]"')
    return path


def _missing(why: str) -> None:
    if os.environ.get("RPG_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{why} (RPG_REQUIRE_BROWSER=1: a missing browser is a failure)", pytrace=False)
    pytest.skip(why)


def offenders(urls: Iterable[str]) -> list[str]:
    """The URLs that went anywhere but this machine: not 127.0.0.1/localhost, nor file:, data:, blob:, about:."""
    bad = []
    for url in urls:
        u = urllib.parse.urlsplit(url)
        if u.scheme in LOCAL_SCHEMES or (u.scheme in ("http", "https", "ws", "wss") and u.hostname in LOCAL_HOSTS):
            continue
        bad.append(url)
    return sorted(set(bad))


def assert_local(urls: Iterable[str]) -> None:
    urls = list(urls)
    bad = offenders(urls)
    assert not bad, f"{len(bad)} request(s) to other hosts (of {len(urls)}):\n  " + "\n  ".join(bad)


def shots_dir(name: str, tmp_root: Path) -> Path:
    """Where a test's screenshots go: ``$RPG_SCREENSHOTS/<name>`` (kept), else ``<tmp_root>/<name>``."""
    keep = os.environ.get("RPG_SCREENSHOTS", "").strip()
    folder = (Path(keep) if keep else tmp_root) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Browser:
    """One launched Chromium and one context: every request (and WebSocket) of every page it opens is recorded in
    ``requests``, in order."""

    def __init__(self, browser, shots: Path) -> None:
        self.browser = browser
        self.shots = shots
        self.requests: list[str] = []
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.context.on("request", lambda r: self.requests.append(r.url))
        self.context.on("page", lambda p: p.on("websocket", lambda ws: self.requests.append(ws.url)))

    def page(self):
        return self.context.new_page()

    def screenshot(self, page, name: str, *, full_page: bool = True) -> Path:
        path = self.shots / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        return path

    def assert_local(self, since: int = 0) -> None:
        """Every request recorded (from index ``since`` on: a test's own, in a shared browser) stayed local."""
        assert_local(self.requests[since:])


@contextlib.contextmanager
def launch(shots: Path) -> Iterator[Browser]:
    """The system Chromium, headless, through playwright (``--no-sandbox``: tests may run as root); closed after."""
    exe = executable()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            yield Browser(b, shots)
        finally:
            b.close()


@pytest.fixture(scope="module")
def chromium(request, tmp_path_factory) -> Iterator[Browser]:
    """A Chromium for the test module (one launch), screenshots in a folder named by the module."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    with launch(shots_dir(name, tmp_path_factory.mktemp("shots"))) as b:
        yield b
