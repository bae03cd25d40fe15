"""The leaderboard against a real (temporary sqlite) MLflow store written with MlflowClient the way the runner
writes it: several methods, three seeds, a failed and an unfinished run, a superseded rerun, two suite hashes.
Expected aggregates are computed by hand from the literal values below."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clbench.analysis import leaderboard as lb
from clbench.cli import app
from clbench.errors import ClbenchError

HASH_A, HASH_B, HASH_C = "aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"

# (experiment, suite hash, method label, rank param, seed, status, start offset, final metrics, history)
# final metrics: acc, avg_acc, forgetting, bwt, acc_til; history: eval/acc, top1_share, overlap per task.
T1 = {"spectra/mean_top1_share": None}
RUNS = [
    # hash A: lora, three seeds; acc 70/72/74, forgetting 10/14/12, avg 80/81/82, bwt -10/-14/-12, til 90/90/93
    ("bench", HASH_A, "lora", 4, 0, "FINISHED", 10, (70, 80, 10, -10, 90), ([90, 70], [0.5, 0.7], [0.2])),
    ("bench", HASH_A, "lora", 4, 1, "FINISHED", 11, (72, 81, 14, -14, 90), ([92, 72], [0.6, 0.8], [0.4])),
    ("bench", HASH_A, "lora", 4, 2, "FINISHED", 12, (74, 82, 12, -12, 93), ([94, 74], [0.7, 0.9], [0.6])),
    # an older run of lora seed 0 (same protocol and params): superseded by the run above, never averaged
    ("bench", HASH_A, "lora", 4, 0, "FINISHED", 1, (10, 10, 90, -90, 10), ([10, 10], [0.1, 0.1], [0.9])),
    # olora: acc 60/66/63
    ("bench", HASH_A, "olora", 4, 0, "FINISHED", 13, (60, 70, 20, -20, 85), ([80, 60], [0.3, 0.3], [0.1])),
    ("bench", HASH_A, "olora", 4, 1, "FINISHED", 14, (66, 70, 20, -20, 85), ([80, 66], [0.3, 0.3], [0.1])),
    ("bench", HASH_A, "olora", 4, 2, "FINISHED", 15, (63, 70, 20, -20, 85), ([80, 63], [0.3, 0.3], [0.1])),
    # inflora: acc 80/84 finished, seed 2 failed after logging a value that must not be averaged in
    ("bench", HASH_A, "inflora", 4, 0, "FINISHED", 16, (80, 85, 5, -5, 95), ([95, 80], [0.4, 0.4], [0.0])),
    ("bench", HASH_A, "inflora", 4, 1, "FINISHED", 17, (84, 85, 5, -5, 95), ([95, 84], [0.4, 0.4], [0.0])),
    ("bench", HASH_A, "inflora", 4, 2, "FAILED", 18, (1, 1, 99, -99, 1), ([1, 1], [0.99, 0.99], [0.99])),
    # eblora: still running, nothing finished
    ("bench", HASH_A, "eblora", 4, 0, "RUNNING", 19, None, ([50], [0.5], [])),
    # hash B (another protocol in the same experiment): lora 50/52/54, never mixed with hash A
    ("bench", HASH_B, "lora", 4, 0, "FINISHED", 20, (50, 60, 30, -30, 70), ([60, 50], [0.5, 0.5], [0.5])),
    ("bench", HASH_B, "lora", 4, 1, "FINISHED", 21, (52, 60, 30, -30, 70), ([60, 52], [0.5, 0.5], [0.5])),
    ("bench", HASH_B, "lora", 4, 2, "FINISHED", 22, (54, 60, 30, -30, 70), ([60, 54], [0.5, 0.5], [0.5])),
    # another experiment: two configurations under one label (an edited suite) stay apart
    ("other", HASH_C, "lora", 4, 0, "FINISHED", 30, (40, 50, 1, -1, 60), ([50, 40], [0.5, 0.5], [0.5])),
    ("other", HASH_C, "lora", 8, 0, "FINISHED", 31, (45, 50, 1, -1, 60), ([50, 45], [0.5, 0.5], [0.5])),
]
# cost metrics per method (the same for every seed, except train seconds)
COST = {"lora": (4226.0, 1000.0), "olora": (8452.0, 900.0), "inflora": (3000.0, 1100.0), "eblora": (4226.0, 1000.0)}
T0 = 1_800_000_000_000


def make_store(uri: str, artifacts: Path) -> dict[str, str]:
    """Write the runs above to the (new) store at ``uri``; return the experiment ids by name."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exps = {name: client.create_experiment(name, artifact_location=(artifacts / name).as_uri())
            for name in ("bench", "other")}
    parent = client.create_run(exps["bench"], start_time=T0, run_name="bench",
                               tags={"clbench.role": "parent", "clbench.suite_hash": HASH_A})
    client.log_batch(parent.info.run_id, metrics=[Metric("final/acc", 1.0, T0, 0)])  # parents are not rows
    client.set_terminated(parent.info.run_id, "FINISHED")
    for exp, h, label, rank, seed, status, offset, final, hist in RUNS:
        t = T0 + offset * 1000
        tags = {"clbench.suite": exp, "clbench.suite_hash": h, "clbench.method": label,
                "clbench.method_name": label, "clbench.seed": str(seed), "clbench.version": "0.1.0",
                "clbench.git_sha": "abcdef1234567890", "clbench.device": "cpu (test)", "clbench.role": "child",
                "mlflow.parentRunId": parent.info.run_id}
        run = client.create_run(exps[exp], start_time=t, run_name=f"{label}-s{seed}", tags=tags)
        params = {"seed": seed, "method.name": label, "method.label": label, "method.params.rank": rank,
                  "train.epochs": 2}
        metrics = []
        acc_hist, t1_hist, ov_hist = hist
        for step, v in enumerate(acc_hist):
            metrics.append(Metric("eval/acc", v, t, step))
            metrics.append(Metric("eval/acc/task_00", v, t, step))
        metrics += [Metric("spectra/top1_share", v, t, step) for step, v in enumerate(t1_hist)]
        metrics += [Metric("spectra/overlap", v, t, step + 1) for step, v in enumerate(ov_hist)]
        if final:
            keys = ("final/acc", "final/avg_acc", "final/forgetting", "final/bwt", "final/acc_til")
            metrics += [Metric(key, v, t, 1) for key, v in zip(keys, final)]
            params_count, img_s = COST[label]
            metrics += [Metric("cost/trainable_params", params_count * rank / 4, t, 1),
                        Metric("cost/img_per_s", img_s, t, 1), Metric("cost/peak_mem_mb", 512.0, t, 1),
                        Metric("cost/train_seconds", 10.0 + seed, t, 1)]
            # the recorder's means over tasks, under their own keys (the leaderboard reads these, not the history)
            metrics.append(Metric("spectra/mean_top1_share", sum(t1_hist) / len(t1_hist), t, 1))
            if ov_hist:
                metrics.append(Metric("spectra/mean_overlap", sum(ov_hist) / len(ov_hist), t, 1))
        client.log_batch(run.info.run_id, metrics=metrics,
                         params=[Param(key, str(v)) for key, v in params.items()])
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status, end_time=t + 500)
    return exps


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp("lb")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    make_store(uri, folder / "artifacts")
    return uri, folder / "mlflow.db"


