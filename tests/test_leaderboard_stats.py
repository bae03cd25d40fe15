"""Statistics in the leaderboard (issue 17, items 1-3): ci95 of every aggregate, paired comparison with a
baseline, ranks across suites with the Friedman/Nemenyi tests and the critical-difference diagram. Expected
values come from scipy on the runs' own values (read back from MLflow), never from clbench.analysis.stats itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from test_leaderboard import HASH_A, make_store, png_images
from typer.testing import CliRunner

from clbench.analysis import leaderboard as lb
from clbench.analysis.report import render
from clbench.cli import app

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000_000


def t_half_width(values: list[float]) -> float:
    x = np.asarray(values, dtype=float)
    return float(sps.t.ppf(0.975, len(x) - 1) * sps.sem(x))


# --- the quickstart: three seeds of lora and eblora, through the CLI ----------------------------------------

@pytest.mark.slow
def test_quickstart_json_ci95_and_vs_baseline_equal_scipy(tmp_path, monkeypatch):
    """Reduced quickstart (random backbone, 2 tasks, 3 steps an epoch): `clbench leaderboard quickstart --format
    json --baseline lora` against scipy's t interval and ttest_rel on the final/acc values MLflow holds.

    Slow (six runs: about 50 s of CPU); test_vs_baseline_is_paired_by_seed checks the same against scipy on a
    hand-written store in seconds."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(ROOT / "suites" / "quickstart.yaml"), "-m", "lora", "-m", "eblora",
                              "--set", "seeds=[0,1,2]", "--set", "train.epochs=1", "--set",
                              "train.max_steps_per_epoch=3", "--set", "stream.num_tasks=2", "--set",
                              "backbone.pretrained=false", "--set", "runtime.device=cpu",
                              "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.exit_code == 0, res.output
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("quickstart")
    acc: dict[str, dict[int, float]] = {}
    for run in client.search_runs([exp.experiment_id], "tags.`clbench.role` = 'child'"):
        assert run.info.status == "FINISHED"
        acc.setdefault(run.data.tags["clbench.method"], {})[int(run.data.tags["clbench.seed"])] = \
            run.data.metrics["final/acc"]
    assert {m: sorted(s) for m, s in acc.items()} == {"lora": [0, 1, 2], "eblora": [0, 1, 2]}

    res = runner.invoke(app, ["leaderboard", "quickstart", "--format", "json", "--baseline", "lora"])
    assert res.exit_code == 0, res.output
    [group] = json.loads(res.stdout)["groups"]
    rows = {r["method"]: r for r in group["rows"]}
    for method, by_seed in acc.items():
        got = rows[method]["metrics"]["final/acc"]
        assert got["n"] == 3 and got["mean"] == pytest.approx(np.mean(list(by_seed.values())), abs=1e-9)
        assert got["ci95"] == pytest.approx(t_half_width(list(by_seed.values())), abs=1e-9)
    a = [acc["eblora"][s] for s in (0, 1, 2)]
    b = [acc["lora"][s] for s in (0, 1, 2)]
    d = np.subtract(a, b)
    vs = rows["eblora"]["vs_baseline"]["final/acc"]
    assert vs["n"] == 3 and vs["diff"] == pytest.approx(d.mean(), abs=1e-9)
    if np.all(d == d[0]):  # identical differences: no variance, scipy's t is infinite or undefined
        assert vs["ci95"] == 0.0
    else:
        assert vs["ci95"] == pytest.approx(t_half_width(list(d)), abs=1e-9)
        assert vs["p"] == pytest.approx(sps.ttest_rel(a, b).pvalue, abs=1e-12)
    assert rows["lora"]["vs_baseline"] is None and group["baseline"] == "lora"

    table = runner.invoke(app, ["leaderboard", "quickstart", "--baseline", "lora"]).stdout
    # the terminal table names final/acc "acc" and spells the short names out in its legend
    assert "acc vs lora" in table and "baseline" in table and "final/acc" in table


# --- a hand-written store: paired comparison ----------------------------------------------------------------

@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("lbs")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    make_store(uri, folder / "artifacts")
    return uri


