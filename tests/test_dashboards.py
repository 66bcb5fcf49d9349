"""dashboards/ on a real MLflow store of tiny-model runs (tests/dashboard_store.py: forward and reverse KL, 3 seeds):
the tidy frames, every number a view shows recomputed with dashboards.stats, the report written and logged to the
sweep's parent run, a tuning study's views from a real Optuna journal. The browser checks are in
tests/test_dashboards_browser.py."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from dashboards import stats, views
from dashboards.data import AXES, load, problem_scores, summary

sys.path.insert(0, str(Path(__file__).parent))
from dashboard_store import DIRECTIONS, SEEDS, SWEEP, shared_store  # noqa: E402

pytestmark = pytest.mark.integration

METRIC = "actor/kl_k3"  # differs between seeds on the tiny model (accuracy is 0 everywhere)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return shared_store(tmp_path_factory)[:2]


@pytest.fixture(scope="module")
def data(store):
    uri, _ = store
    return load(sweep=SWEEP, tracking_uri=uri)


def test_runs_frame_one_row_per_run_with_axes_seed_group_and_label(data, store):
    _, ids = store
    r = data.runs
    assert len(r) == len(SEEDS) * len(DIRECTIONS)
    assert set(r["run_id"]) == {v for k, v in ids.items() if k != "parent"}
    assert sorted(r["seed"].tolist()) == sorted(list(SEEDS) * len(DIRECTIONS))
    assert r.groupby("group")["seed"].apply(sorted).tolist() == [list(SEEDS)] * len(DIRECTIONS)
    # preset rpg_reinforce_urkl is unnormalized: forward = UFKL, reverse = URKL (spec §2); only direction varies
    assert dict(zip(r["direction"], r["label"])) == {"forward": "UFKL", "reverse": "URKL"}
    assert set(AXES) <= set(r.columns)
    assert "direction" in data.varying_axes and "divergence" in data.varying_axes and "form" not in data.varying_axes
    assert data.parent is not None and data.parent["run_id"] == ids["parent"]
    assert data.headline == "eval/acc_strict"


def test_history_full_resolution_with_wall_clock_and_tokens(data, store):
    h = data.history
    kl = h[(h["key"] == METRIC)]
    assert kl.groupby("run_id")["step"].apply(list).tolist() == [[1, 2]] * 6  # every step of every run
    assert (h["wall_s"] >= 0).all()
    # tokens at step s = the sum over steps <= s of tokens_per_s x step time: strictly increasing per run
    tok = kl.sort_values(["run_id", "step"]).groupby("run_id")["tokens"].apply(list)
    assert all(t[0] > 0 and t[1] > t[0] for t in tok)
    # by default what the views draw (the throughput behind tokens is dropped); keys="all": every metric logged
    assert "perf/tokens_per_s" not in set(h["key"]) and "actor/entropy" in set(h["key"])
    every = load(sweep=SWEEP, tracking_uri=store[0], keys="all").history
    assert {"perf/tokens_per_s", "time/step", "lr"} <= set(every["key"]) and set(h["key"]) < set(every["key"])
    assert data.metrics[0] == "eval/acc_strict" and METRIC in data.metrics


def test_summary_last_best_mean_per_run(data):
    s = summary(data, METRIC).set_index("run_id")
    h = data.history[data.history["key"] == METRIC]
    for rid, g in h.groupby("run_id"):
        g = g.sort_values("step")
        assert s.at[rid, "last"] == g["value"].iloc[-1]
        assert s.at[rid, "best"] == g["value"].max()
        assert s.at[rid, "mean"] == pytest.approx(g["value"].mean())
        assert s.at[rid, "last_step"] == 2 and s.at[rid, "n_points"] == 2


def test_paper_table_cells_are_the_stats_modules_numbers(data):
    t = views.paper_table(data, metrics=[METRIC], baseline="URKL", reps=500, seed=1)
    s = summary(data, METRIC)
    for label in ("UFKL", "URKL"):
        for which in ("last", "best"):
            vals = s.loc[s["label"] == label, which].to_numpy()
            e = stats.bootstrap_ci(vals, "mean", reps=500, seed=1)
            row = t.cells.loc[label]
            assert (row[(METRIC, which, "value")], row[(METRIC, which, "low")], row[(METRIC, which, "high")]) == (
                e.value, e.low, e.high)  # fmt: skip
            assert row[(METRIC, which, "n")] == 3
    uf = s.loc[s["label"] == "UFKL", "last"].to_numpy()
    ur = s.loc[s["label"] == "URKL", "last"].to_numpy()
    assert t.cells.loc["UFKL", (METRIC, "last", "p_improve")] == stats.probability_of_improvement(uf, ur)
    assert t.cells.loc["UFKL", (METRIC, "last", "delta")] == pytest.approx(uf.mean() - ur.mean())
    # the text: value to 3 decimals, half the interval, n; the better Last is bold, the other underlined
    first = t.cells.index[0]
    e = t.cells.loc[first]
    half = (e[(METRIC, "last", "high")] - e[(METRIC, "last", "low")]) / 2
    assert t.text.loc[first, f"{METRIC} Last"].startswith(f"**{e[(METRIC, 'last', 'value')]:.3f} ± {half:.3f} (3)**")
    assert t.text.iloc[1][f"{METRIC} Last"].startswith("__")
    md, tex = t.markdown(), t.latex()
    assert "<u>" in md and "| label |" in md
    assert "\\textbf{" in tex and "\\underline{" in tex and "$\\pm$" in tex
    assert "*" not in tex and "__" not in tex.replace("\\_", "")  # every mark became LaTeX, with the Δ after it


def test_curve_bands_are_bootstrap_bands_over_the_groups_runs(data):
    b = views.curve_bands(data, METRIC, reps=300, seed=2)
    h = data.history[data.history["key"] == METRIC]
    for label in ("UFKL", "URKL"):
        ids = data.runs.loc[data.runs["label"] == label, "run_id"]
        mat = h[h["run_id"].isin(ids)].pivot(index="run_id", columns="step", values="value").to_numpy()
        v, lo, hi, n = stats.bootstrap_band(mat, "mean", reps=300, seed=2)
        got = b[b["group"] == label].sort_values("step")
        assert got["value"].tolist() == v.tolist() and got["low"].tolist() == lo.tolist()
        assert got["high"].tolist() == hi.tolist() and got["n"].tolist() == [3, 3]
    by_dir = views.curve_bands(data, METRIC, by="direction", x="tokens", reps=100)
    assert set(by_dir["group"]) == {"forward", "reverse"} and (by_dir["x"] > 0).all()


def test_grid_tradeoff_stability_and_profile(data):
    g = views.grid_values(data, METRIC, reps=200)
    assert sorted(g["row"]) == ["forward / unnormalized", "reverse / unnormalized"]
    assert (g["n"] == 3).all() and (g["failed"] == 0).all()
    s = summary(data, METRIC)
    fwd = s.loc[s["direction"] == "forward", "last"].to_numpy()
    assert g.loc[g["row"].str.startswith("forward"), "value"].item() == stats.iqm(fwd)
    p = views.tradeoff_points(data, "actor/entropy", kl=METRIC)
    assert p["n"].tolist() == [3, 3] and p["pareto"].any()
    st = views.stability_table(data)
    assert st["runs"].tolist() == [3, 3] and st["failed"].tolist() == [0, 0] and st["nan"].tolist() == [0, 0]
    assert (st["length_cap"] == 1.0).all()  # the random tiny model always writes max_new_tokens
    fig = views.performance_profiles(data, METRIC, reps=100)
    assert len(fig.data) == 4  # a band and a line per group


def test_pareto_front_by_hand():
    # four configurations (kl, accuracy): a (0.1, 0.5), b (0.2, 0.7), c (0.3, 0.6), d (0.1, 0.4)
    # a: nothing has kl <= 0.1 and acc >= 0.5 but itself (d has less acc)     -> on the front
    # b: only a/d have less kl, both less acc                                 -> on the front
    # c: b has less kl and more acc                                           -> dominated
    # d: a has equal kl and more acc                                          -> dominated
    from dashboards.data import Data

    runs = pd.DataFrame({"run_id": list("abcd"), "group": list("abcd"), "label": list("abcd"), "seed": [0] * 4,
                         "status": ["FINISHED"] * 4, "direction": ["forward"] * 4, "normalized": ["true"] * 4})  # fmt: skip
    kl = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.1}
    acc = {"a": 0.5, "b": 0.7, "c": 0.6, "d": 0.4}
    rows = [(r, "actor/kl_k3", 1, kl[r], 0) for r in "abcd"] + [(r, "eval/acc_strict", 1, acc[r], 0) for r in "abcd"]
    hist = pd.DataFrame(rows, columns=["run_id", "key", "step", "value", "timestamp"])
    p = views.tradeoff_points(Data("t", "runs", runs, hist), "eval/acc_strict", "actor/kl_k3")
    assert dict(zip(p["group"], p["pareto"])) == {"a": True, "b": True, "c": False, "d": False}


def test_heldout_problem_tables_give_paired_differences(data):
    ps = problem_scores(data, "heldout")
    assert len(ps) == 6 * 6  # 6 runs x n_eval 6 problems, at the last evaluation (step 2)
    assert set(ps["step"]) == {2} and set(ps["score"]) <= {0.0, 1.0}
    # train.seed draws the held-out split: the configurations of one seed are evaluated on the same problems
    sets = ps.groupby(["seed", "label"])["problem"].apply(lambda p: tuple(sorted(p))).unstack("label")
    assert (sets["UFKL"] == sets["URKL"]).all()
    from dashboards.report import paired_table

    t = paired_table(data, "URKL")
    n = ps["problem"].nunique()  # every problem of every seed, each averaged over the seeds that drew it
    assert t["label"].tolist() == ["UFKL"] and t["problems"].tolist() == [n]
    assert t["wins"].item() + t["losses"].item() + t["ties"].item() == n
    from dashboards import stats as st
    from dashboards.report import benchmark_table

    b = benchmark_table(data, ps).set_index("label")
    assert b["over"].eq("runs (problem sets differ)").all() and b["runs"].tolist() == [3, 3]
    per_run = ps[ps["label"] == "UFKL"].groupby("run_id")["score"].mean().to_numpy()
    assert b.at["UFKL", "score"] == st.bootstrap_ci(per_run).value
    # one problem set for every run of a group (as on a benchmark): the two-way bootstrap over runs and problems
    seed0 = ps[ps["seed"] == 0]
    one = benchmark_table(data, seed0).set_index("label")
    assert one["over"].eq("runs and problems").all() and one["problems"].tolist() == [6, 6]
    assert one.at["UFKL", "score"] == seed0.loc[seed0["label"] == "UFKL", "score"].mean()


def test_report_is_written_offline_and_logged_to_the_parent_run(data, store, tmp_path):
    from dashboards import report
    from rpg_core import runs

    uri, ids = store
    rep = report.write(data, tmp_path / "rep", metric=METRIC, baseline="URKL", png=False)
    import plotly.offline

    page = rep.html.read_text()
    js = plotly.offline.get_plotlyjs()
    assert js in page  # plotly's JavaScript inline (its source names sites in attributions: not requests)
    page = page.replace(js, "")
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", page)
    assert not [u for u in urls if u.startswith(("http:", "https:", "//"))], urls  # nothing from another host
    assert {"paper_panel", "design_grid", "tradeoff", "performance_profile", "stability"} <= set(rep.figures)
    for name in ("paper_table.md", "paper_table.tex", "paper_table.csv", "runs.csv", "stability.csv"):
        assert (tmp_path / "rep" / "tables" / name).exists()
    assert rep.logged_to == ids["parent"]
    logged = runs.list_artifacts(ids["parent"], "report", tracking_uri=uri)
    assert {"report/index.html", "report/tables"} <= set(logged)


def test_load_refuses_bad_selections(store):
    uri, ids = store
    with pytest.raises(ValueError, match="exactly one of sweep, runs, study"):
        load(sweep=SWEEP, study="x", tracking_uri=uri)
    with pytest.raises(ValueError, match="sweep: no training runs tagged sweep='nope'"):
        load(sweep="nope", tracking_uri=uri)
    with pytest.raises(ValueError, match="runs: no such run"):
        load(runs=["0" * 32], tracking_uri=uri)
    with pytest.raises(ValueError, match="baseline: 'GRPO' is not a label"):
        views.paper_table(load(runs=[ids["forward-s0"], ids["reverse-s0"]], tracking_uri=uri), baseline="GRPO")


def test_study_views_from_a_real_optuna_journal(store, tmp_path):
    """A study over the store's two configurations (each seed a trial): its parent run records the journal, the
    trials record their MLflow runs; the views draw Optuna's figures and link every trial to its runs."""
    import optuna

    from rpg_core.tracking import RunKind, Tracker

    uri, ids = store
    journal = tmp_path / "optuna.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.create_study(study_name="st-abc123", storage=storage, direction="maximize")
    for i, (key, rid) in enumerate((k, v) for k, v in ids.items() if k != "parent"):
        t = study.ask({"objective.beta": optuna.distributions.FloatDistribution(0.01, 1, log=True),
                       "algorithm.clip_eps_high": optuna.distributions.FloatDistribution(0.1, 0.4)})  # fmt: skip
        t.set_user_attr("mlflow_run_ids", [rid])
        study.tell(t, 0.1 * i + (0.05 if key.startswith("forward") else 0.0))
    parent = Tracker(run_name="st-abc123", tracking_uri=uri, kind=RunKind.TUNE,
                     tags={"rpg.study": "st-abc123", "rpg.optuna_storage": str(journal)})  # fmt: skip
    parent.finish()
    d = load(study="st-abc123", tracking_uri=uri)
    assert d.study is not None and len(d.runs) == 6 and d.runs["trial"].notna().all()
    assert d.parent["run_id"] == parent.run_id
    names = [n for n, _ in views.study_figures(d)]
    assert names == ["optimization_history", "param_importances", "slice", "contour"]
    trials = views.trials_table(d, "http://127.0.0.1:5000")
    assert trials["number"].tolist() == list(range(6)) and trials["state"].eq("COMPLETE").all()
    assert trials["links"].iloc[0] == f"http://127.0.0.1:5000/#/runs/{trials['runs'].iloc[0]}"
    # values 0.1 i (+ 0.05 for forward): i = 5 is reverse-s2 (0.5), i = 4 forward-s2 (0.45)
    assert trials["value"].max() == pytest.approx(0.5)