@pytest.fixture(scope="module")
def groups(store):
    uri, _ = store
    return lb.build("bench", uri)


def by_method(group: lb.Group) -> dict[str, lb.Row]:
    return {r.method: r for r in group.rows}


def test_suite_hashes_are_never_mixed(groups):
    assert [(g.experiment, g.suite_hash) for g in groups] == [("bench", HASH_B), ("bench", HASH_A)]
    a, b = groups[1], groups[0]
    assert b.rows[0].metrics["final/acc"].mean == pytest.approx(52.0)
    assert b.rows[0].n == 3 and [r.method for r in b.rows] == ["lora"]
    assert by_method(a)["lora"].metrics["final/acc"].mean == pytest.approx(72.0)


def test_aggregates_equal_hand_computed_values(groups):
    rows = by_method(groups[1])
    lora, olora, inflora = rows["lora"], rows["olora"], rows["inflora"]
    m = lora.metrics
    assert (m["final/acc"].mean, m["final/acc"].std, m["final/acc"].n) == pytest.approx((72.0, 2.0, 3))
    assert (m["final/avg_acc"].mean, m["final/avg_acc"].std) == pytest.approx((81.0, 1.0))
    assert (m["final/forgetting"].mean, m["final/forgetting"].std) == pytest.approx((12.0, 2.0))
    assert (m["final/bwt"].mean, m["final/bwt"].std) == pytest.approx((-12.0, 2.0))
    assert (m["final/acc_til"].mean, m["final/acc_til"].std) == pytest.approx((91.0, math.sqrt(3.0)))
    # top1_share: mean over tasks per run (0.6, 0.7, 0.8), then over seeds
    assert (m["spectra/mean_top1_share"].mean, m["spectra/mean_top1_share"].std) == pytest.approx((0.7, 0.1))
    # overlap: one task with an overlap per run here (0.2, 0.4, 0.6)
    assert (m["spectra/mean_overlap"].mean, m["spectra/mean_overlap"].std) == pytest.approx((0.4, 0.2))
    assert (m["cost/train_seconds"].mean, m["cost/train_seconds"].std) == pytest.approx((11.0, 1.0))
    assert m["cost/trainable_params"].mean == 4226.0 and m["cost/trainable_params"].std == 0.0
    assert lora.seeds == [0, 1, 2]
    assert (olora.metrics["final/acc"].mean, olora.metrics["final/acc"].std) == pytest.approx((63.0, 3.0))
    assert olora.metrics["spectra/mean_top1_share"].mean == pytest.approx(0.3)
    assert olora.metrics["spectra/mean_overlap"].mean == pytest.approx(0.1)
    # inflora: the failed seed 2 (acc 1, forgetting 99) is not averaged in
    assert inflora.n == 2 and inflora.seeds == [0, 1]
    assert (inflora.metrics["final/acc"].mean, inflora.metrics["final/acc"].std) == pytest.approx(
        (82.0, 2.0 * math.sqrt(2.0)))
    assert inflora.metrics["final/forgetting"].mean == pytest.approx(5.0)
    assert [s.mean for s in lora.curve] == pytest.approx([92.0, 72.0])
    assert lora.provenance == {"version": ["0.1.0"], "git_sha": ["abcdef1234567890"], "device": ["cpu (test)"],
                               "precision": [], "runtime": []}


