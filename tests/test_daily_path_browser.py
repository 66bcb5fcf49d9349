"""The researcher's daily path through the Prefect and MLflow UIs, in a real browser (headless Chromium), on the
stack ``make up`` starts (infra/stack.py, here on free ports with its own home):

1. Prefect: Deployments → sweep → Run → Custom run: every field explains itself (description, allowed, default);
   nothing offers the V2 UI, and a V2 address lands on the V1 UI;
2. a bad value (concurrency 0) is refused with the field, the value and what is allowed;
3. the smoke sweep submitted from the form (its runs' folders under this test's tmp path), one click to the run;
4. followed to completion: the task runs are named after what they are, the runs' progress (step/total, reward,
   held-out accuracy) is in the log, the last log line gives the best configuration and the comparison links, the
   ranked summary is the sweep's artifact;
5. MLflow, from the link in the flow's log: the sweep's training runs (not its parent), their design, seed and
   headline metrics as the columns in sight, the axes the sweep varies next; the parent run's page shows the ranking.

Every request of every page is recorded; one to a host other than 127.0.0.1 fails the test. Screenshots of each step
go to ``test_daily_path_browser/`` (under ``$RPG_SCREENSHOTS`` when set); the README shows two of them."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import chromium  # noqa: F401  (the fixture)
from servers import free_port

pytestmark = [pytest.mark.system, pytest.mark.server, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parents[1]
SWEEP_S = 600  # the smoke sweep: 4 runs of the tiny model, about 1-2 minutes on 2 idle cores


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """``infra/stack.py up`` on free ports (Prefect, MLflow, optuna-dashboard, the dashboard, the served flows);
    ``down`` afterwards. Yields the URLs."""
    home = tmp_path_factory.mktemp("stack")
    ports = {"prefect": free_port(), "mlflow": free_port(), "optuna": free_port(), "dashboard": free_port()}
    cmd = [sys.executable, "infra/stack.py", "--home", str(home), *(a for n, p in ports.items() for a in (f"--{n}-port", str(p)))]
    r = subprocess.run([*cmd, "up"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        yield {"prefect": f"http://127.0.0.1:{ports['prefect']}", "mlflow": f"http://127.0.0.1:{ports['mlflow']}",
               "up": r.stdout, "home": home}  # fmt: skip
    finally:
        subprocess.run([*cmd, "down"], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _field(page, name: str):
    """The form's property ``name`` (its label reads ``<name> (Optional)``)."""
    label = page.locator(".schema-form-property__label", has_text=re.compile(rf"^{re.escape(name)} "))
    return page.locator(".schema-form-property", has=label).last