def test_the_png_page_loads_nothing_from_another_host():
    """kaleido draws the PNGs in Chromium from a page of script tags: plotly.js from the installed package and,
    by default, MathJax from a CDN. The report's page has no URL but file:// ones."""
    from dashboards.report import png_page

    page = png_page().generate_index()
    srcs = re.findall(r"""src=["']([^"']+)""", page)
    assert srcs and all(u.startswith("file://") for u in srcs), srcs
    assert "http://" not in page and "https://" not in page


def test_stability_by_hand():
    # two configurations: g1 (runs a, b), g2 (run c, FAILED)
    #   a: entropy 1.0 -> 0.05 (ratio 0.05 < 0.1: collapsed); k3 NaN at step 2 (a NaN KL estimate: counted)
    #   b: entropy 1.0 -> 0.5 (ratio 0.5)
    #   c: entropy 2.0 -> 1.0 (ratio 0.5); length cap 0.0 at steps 1-2, 0.3 at step 3 (last third: steps >= 2: 0.15)
    # g1: runs 2, failed 0, nan 1, collapsed 1, ratio mean (0.05 + 0.5) / 2 = 0.275; g2: 1, 1, 0, 0, 0.5, 0.15
    from dashboards.data import Data

    runs = pd.DataFrame({"run_id": list("abc"), "group": ["g1", "g1", "g2"], "label": ["G1", "G1", "G2"],
                         "seed": [0, 1, 0], "status": ["FINISHED", "FINISHED", "FAILED"]})  # fmt: skip
    rows = [("a", "actor/entropy", 1, 1.0), ("a", "actor/entropy", 3, 0.05), ("a", "actor/kl_k3", 2, float("nan")),
            ("b", "actor/entropy", 1, 1.0), ("b", "actor/entropy", 3, 0.5),
            ("c", "actor/entropy", 1, 2.0), ("c", "actor/entropy", 3, 1.0),
            *[("c", "response_length/clip_frac", s, v) for s, v in ((1, 0.0), (2, 0.0), (3, 0.3))]]  # fmt: skip
    hist = pd.DataFrame([(*r, 0) for r in rows], columns=["run_id", "key", "step", "value", "timestamp"])
    t = views.stability_table(Data("t", "runs", runs, hist)).set_index("label")
    assert t.loc["G1", ["runs", "failed", "nan", "entropy_collapsed"]].tolist() == [2, 0, 1, 1]
    assert t.loc["G2", ["runs", "failed", "nan", "entropy_collapsed"]].tolist() == [1, 1, 0, 0]
    assert t.at["G1", "entropy_ratio"] == pytest.approx(0.275) and t.at["G2", "entropy_ratio"] == pytest.approx(0.5)
    assert t.at["G2", "length_cap"] == pytest.approx(0.15) and pd.isna(t.at["G1", "length_cap"])