def test_failed_unfinished_and_superseded_runs_are_listed_not_averaged(groups):
    g = groups[1]
    listed = {(u["method"], u["seed"], u["status"]) for u in g.unfinished}
    assert listed == {("inflora", 2, "FAILED"), ("eblora", 0, "RUNNING")}
    eblora = by_method(g)["eblora"]
    assert eblora.n == 0 and eblora.metrics["final/acc"].mean is None
    lora = by_method(g)["lora"]
    assert len(lora.superseded) == 1 and lora.n == 3
    assert lora.metrics["final/acc"].mean == pytest.approx(72.0)  # not (10 + 70 + 72 + 74) / 4
    text = lb.render([g], "table")
    assert "inflora seed 2 FAILED" in text and "eblora seed 0 RUNNING" in text


def test_sorted_best_first_in_the_key_direction(store):
    uri, _ = store
    g = lb.build("bench", uri)[1]
    assert [r.method for r in g.rows] == ["inflora", "lora", "olora", "eblora"]  # acc 82, 72, 63, none
    g = lb.build("bench", uri, sort="forgetting")[1]
    assert [r.method for r in g.rows] == ["inflora", "lora", "olora", "eblora"]  # 5, 12, 20: lower first
    g = lb.build("bench", uri, sort="cost/trainable_params")[1]
    assert [r.method for r in g.rows][:3] == ["inflora", "lora", "olora"]
    g = lb.build("bench", uri, sort="method")[1]
    assert [r.method for r in g.rows] == ["eblora", "inflora", "lora", "olora"]
    with pytest.raises(ClbenchError, match="--sort"):
        lb.build("bench", uri, sort="nonsense")