def test_daily_path(stack, chromium, tmp_path):  # noqa: F811
    prefect, since = stack["prefect"], len(chromium.requests)
    page = chromium.page()
    page.set_default_timeout(60_000)
    # 1. the sweep's Run form
    page.goto(f"{prefect}/deployments")
    page.get_by_role("link", name="sweep", exact=True).first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").first.click()
    page.get_by_text("runs at once; empty: one per GPU").wait_for()
    text = page.inner_text("body")
    for words in ("a shipped sweep (the file sweeps/NAME.yaml). Allowed: one of ", "Default: smoke.",
                  "Allowed: an integer from 1 to 1024, or empty. Default: empty.",
                  "retries of a failed run (each resumes). Allowed: an integer from 0 to 10. Default: 1."):  # fmt: skip
        assert words in text, words
    assert "Switch to V2 UI" not in text  # the V2 UI (which calls an analytics host) is not served: nothing offers it
    chromium.screenshot(page, "1-sweep-form")
    # 2. a bad value: refused, naming the field, the value and what is allowed
    _field(page, "concurrency").locator("input").fill("0")
    page.get_by_role("button", name="Submit").click()
    toast = page.get_by_text("Validation failed for field 'concurrency'").first
    toast.wait_for()
    assert "0 is less than the minimum of 1" in toast.inner_text()
    chromium.screenshot(page, "2-bad-value", full_page=False)
    assert page.url.split("?")[0].endswith("/run")  # still on the form: nothing was created
    page.wait_for_timeout(6000)  # let the toast go (it covers the Submit button's neighbourhood)
    # 3. the smoke sweep, two runs at a time, its folders in this test's tmp path
    _field(page, "concurrency").locator("input").fill("2")
    _field(page, "workdir").locator("input, textarea").fill(str(tmp_path / "work"))
    overrides = _field(page, "overrides")
    overrides.get_by_role("button", name="Add item").click()
    overrides.locator("input, textarea").last.fill(f"train.output_dir={tmp_path / 'runs'}")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(re.compile(r".*/deployments/deployment/[^/?]+(\?.*)?$"))  # back on the deployment's runs
    view_run = page.get_by_role("button", name="View run").last  # (the UI draws each toast twice: the top one)
    view_run.wait_for()
    page.wait_for_timeout(1000)  # the toast slides in
    chromium.screenshot(page, "3-submitted", full_page=False)
    view_run.click()  # one click from the run
    page.wait_for_url(re.compile(r".*/runs/flow-run/.*"))
    run_url = page.url
    page.get_by_text("sweep smoke").first.wait_for()  # the flow run is named after its sweep
    # 4. followed to completion
    deadline = time.monotonic() + SWEEP_S
    while time.monotonic() < deadline:
        state = page.locator(".state-badge").first.inner_text().strip()
        if state in ("Completed", "Failed", "Crashed", "Cancelled"):
            break
        page.wait_for_timeout(5000)
        page.reload()
    assert state == "Completed", page.inner_text("body")[-3000:]
    page.get_by_text("compare: ").first.wait_for()  # the last log line has arrived
    chromium.screenshot(page, "4-sweep-completed")
    log = page.inner_text("body")
    for name in ("FKL", "UFKL", "RKL", "URKL"):  # the task runs: <sweep>/<design>-s<seed>
        assert f"smoke/rpg_reinforce-{name}-dual-s0" in log, name
    assert re.search(r"step 2/2 \| reward [-+][\d.]+ \| acc [\d.]+ .*\| eval [\d.]+", log)  # each run's progress
    best = re.search(r"sweep smoke: best on eval/acc_strict \(Last\): (\S+) .*; compare: (.*)", log)
    assert best, log[-3000:]
    mlflow_link = re.search(r"MLflow (http://127\.0\.0\.1:\d+/#/experiments/\d+/runs\?\S+)", log).group(1)
    assert "viewStateShareKey=rpg-sweep-smoke" in mlflow_link
    page.locator("li.p-tab", has_text="Artifacts").first.click()  # the run page's tabs: <li class="p-tab">
    page.get_by_text("sweep-smoke", exact=True).first.wait_for()
    chromium.screenshot(page, "5-artifacts")
    page.get_by_text("sweep-smoke", exact=True).first.click()  # the ranked summary
    page.get_by_text("Configurations ranked by the mean over seeds").first.wait_for()
    ranked = page.inner_text("body")
    assert "best on eval/acc_strict" in ranked and all(f"**{n}**" not in ranked for n in ("FKL", "URKL"))  # rendered
    href = page.get_by_role("link", name=re.compile(r"^s0 ")).first.get_attribute("href")  # a seed's MLflow run
    assert re.fullmatch(rf"{stack['mlflow']}/#/experiments/\d+/runs/\w+\?workflowType=machine_learning", href), href
    chromium.screenshot(page, "6-ranked-summary")
    # 5. MLflow: the link in the log opens the sweep's runs with the axes and metrics as columns
    page.goto(mlflow_link)
    page.get_by_text("rpg: sweep smoke").first.wait_for()
    close = page.get_by_label("Close", exact=True)  # the assistant panel opens on a first visit
    if close.count():
        close.first.click()
    page.locator("[role=row]", has_text="smoke/rpg_reinforce-URKL-dual-s0").first.wait_for()
    chromium.screenshot(page, "7-mlflow-runs", full_page=False)
    # in sight, left to right: the run, its design and seed, the headline metrics; the axes a scroll to the right
    cells = page.eval_on_selector_all("[role=columnheader][col-id]", """hs => hs.map(h => [h.innerText.trim(),
        h.getBoundingClientRect().x + h.getBoundingClientRect().width])""")  # fmt: skip
    in_sight = list(dict.fromkeys(name for name, right in sorted(cells, key=lambda c: c[1]) if 0 < right <= 1400))
    wanted = ["Run Name", "design", "seed", "eval/acc_strict", "reward/mean"]
    assert [c for c in in_sight if c in wanted] == wanted, in_sight
    page.locator(".ag-body-horizontal-scroll-viewport").first.evaluate("e => { e.scrollLeft = e.scrollWidth }")
    for axis in ("direction", "normalized"):  # the axes the smoke sweep varies
        page.locator(f"[role=columnheader][col-id='tags.`{axis}`']").first.wait_for()
    body = page.inner_text("body")
    assert "4 matching runs" in body and "sweep-smoke" not in body  # the sweep's training runs, not its parent
    # the parent run's page (in the UI's Model training mode, as the summary's links open runs): the ranking is its
    # description
    from mlflow.tracking import MlflowClient

    from rpg_core.mlflow_view import run_fragment

    client = MlflowClient(stack["mlflow"])
    exp = client.get_experiment_by_name("rpg")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`rpg.kind` = 'sweep'")
    page.goto(f"{stack['mlflow']}/{run_fragment(exp.experiment_id, parent.info.run_id)}")
    page.get_by_text("Configurations ranked by the mean over seeds").first.wait_for()
    chromium.screenshot(page, "8-mlflow-parent", full_page=False)
    body = page.inner_text("body")
    assert best.group(1) in body and "Evaluation runs" not in body  # not the GenAI mode's evaluation page
    # a V2 address (a bookmark, the prefect_ui_version=v2 cookie) lands on the V1 UI (infra/prefect_server.py)
    page.context.add_cookies([{"name": "prefect_ui_version", "value": "v2", "url": prefect}])
    page.goto(f"{prefect}/v2/dashboard")
    page.get_by_text("Flow Runs", exact=True).first.wait_for()  # the V1 dashboard
    body = page.inner_text("body")
    assert "/v2" not in page.url and "Try the V2 UI" not in body and "Switch to V2 UI" not in body, page.url
    chromium.assert_local(since)
    assert run_url.startswith(prefect)