def test_vs_baseline_is_paired_by_seed(bench):
    groups = lb.build("bench", bench, baseline="lora")
    a = next(g for g in groups if g.suite_hash == HASH_A)
    rows = {r.method: r for r in a.rows}
    # olora 60/66/63 against lora 70/72/74 (seeds 0/1/2); the superseded lora seed-0 run (10) is not used
    olora = rows["olora"].vs_baseline["final/acc"]
    assert olora["n"] == 3 and olora["diff"] == pytest.approx(-9.0)
    assert olora["p"] == pytest.approx(sps.ttest_rel([60, 66, 63], [70, 72, 74]).pvalue)
    assert olora["ci95"] == pytest.approx(t_half_width([-10, -6, -11]))
    # inflora finished seeds 0 and 1 only (seed 2 FAILED): two pairs
    inflora = rows["inflora"].vs_baseline["final/acc"]
    assert inflora["n"] == 2 and inflora["p"] == pytest.approx(sps.ttest_rel([80, 84], [70, 72]).pvalue)
    assert rows["eblora"].vs_baseline["final/acc"] == {"diff": None, "ci95": None, "p": None, "n": 0,
                                                          "zero_variance": False}
    assert rows["lora"].vs_baseline is None
    header, body = lb.table_cells(a)
    col = header.index("final/acc vs lora")
    cells = {b[1]: b[col] for b in body}
    p = sps.ttest_rel([60, 66, 63], [70, 72, 74]).pvalue
    assert p >= 0.01 and cells["olora"] == f"-9.00 ± {t_half_width([-10, -6, -11]):.2f} (p={p:.2f})"
    assert cells["lora"] == "baseline" and cells["eblora"] == "-"


def test_html_marks_significant_differences_and_counts_comparisons(bench):
    groups = lb.build("bench", bench, baseline="lora")
    text = render(groups, "html")
    a = text[text.index(HASH_A):]
    a = a[:a.index("</section>")]
    # 3 methods x 7 seed-dependent metrics; eblora has no pairs and inflora no spectra/mean_overlap variance...
    # count the comparisons with a p-value by hand from the rows
    rows = next(g for g in groups if g.suite_hash == HASH_A).rows
    specs = [m for m in lb.METRICS if m.show_std]
    with_p = [(r.method, m.key) for r in rows if r.vs_baseline for m in specs if r.vs_baseline[m.key]["p"] is not None]
    sig = [(mth, k) for mth, k in with_p if next(r for r in rows if r.method == mth).vs_baseline[k]["p"] < 0.05]
    assert f"{len(with_p)} comparisons were made" in a and f"{len(sig)} are significant at 0.05" in a
    assert a.count("class=sig") >= len(sig) > 0
    # the other hash has only lora: the baseline itself, nothing to compare, no comparison section
    b = text[text.index("bbbbbbbbbbbb"):]
    assert "comparisons were made" not in b[:b.index("</section>")]


def test_unknown_baseline_and_all_with_suites_are_one_line_errors(bench, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", bench)
    runner = CliRunner()
    res = runner.invoke(app, ["leaderboard", "bench", "--baseline", "nosuch"])
    assert res.exit_code == 1 and "--baseline nosuch" in res.output and "olora" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["leaderboard", "bench", "--all"])
    assert res.exit_code == 1 and "--all" in res.output


def test_csv_has_ci95_columns(bench):
    import csv
    import io

    groups = lb.build("bench", bench)
    rows = list(csv.DictReader(io.StringIO(lb.render(groups, "csv"))))
    lora = next(r for r in rows if r["suite_hash"] == HASH_A and r["method"] == "lora")
    assert float(lora["final/acc_ci95"]) == pytest.approx(t_half_width([70, 72, 74]))
    single = lb.build("other", bench)  # one seed per row: no interval
    other = list(csv.DictReader(io.StringIO(lb.render(single, "csv"))))
    assert all(r["final/acc_ci95"] == "" for r in other)