def test_rpg_report_refuses_bad_arguments_with_one_line(store, tmp_path, capsys):
    from rpg_core.cli import main

    uri, _ = store
    cases = [
        ([], "rpg report: give exactly one of --sweep, --runs, --study (got none)"),
        (["--sweep", SWEEP, "--study", "x"], "rpg report: give exactly one of --sweep, --runs, --study (got --sweep, --study)"),
        (["--sweep", "nope"], "rpg report: sweep: no training runs tagged sweep='nope' in " + uri + "; sweeps there: dash"),
        (["--sweep", SWEEP, "--by", "colour"], "rpg report: --by: 'colour' is not a design axis; allowed: label, group, "
                                               "seed, divergence, direction"),
        (["--sweep", SWEEP, "--metric", "loss/nope"], "rpg report: --metric: 'loss/nope' was not logged by these runs"),
        (["--sweep", SWEEP, "--baseline", "GRPO"], "rpg report: baseline: 'GRPO' is not a label of sweep dash; "
                                                   "allowed: UFKL, URKL"),
    ]  # fmt: skip
    for args, message in cases:
        code = main(["report", *args, "--tracking-uri", uri, "--out", str(tmp_path / "r"), "--no-png", "--no-log"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(message) and "\n" not in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "r" / "index.html").exists()  # nothing written for a refused report


def test_the_headline_is_a_benchmarks_mean_at_k_when_runs_logged_one():
    # the schema's template eval/{bench}/mean_at_{k} (spec §8) ranks first; then held-out accuracy; then the reward
    from dashboards.data import Data

    runs = pd.DataFrame({"run_id": ["a"], "group": ["g"], "label": ["G"], "seed": [0], "status": ["FINISHED"]})

    def data(*keys):
        hist = pd.DataFrame([("a", k, 1, 0.5, 0) for k in keys], columns=["run_id", "key", "step", "value", "timestamp"])
        return Data("t", "runs", runs, hist)

    d = data("reward/mean", "eval/acc_strict", "eval/amc23/mean_at_32", "eval/aime24/mean_at_32", "eval/aime24/pass_at_32")
    assert d.headline == "eval/aime24/mean_at_32"
    assert d.metrics[:3] == ["eval/aime24/mean_at_32", "eval/amc23/mean_at_32", "eval/acc_strict"]
    assert views.paper_table(d, reps=10).cells.columns.get_level_values("metric").unique().tolist() == [
        "eval/aime24/mean_at_32", "eval/amc23/mean_at_32"]  # the table's columns: every benchmark's Mean@k
    assert data("reward/mean", "eval/acc_strict").headline == "eval/acc_strict"
    assert data("reward/mean", "undeclared/thing").headline == "reward/mean"