def test_configurations_under_one_label_stay_apart(store):
    uri, _ = store
    (g,) = lb.build("other", uri)
    assert len(g.rows) == 2 and all(r.method.startswith("lora [") and r.n == 1 for r in g.rows)
    assert sorted(r.metrics["final/acc"].mean for r in g.rows) == [40.0, 45.0]


def test_every_experiment_without_a_target(store):
    uri, _ = store
    groups = lb.build(None, uri)
    assert [(g.experiment, g.suite_hash) for g in groups] == [("bench", HASH_B), ("bench", HASH_A),
                                                              ("other", HASH_C)]


def test_csv_parses_and_matches(groups):
    rows = list(csv.DictReader(io.StringIO(lb.render(groups, "csv"))))
    assert len(rows) == 5  # hash B: lora; hash A: inflora, lora, olora, eblora
    lora_a = next(r for r in rows if r["suite_hash"] == HASH_A and r["method"] == "lora")
    assert float(lora_a["final/acc_mean"]) == pytest.approx(72.0)
    assert float(lora_a["final/acc_std"]) == pytest.approx(2.0) and lora_a["n"] == "3"
    assert lora_a["seeds"] == "0;1;2" and lora_a["device"] == "cpu (test)"
    inflora = next(r for r in rows if r["method"] == "inflora")
    assert "seed 2 FAILED" in inflora["not_averaged"]
    eblora = next(r for r in rows if r["method"] == "eblora")
    assert eblora["n"] == "0" and eblora["final/acc_mean"] == "" and "RUNNING" in eblora["not_averaged"]


def test_json_parses_and_matches(groups):
    data = json.loads(lb.render(groups, "json"))
    a = next(g for g in data["groups"] if g["suite_hash"] == HASH_A)
    rows = {r["method"]: r for r in a["rows"]}
    # ci95 = t(0.975, 2) * 3 / sqrt(3), t(0.975, 2) = 4.302653 (tables)
    assert rows["olora"]["metrics"]["final/acc"] == pytest.approx(
        {"mean": 63.0, "std": 3.0, "n": 3, "ci95": 4.302653 * 3.0 / math.sqrt(3)})
    assert rows["eblora"]["metrics"]["final/acc"] == {"mean": None, "std": None, "n": 0, "ci95": None}
    assert "vs_baseline" not in data and rows["olora"]["vs_baseline"] is None
    assert {u["status"] for u in a["unfinished"]} == {"FAILED", "RUNNING"}
    assert [r["seed"] for r in rows["lora"]["runs"]] == [0, 1, 2]


def test_markdown_rows_parse(groups):
    lines = [ln for ln in lb.render(groups, "markdown").splitlines() if ln.startswith("|")]
    tables, current = [], []
    for ln in lines:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if cells[0] == "#":
            current = []
            tables.append(current)
        current.append(cells)
    assert len(tables) == 2
    for t in tables:
        assert all(len(r) == len(t[0]) for r in t)
        assert set(t[1][0]) <= set("-:")
    header, rows = tables[1][0], tables[1][2:]
    acc = header.index("final/acc")  # every column under the MLflow key it reads
    # mean ± t(0.975, n-1) sd / sqrt(n) (n): t(0.975, 1) = 12.7062, t(0.975, 2) = 4.302653
    assert [(r[1], r[acc]) for r in rows] == [("inflora", "82.00 ± 25.41"), ("lora", "72.00 ± 4.97"),
                                              ("olora", "63.00 ± 7.45"), ("eblora", "-")]


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))
        self._in_td = tag == "td"

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)