def test_csv_has_the_json_s_vs_baseline(bench):
    import csv
    import io

    groups = lb.build("bench", bench, baseline="lora")
    rows = {(r["suite_hash"], r["method"]): r for r in csv.DictReader(io.StringIO(lb.render(groups, "csv")))}
    data = json.loads(lb.render(groups, "json"))
    a = next(g for g in data["groups"] if g["suite_hash"] == HASH_A)
    for row in a["rows"]:
        line = rows[(HASH_A, row["method"])]
        assert line["baseline"] == "lora"
        for key in lb.METRIC_KEYS:
            want = (row["vs_baseline"] or {}).get(key) or {}
            got = {f: line[f"{key}_vs_baseline_{f}"] for f in lb.PAIRED_FIELDS}
            assert got == {f: "" if want.get(f) is None else str(want[f]) if f == "n" else repr(want[f])
                           for f in lb.PAIRED_FIELDS}, (row["method"], key)
    olora = rows[(HASH_A, "olora")]
    assert float(olora["final/acc_vs_baseline_diff"]) == pytest.approx(-9.0)
    assert float(olora["final/acc_vs_baseline_p"]) == pytest.approx(sps.ttest_rel([60, 66, 63], [70, 72, 74]).pvalue)
    assert olora["final/acc_vs_baseline_n"] == "3" and rows[(HASH_A, "lora")]["final/acc_vs_baseline_diff"] == ""
    plain = list(csv.DictReader(io.StringIO(lb.render(lb.build("bench", bench), "csv"))))
    assert all(r["baseline"] == "" and r["final/acc_vs_baseline_diff"] == "" for r in plain)


# --- several suites: ranks, Friedman, Nemenyi, the diagram --------------------------------------------------

# final/acc per suite (experiment) and method, seeds 0 and 1 (the mean is what is ranked)
SUITES = {
    "s1": {"a": (80, 82), "b": (70, 72), "c": (60, 60), "d": (90, 90)},
    "s2": {"a": (75, 75), "b": (76, 78), "c": (50, 52), "d": (10, 10)},
    "s3": {"a": (66, 68), "b": (60, 62), "c": (61, 63)},
    "s4": {"a": (90, 92), "b": (85, 85), "c": (70, 72)},
}


def write_suites(uri: str, folder: Path, suites: dict[str, dict[str, tuple[float, ...]]]) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for k, (suite, methods) in enumerate(suites.items()):
        exp = client.create_experiment(suite, artifact_location=(folder / suite).as_uri())
        for method, values in methods.items():
            for seed, v in enumerate(values):
                t = T0 + 1000 * k
                tags = {"clbench.suite": suite, "clbench.suite_hash": f"{suite:0>12}", "clbench.method": method,
                        "clbench.method_name": method, "clbench.seed": str(seed), "clbench.role": "child"}
                run = client.create_run(exp, start_time=t, run_name=f"{method}-s{seed}", tags=tags)
                client.log_batch(run.info.run_id, metrics=[Metric("final/acc", float(v), t, 0),
                                                           Metric("final/forgetting", 100.0 - v, t, 0)])
                client.set_terminated(run.info.run_id, "FINISHED", end_time=t + 1)


