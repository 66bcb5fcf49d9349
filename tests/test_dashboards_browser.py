"""The dashboards in a real browser (the system Chromium, tests/browser.py) on a real MLflow store
(tests/dashboard_store.py: 6 tiny-model runs, forward/reverse KL x seeds 0-2, sweep ``dash``): the offline report
opened from disk and the live app served on 127.0.0.1 render every figure, show the numbers ``dashboards.stats``
gives on the same data, and ask no host but this machine; the live app shows a new run within its refresh."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from browser import chromium  # noqa: F401  (the fixture)
from dashboard_store import SWEEP, shared_store
from servers import alive, free_port, listening

pytestmark = [pytest.mark.system, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parents[1]
REPORT_METRIC = "actor/kl_k3"  # differs between seeds (accuracy is 0 everywhere on the random tiny model)
APP_METRIC = "time/step"  # differs between seeds by seconds: the table's 3 decimals tell the runs apart


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, dict[str, str], Path]:
    return shared_store(tmp_path_factory)


def expected_cells(uri: str, metric: str, by: str = "label", baseline: str | None = None) -> dict[tuple[str, str], str]:
    """``{(group, "Last"|"Best"): text}``: per group, the mean of its runs' Last (Best) ``metric`` with its bootstrap
    CI from ``dashboards.stats`` (the table's defaults: 95 %, 2000 resamples, seed 0), written as the table writes it:
    ``value ± half-width (n)``, then ``Δ difference of means, P(>) probability of improvement`` against a baseline."""
    from dashboards import stats
    from dashboards.data import load, summary

    data = load(sweep=SWEEP, tracking_uri=uri, extra=[metric])
    s = summary(data, metric)
    s["g"] = s[by].astype(str)
    out = {}
    for g in data.groups(by):
        for which in ("last", "best"):
            vals = s.loc[s["g"] == g, which].dropna().to_numpy()
            e = stats.bootstrap_ci(vals, "mean")
            text = f"{e.value:.3f} ± {(e.high - e.low) / 2:.3f} ({e.n})"
            if baseline and g != baseline:
                base = s.loc[s["g"] == baseline, which].dropna().to_numpy()
                text += f" Δ {np.mean(vals) - np.mean(base):+.3f}, P(>) {stats.probability_of_improvement(vals, base):.2f}"
            out[(g, which.capitalize())] = text
    return out


_READ_TABLE = """t => ({head: [...t.querySelectorAll('thead th')].map(c => c.innerText.trim()),
  rows: [...t.querySelectorAll('tbody tr')].map(r => [...r.children].map(c => c.innerText.trim()))})"""


def shown_cells(page, selector: str, metric: str) -> dict[tuple[str, str], str]:
    """The paper table's cells for ``metric`` as the page shows them: ``{(group, "Last"|"Best"): text}``."""
    t = page.eval_on_selector(selector, _READ_TABLE)
    cols = {which: t["head"].index(f"{metric} {which}") for which in ("Last", "Best")}
    return {(row[0], which): row[i] for row in t["rows"] for which, i in cols.items()}


def pick(page, dropdown: str, option: str) -> None:
    """Choose ``option`` in a Dash dropdown the way a user does: open it, click the option."""
    page.click(f"#{dropdown}")
    page.get_by_role("option", name=option, exact=True).click()


@contextlib.contextmanager
def live_app(uri: str, *, refresh_s: float = 2, mlflow_url: str = "http://127.0.0.1:5000"):
    """``python -m dashboards.app`` on a free port of 127.0.0.1, until it answers; stopped (SIGTERM) after."""
    port = free_port()
    cmd = [sys.executable, "-m", "dashboards.app", "--host", "127.0.0.1", "--port", str(port), "--tracking-uri", uri,
           "--mlflow-url", mlflow_url, "--refresh-s", str(refresh_s)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, f"the app exited:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "the app did not answer within 120 s"
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def load_labels(uri: str) -> list[str]:
    from dashboards.data import load

    return sorted(load(sweep=SWEEP, tracking_uri=uri).groups("label"))


def wait_rendered(page, timeout_ms: int = 120_000) -> list[str]:
    """Wait for the paper table and every figure the page lists (``#figure-list``) to be drawn; returns the names."""
    page.wait_for_selector("#paper-table", timeout=timeout_ms)
    names = page.get_attribute("#figure-list", "data-figures").split(",")
    for name in names:
        page.wait_for_selector(f"#fig-{name} .main-svg", timeout=timeout_ms)
    return names


def test_report_renders_offline_and_shows_the_stats_numbers(chromium, store, tmp_path):  # noqa: F811
    uri, _, _ = store
    from dashboards.data import load

    baseline = load(sweep=SWEEP, tracking_uri=uri).groups("label")[0]
    out = tmp_path / "report"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "rpg_core.cli", "report", "--sweep", SWEEP, "--tracking-uri", uri,
                        "--out", str(out), "--metric", REPORT_METRIC, "--baseline", baseline, "--no-png"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"rpg report: {time.monotonic() - t0:.1f} s")
    since = len(chromium.requests)
    page = chromium.page()
    page.goto((out / "index.html").resolve().as_uri())
    page.wait_for_function("window.RPG_REPORT !== undefined", timeout=60_000)
    figures = page.evaluate("window.RPG_REPORT.figures")
    assert {"paper_panel", "performance_profile", "stability"} <= set(figures), figures
    for name in figures:  # plotly drew each: its div holds the SVG
        page.wait_for_selector(f"#fig-{name} .main-svg", timeout=60_000)
    chromium.screenshot(page, "report")
    assert shown_cells(page, "table.paper", REPORT_METRIC) == expected_cells(uri, REPORT_METRIC, baseline=baseline)
    chromium.assert_local(since)
    assert all(u.startswith("file:") for u in chromium.requests[since:] if not u.startswith(("data:", "blob:", "about:")))
    page.close()


@pytest.mark.server
def test_live_app_renders_regroups_and_shows_the_stats_numbers(chromium, store):  # noqa: F811
    uri, _, _ = store
    since = len(chromium.requests)
    with live_app(uri) as (url, proc):
        page = chromium.page()
        page.goto(f"{url}/?sweep={SWEEP}")
        names = wait_rendered(page)
        assert {"paper_panel", "performance_profile", "stability"} <= set(names), names
        page.wait_for_function("document.querySelector('#status').innerText.includes('6 runs (0 running)')")
        rows = page.eval_on_selector("#paper-table", _READ_TABLE)["rows"]
        labels = load_labels(uri)
        assert sorted(r[0] for r in rows) == labels
        links = page.eval_on_selector_all("#runs-table a", "as => as.map(a => a.href)")
        assert len(links) == 6 and all(u.startswith("http://127.0.0.1:5000/#/runs/") for u in links)
        chromium.screenshot(page, "live_app")
        # group by KL direction: the table's rows become the directions
        pick(page, "by", "direction")
        page.wait_for_function("document.querySelector('#paper-table th').innerText.trim() === 'direction'")
        rows = page.eval_on_selector("#paper-table", _READ_TABLE)["rows"]
        assert sorted(r[0] for r in rows) == ["forward", "reverse"]
        # a metric whose seeds differ: the numbers are the stats module's on the same runs
        pick(page, "metric", APP_METRIC)
        page.wait_for_function(f"document.querySelector('#paper-table thead').innerText.includes('{APP_METRIC} Last')")
        wait_rendered(page)
        assert shown_cells(page, "#paper-table", APP_METRIC) == expected_cells(uri, APP_METRIC, by="direction")
        assert page.inner_text("#message").strip() == ""
        chromium.screenshot(page, "live_app_by_direction")
        chromium.assert_local(since)
        page.close()
        proc.terminate()
        proc.wait(timeout=30)
        port = int(url.rsplit(":", 1)[1])
        assert not alive(proc.pid) and not listening(port)


@pytest.mark.server
def test_live_app_shows_a_new_run_within_its_refresh(chromium, store, tmp_path):  # noqa: F811
    """A 7th run (seed 3 of the forward configuration, tagged like its seeds) appears while the page is open: the run
    count, its row in the runs table and n = 4 in its group's cells; then its end (0 running)."""
    from rpg_core.runs import find_runs, run_tags
    from rpg_core.tracking import RunKind, Tracker

    _, ids, folder = store
    (tmp_path / "copy").mkdir()
    shutil.copy(folder / "mlflow.db", tmp_path / "copy" / "mlflow.db")  # its own store: the other tests' stays as is
    uri = f"sqlite:///{tmp_path / 'copy' / 'mlflow.db'}"
    since = len(chromium.requests)
    with live_app(uri, refresh_s=2) as (url, _proc):
        page = chromium.page()
        page.goto(f"{url}/?sweep={SWEEP}")
        wait_rendered(page)
        page.wait_for_function("document.querySelector('#status').innerText.includes('6 runs (0 running)')")
        source = ids["forward-s0"]
        tags = {k: v for k, v in run_tags(source, tracking_uri=uri).items()
                if not k.startswith("mlflow.") or k == "mlflow.parentRunId"}  # fmt: skip
        tags.pop("rpg.checkpoint_step", None)
        tags.update(seed="3", run_dir=str(tmp_path / "runs" / "s3"))
        experiment = find_runs(tracking_uri=uri).set_index("run_id").loc[source, "experiment"]
        tracker = Tracker(experiment=experiment, run_name="added-s3", tags=tags, tracking_uri=uri, kind=RunKind.TRAIN)
        try:
            for step in (1, 2):
                tracker.log_metrics({"actor/kl_k3": 0.002 * step, "actor/entropy": 10.0, "reward/mean": -2.0,
                                     "time/step": 4.0, "eval/acc_strict": 0.5}, step=step)  # fmt: skip
            tracker.flush()
            t0 = time.monotonic()
            page.wait_for_function("document.querySelector('#status').innerText.includes('7 runs (1 running)')",
                                   timeout=60_000)  # fmt: skip
            seen = time.monotonic() - t0
            page.wait_for_function("[...document.querySelectorAll('#runs-table tbody tr')].some("
                                   "r => r.children[1].innerText === '3' && r.children[2].innerText === 'RUNNING')")  # fmt: skip
            page.wait_for_function("document.querySelector('#paper-table tbody').innerText.includes('(4)')")
            print(f"the new run shown {seen:.1f} s after it was written (refresh every 2 s)")  # reported, not asserted
            chromium.screenshot(page, "live_app_new_run")
        finally:
            tracker.finish()
        page.wait_for_function("document.querySelector('#status').innerText.includes('7 runs (0 running)')",
                               timeout=60_000)  # fmt: skip
        assert page.inner_text("#message").strip() == ""
        chromium.assert_local(since)
        page.close()