def png_images(html_text: str) -> list[bytes]:
    p = _Images()
    p.feed(html_text)
    prefix = "data:image/png;base64,"
    return [base64.b64decode(s[len(prefix):]) for s in p.srcs if s.startswith(prefix)]


def test_html_report_is_self_contained_with_plots(groups):
    from clbench.analysis.report import render

    text = render(groups, "html")
    assert "http://" not in text and "https://" not in text and "<script" not in text
    images = png_images(text)
    # hash A: pareto, imbalance-vs-forgetting, curves; hash B the same (three runs of one method)
    assert len(images) == 6 and all(img.startswith(b"\x89PNG") and len(img) > 2000 for img in images)
    p = _Images()
    p.feed(text)
    assert "72.00 ± 4.97" in p.cells and "inflora" in p.cells


def test_pareto_front():
    from clbench.analysis.report import pareto_front

    # (cost, acc): 1 dominates 3 (cheaper and better); 0, 1, 2 trade off
    assert pareto_front([(1.0, 50.0), (2.0, 70.0), (5.0, 80.0), (3.0, 60.0)]) == [0, 1, 2]


def test_log_report_puts_the_html_on_the_parent(store):
    from clbench.analysis.report import log_report

    uri, _ = store
    logged = {}

    class Tracker:
        def __init__(self):
            self.uri = uri

        def log_artifacts(self, run_id, folder, artifact_path=None):
            logged[run_id] = {p.name: p.read_text() for p in Path(folder).iterdir()}

    assert log_report(Tracker(), "parent-id", "bench", HASH_A)
    html_text = logged["parent-id"]["leaderboard.html"]
    assert len(png_images(html_text)) == 3 and "olora" in html_text and "bbbbbbbbbbbb" not in html_text


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_formats_and_read_only(store, tmp_path, monkeypatch):
    uri, path = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = _digest(path)
    runner = CliRunner()
    res = runner.invoke(app, ["leaderboard", "bench", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["groups"][1]["rows"][0]["method"] == "inflora"
    out = tmp_path / "lb.html"
    res = runner.invoke(app, ["leaderboard", "other", "--format", "html", "--output", str(out)])
    assert res.exit_code == 0 and len(png_images(out.read_text())) == 3
    res = runner.invoke(app, ["leaderboard", "bench", "--sort", "forgetting"])
    assert res.exit_code == 0 and "sorted by final/forgetting" in res.stdout
    assert _digest(path) == before  # reading never writes


def test_cli_errors_are_one_line(store, tmp_path, monkeypatch):
    uri, _ = store
    runner = CliRunner()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    res = runner.invoke(app, ["leaderboard", "nosuch"])
    assert res.exit_code == 1 and "no MLflow experiment 'nosuch'" in res.output and "bench" in res.output
    res = runner.invoke(app, ["leaderboard", "bench", "--format", "xml"])
    assert res.exit_code == 1 and "--format xml" in res.output
    missing = tmp_path / "none.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    res = runner.invoke(app, ["leaderboard"])
    assert res.exit_code == 1 and "no MLflow store" in res.output
    assert not missing.exists()  # no empty store was created


def test_a_suite_file_selects_its_experiment(store, tmp_path, monkeypatch):
    uri, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    suite = tmp_path / "s.yaml"
    suite.write_text("name: whatever\nstream: {name: synthetic, num_tasks: 2, num_classes: 4}\n"
                     "backbone: {name: vit_micro_clbench, pretrained: false, image_size: 16}\n"
                     "methods: [{name: lora}]\ntracking: {experiment: other}\n")
    groups = lb.build(str(suite))
    assert [g.experiment for g in groups] == ["other"]


def test_stat_single_seed_has_no_std():
    assert lb.stat([5.0]) == lb.Stat(5.0, None, 1, None)
    assert lb.stat([None, float("nan")]) == lb.Stat(None, None, 0, None)
    two = lb.stat([1.0, None, 3.0])
    assert (two.mean, two.std, two.n) == (2.0, math.sqrt(2.0), 2)
    assert two.ci95 == pytest.approx(12.706205 * math.sqrt(2.0) / math.sqrt(2))  # t(0.975, 1) from tables
    assert lb.fmt_stat(lb.stat([5.0]), lb.SPEC["final/acc"]) == "5.00"  # no interval for one seed
    assert lb.fmt_stat(lb.stat([5.0]), lb.SPEC["final/acc"], n_row=3) == "5.00 (1)"  # fewer values than seeds
    assert lb.fmt_stat(lb.stat([-0.001]), lb.SPEC["final/acc"]) == "0.00"  # never -0.00
    assert lb.fixed(-0.001, "+.2f") == "+0.00" and lb.fixed(-0.01, ".2f") == "-0.01"


def test_a_failing_report_never_fails_the_suite_run(tmp_path):
    from clbench.run.summary import leaderboard_report
    from clbench.suite import load_suite

    suite_file = tmp_path / "s.yaml"
    suite_file.write_text("name: s\nstream: {name: synthetic, num_tasks: 2, num_classes: 4}\n"
                          "backbone: {name: vit_micro_clbench, pretrained: false, image_size: 16}\n"
                          "methods: [{name: lora}]\n")

    class Tracker:  # looks like the MLflow tracker, but its store is gone
        readable = True
        uri = f"sqlite:///{tmp_path / 'gone.db'}"

        def log_artifacts(self, *args):
            raise AssertionError("nothing to log")

    messages: list[str] = []
    leaderboard_report(Tracker(), "parent", load_suite(suite_file), messages.append)
    assert len(messages) == 1 and "leaderboard report not written" in messages[0] and "gone.db" in messages[0]


def test_spectra_of_a_method_without_low_rank_update_read_na():
    empty = lb.Stat(None, None, 0)
    values = {m.key: (lb.Stat(0.5, 0.1, 2) if m.key != "spectra/overlap" else empty) for m in lb.METRICS}
    kw = dict(method="m", method_name="m", params_id="p", n=2, seeds=[0, 1], metrics=values, provenance={})
    prompt, lora = lb.Row(**kw, low_rank=False), lb.Row(**kw)
    for spec in lb.METRICS:
        if spec.key.startswith("spectra/"):
            assert lb.fmt_cell(prompt, spec) == "n/a"
            assert lb.fmt_cell(lora, spec) == lb.fmt_stat(values[spec.key], spec)  # "-" when missing
        else:
            assert lb.fmt_cell(prompt, spec) == lb.fmt_stat(values[spec.key], spec)
    group = lb.Group("e", ["s"], "h", [prompt], [], "final/acc")
    header, body = lb.table_cells(group)
    assert body[0][header.index("spectra/mean_top1_share")] == "n/a"


def test_terminal_table_fits_and_explains_missing_interval_and_ranking(store):
    """The terminal table fits 100 columns for a one-seed suite, shows n once per row (not in every cell),
    says why a one-seed paired difference has no interval and why several suites are not ranked."""
    from clbench.analysis.stats import paired

    uri, _ = store
    text = lb.render(lb.build("other", uri), "table")
    assert max(len(ln) for ln in text.splitlines()) <= 100, text
    assert "(1)" not in text and "-0.00" not in text
    for key in ("final/acc", "spectra/mean_top1_share", "cost/trainable_params"):
        assert key in text  # the legend names the MLflow key behind each short column
    g = lb.build("bench", uri)[1]
    g.baseline = "lora"
    olora = next(r for r in g.rows if r.method == "olora")
    olora.vs_baseline = {k: paired({0: 1.0}, {0: 0.5}).as_dict() for k in lb.METRIC_KEYS}  # one common seed
    out = lb.render([g], "table")
    assert "+0.50 (1 seed: no interval)" in out and "no interval and no p" in out
    ranks = lb.render(lb.build(["bench", "other"], uri), "table")
    assert "no ranks across these" in ranks and "ran in every suite" in ranks