@pytest.fixture(scope="module")
def suites(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("suites")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    write_suites(uri, folder / "artifacts", SUITES)
    return uri


def test_ranks_across_suites_equal_scipy(suites):
    names = ["s1", "s2", "s3", "s4"]
    groups = lb.build(names, suites)
    ranks = lb.rank_suites(groups)
    rk = ranks.ranking
    assert rk.methods == ["a", "b", "c"] and ranks.left_out_methods == ["d"]  # d is not in s3 and s4
    assert sorted(rk.suites) == names
    means = np.array([[np.mean(SUITES[s][m]) for s in rk.suites] for m in rk.methods])
    want = sps.rankdata(-means, axis=0)
    np.testing.assert_array_equal(rk.ranks, want)
    np.testing.assert_allclose(rk.avg_rank, want.mean(axis=1))
    res = sps.friedmanchisquare(*want)
    assert rk.friedman_stat == pytest.approx(res.statistic) and rk.friedman_p == pytest.approx(res.pvalue)
    q = sps.studentized_range.ppf(0.95, 3, np.inf) / math.sqrt(2)
    assert rk.cd == pytest.approx(q * math.sqrt(3 * 4 / (6 * 4)))
    data = json.loads(lb.render(groups, "json"))
    assert data["ranking"]["avg_rank"] == pytest.approx(dict(zip(rk.methods, want.mean(axis=1))))
    assert data["ranking"]["left_out"]["methods"] == ["d"]
    text = lb.render(groups, "table")
    assert "ranks across suites by final/acc" in text and "average rank" in text and "Friedman chi2" in text
    md = lb.render(groups, "markdown")
    assert "### Ranks across suites by `final/acc`" in md


def test_csv_has_the_json_s_ranking(suites):
    import csv
    import io

    names = ["s1", "s2", "s3", "s4"]
    groups = lb.build(names, suites)
    ranking = json.loads(lb.render(groups, "json"))["ranking"]
    lines = list(csv.DictReader(io.StringIO(lb.render(groups, "csv"))))
    assert len(lines) == 14  # 4 methods in s1 and s2, 3 in s3 and s4
    for line in lines:
        assert line["rank_metric"] == "final/acc"
        assert float(line["friedman_p"]) == pytest.approx(ranking["friedman"]["p"])
        assert float(line["nemenyi_cd"]) == pytest.approx(ranking["nemenyi"]["cd"])
        if line["method"] == "d":  # left out of the ranking (not in every suite)
            assert line["suite_rank"] == line["avg_rank"] == ""
            continue
        i, j = ranking["methods"].index(line["method"]), ranking["suites"].index(line["suite"])
        assert float(line["suite_rank"]) == ranking["ranks"][i][j]
        assert float(line["avg_rank"]) == pytest.approx(ranking["avg_rank"][line["method"]])
    single = list(csv.DictReader(io.StringIO(lb.render(lb.build(["s1"], suites), "csv"))))
    assert all(r["rank_metric"] == r["avg_rank"] == "" for r in single)  # one suite: nothing ranked across


def test_lower_is_better_metrics_rank_ascending(suites):
    groups = lb.build(["s1", "s2", "s3"], suites, sort="forgetting")
    rk = lb.rank_suites(groups).ranking
    acc = lb.rank_suites(lb.build(["s1", "s2", "s3"], suites)).ranking
    np.testing.assert_array_equal(rk.ranks, acc.ranks)  # forgetting = 100 - acc: the same order


def test_identical_rankings_give_strict_json(tmp_path):
    """Every suite ranks the methods the same way: Iman-Davenport's F is infinite; the JSON stays strict."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    same = {s: {"a": (90, 91), "b": (80, 81), "c": (70, 71)} for s in ("x1", "x2", "x3")}
    write_suites(uri, tmp_path / "artifacts", same)
    groups = lb.build(None, uri)
    assert math.isinf(lb.rank_suites(groups).ranking.iman_davenport_f)
    text = lb.render(groups, "json")
    assert "Infinity" not in text and "NaN" not in text
    data = json.loads(text)
    assert data["ranking"]["iman_davenport"] == {"f": None, "p": 0.0}


def test_html_has_average_ranks_and_the_cd_diagram_from_three_suites(suites):
    two = render(lb.build(["s1", "s2"], suites), "html")
    assert "Ranks across suites" in two and "cd-diagram" not in two  # two suites: ranks, no diagram
    three = render(lb.build(["s1", "s2", "s3"], suites), "html")
    assert "Ranks across suites" in three and "average rank" in three and "id='cd-diagram'" in three
    images = png_images(three)
    assert len(images) >= 1 and all(img.startswith(b"\x89PNG") for img in images)
    one = render(lb.build(["s1"], suites), "html")
    assert "Ranks across suites" not in one


def test_all_flag_ranks_every_experiment(suites, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", suites)
    res = CliRunner().invoke(app, ["leaderboard", "--all", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert sorted(json.loads(res.stdout)["ranking"]["suites"]) == ["s1", "s2", "s3", "s4"]


def test_p_values_print_alike_in_every_table():
    """Two decimals (a column of them lines up: 0.50, not 0.5), three below 0.01, and a floor at 0.001."""
    from clbench.analysis.stats import fmt_p

    assert [fmt_p(p) for p in (0.5, 0.123, 0.9, 0.0456, 0.004, 0.0004)] == [
        "p=0.50", "p=0.12", "p=0.90", "p=0.05", "p=0.004", "p<0.001"]
