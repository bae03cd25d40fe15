"""In a real browser: MLflow's own UI shows clbench's child runs and their final/acc values (no clbench needed
to compare), and the HTML report renders with its plots. Needs headless Chromium (Debian package ``chromium``)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from test_leaderboard import HASH_A, RUNS, make_store

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed "
                                                          "(apt-get install chromium); .ci/run installs it")]
NAME_CELL = re.compile(r"(?:olora|inflora|eblora|lora)-s\d$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dump_dom(url: str, width: int = 1920) -> str:
    """The DOM after Chromium has run the page's scripts (virtual time lets the React app fetch and render)."""
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", f"--window-size={width},1600",
                              "--virtual-time-budget=20000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class CompareTable(HTMLParser):
    """Reads MLflow's compare-runs page: the run names row, and the metric grids (virtualised: absolutely
    positioned cells, names in one grid and values in the next, rows aligned by their ``top``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.grids: list[list[tuple[int, int, str]]] = []
        self._stack: list[tuple[str, tuple[int, int] | None]] = []
        self._row_head = ""
        self._in_name_row = False
        self._text: list[str] = []
        self._cell: tuple[int, int] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "ReactVirtualized__Grid__innerScrollContainer" in (a.get("class") or ""):
            self.grids.append([])
        style = a.get("style") or ""
        pos = None
        if tag == "div" and "position: absolute" in style and self.grids:
            top, left = re.search(r"top: (-?\d+)px", style), re.search(r"left: (-?\d+)px", style)
            if top and left:
                pos = (int(top.group(1)), int(left.group(1)))
                self._cell, self._text = pos, []
        if tag == "th":
            self._text = []
        if tag == "tr":
            self._row_head, self._in_name_row = "", False
        if tag == "td" and self._in_name_row:
            self._text = []
        self._stack.append((tag, pos))

    def handle_endtag(self, tag):
        while self._stack:
            t, pos = self._stack.pop()
            if pos is not None and self._cell == pos:
                self.grids[-1].append((pos[0], pos[1], "".join(self._text).strip()))
                self._cell = None
            if t == "th" and self._row_head == "":
                self._row_head = "".join(self._text).strip()
                self._in_name_row = self._row_head == "Run Name:"
            if t == "td" and self._in_name_row:
                self.names.append("".join(self._text).strip())
            if t == tag:
                break

    def handle_data(self, data):
        self._text.append(data)

    def metric_row(self, key: str) -> list[str]:
        for i, grid in enumerate(self.grids[:-1]):
            tops = [top for top, _, text in grid if text == key]
            if tops:
                return [text for top, left, text in sorted(self.grids[i + 1], key=lambda c: c[1]) if top == tops[0]]
        return []


# (method, final/acc, final/avg_acc, final/forgetting, spectra/mean_top1_share): values as a real run logs them
FLOATS = [("lora", 59.29666666666667, 66.81333333333333, 12.345678901, 0.8345678),
          ("inflora", 61.123456789, 64.5, 3.3333333333, 0.61),
          ("mymethod", 47.5, 50.25, -0.0000001234, 0.9)]


def add_fractional_runs(url: str, name: str = "floats", tags: dict[str, str] | None = None) -> str:
    """A suite's experiment whose values have many digits (a mean of test accuracies): the parent and one
    finished child per method, as `clbench run` logs them (``tags``: the experiment's, as `clbench run` creates
    it). Returns its id."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    exp = client.create_experiment(name, tags=tags)
    parent = client.create_run(exp, run_name=name, tags={"clbench.role": "parent"})
    for label, *values in FLOATS:
        run = client.create_run(exp, run_name=f"{label}-s0", tags={
            "clbench.role": "child", "clbench.method": label, "clbench.seed": "0",
            "clbench.suite_hash": "0123456789ab", "mlflow.parentRunId": parent.info.run_id})
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 1) for k, v in zip(
            ("final/acc", "final/avg_acc", "final/forgetting", "spectra/mean_top1_share"), values)])
        client.set_terminated(run.info.run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")
    return exp


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui")
    port = free_port()
    log = (folder / "ui.log").open("w")  # held open for the server's whole life, closed below
    from clbench.store.uiserver import command

    # what `clbench ui` runs: MLflow's server, opening in model-training mode (clbench.store.uiserver)
    proc = subprocess.Popen(command(f"sqlite:///{folder / 'mlflow.db'}", "127.0.0.1", port), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("MLflow UI did not start:\n" + (folder / "ui.log").read_text()[-2000:])
                time.sleep(0.5)
        # The runs go in through the server's REST API, exactly as `clbench run` logs against a server.
        exps = make_store(url, folder / "artifacts")
        exps["floats"] = add_fractional_runs(url)
        yield url, exps, folder
    finally:
        # The server runs in its own process group (uvicorn spawns workers): end all of it, and only it.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


# a second Chromium page load (a minute under load); test_clbench_ui_lands_on_the_leaderboard_view checks the same
# runs table sorted by final/acc, through the URL `clbench ui` prints
@pytest.mark.slow
def test_mlflow_runs_table_sorted_by_final_acc_is_the_leaderboard(server):
    """MLflow's own URL state alone (no saved view): the runs table sorted by final/acc."""
    url, exps, _ = server
    grid = RunsGrid()
    grid.feed(dump_dom(f"{url}/#/experiments/{exps['bench']}/runs?workflowType=machine_learning"
                       "&orderByKey=metrics.%60final%2Facc%60&orderByAsc=false", width=2400))
    ordered = run_names(grid)
    finals = sorted(((r[7][0], f"{r[2]}-s{r[4]}") for r in RUNS if r[0] == "bench" and r[7]), reverse=True)
    assert ordered[:8] == [name for _, name in finals[:8]], ordered


def run_names(grid: RunsGrid) -> list[str]:
    """The run names of the table's rows, top to bottom (the name cell's text begins with the run's colour,
    so a word boundary cannot find them)."""
    cells = [grid.rows[i].get("attributes.`Run Name`", "") for i in sorted(grid.rows)]
    return [m.group(0) for m in map(NAME_CELL.search, cells) if m]


class RunsGrid(HTMLParser):
    """Reads MLflow's runs table (ag-grid): the header cells' column ids, and each row's cells by column id
    (pinned and scrolling parts of a row share its ``row-index``)."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[str] = []
        self.rows: dict[int, dict[str, str]] = {}
        self._stack: list[tuple[str, int | None, str | None]] = []  # tag, row index, cell column id
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class") or ""
        row = int(a["row-index"]) if (a.get("row-index") or "").isdigit() else None
        row = row if row is not None else next((r for _, r, _ in reversed(self._stack) if r is not None), None)
        col = None
        if "col-id" in a and "ag-header-cell" in cls.split():
            self.headers.append(a["col-id"])
        elif "col-id" in a and "ag-cell" in cls.split() and row is not None:
            col, self._text = a["col-id"], []
        self._stack.append((tag, row, col))

    def handle_endtag(self, tag):
        while self._stack:
            t, row, col = self._stack.pop()
            if col is not None:
                self.rows.setdefault(row, {})[col] = "".join(self._text).strip()
            if t == tag:
                break

    def handle_data(self, data):
        self._text.append(data)


def test_clbench_ui_lands_on_the_leaderboard_view(server):
    """The address `clbench ui` prints, in a 1600-pixel window: model-training mode, every run a row (children
    un-nested), the final metrics and the spectral summary as columns, best final/acc first, the whole table in
    the window (no horizontal scrolling), values rounded, and a metric cell's tooltip (MLflow's own, on hover)
    showing the logged value. A screenshot is left beside the store."""
    from cdp import Browser

    from clbench.store.tracking import ensure_ui_views
    from clbench.store.uiview import COLUMNS, column_key, view_url

    url, exps, folder = server
    assert ("bench", exps["bench"]) in ensure_ui_views(url)  # what `clbench ui` does before serving
    page_url = view_url(url, exps["bench"])
    browser = Browser(CHROMIUM, width=1600)
    try:
        browser.goto(page_url)
        browser.wait_for(f"document.querySelectorAll('{ROWS}').length >= 12 && "
                         "document.querySelectorAll('.ag-cell[col-id^=\"metrics.\"]').length >= 48")
        grid = RunsGrid()
        grid.feed(browser.js("document.documentElement.outerHTML"))
        # the whole view in the window: the grid's scrolling part is no wider than what it shows
        scroll = browser.js("[...document.querySelectorAll('.ag-center-cols-viewport')].map(e => [e.scrollWidth, "
                            "e.clientWidth])")
        assert scroll and all(0 < w <= c for w, c in scroll), scroll
        cell = ".ag-row[row-index] .ag-cell[col-id=\"metrics.`final/avg_acc`\"]"
        shown = browser.js(f"document.querySelector('{cell}').innerText.trim()")
        x, y = browser.js(f"(() => {{const r = document.querySelector('{cell}').getBoundingClientRect(); "
                          "return [r.left + r.width / 2, r.top + r.height / 2]})()")
        browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y}, browser.session)
        tooltip = browser.wait_for("(document.querySelector('.ag-tooltip') || {}).innerText", timeout=30)
        browser.screenshot(folder / "leaderboard-view.png")
    finally:
        browser.close()
    for key in COLUMNS:
        assert column_key("metrics", key) in grid.headers, grid.headers
    rows = [grid.rows[i] for i in sorted(grid.rows)]
    name_col = "attributes.`Run Name`"
    names = [NAME_CELL.search(r.get(name_col, "")) for r in rows]
    children = [(n.group(0), r) for n, r in zip(names, rows) if n]
    # the view's filter: finished children that logged final/acc (no failed, running or parent run)
    assert len(children) == sum(1 for r in RUNS if r[0] == "bench" and r[5] == "FINISHED"), [r.get(name_col)
                                                                                           for r in rows]
    values = [float(r[column_key("metrics", "final/acc")]) for _, r in children
              if r[column_key("metrics", "final/acc")] not in ("", "-")]
    assert values == sorted(values, reverse=True) and values[0] == 84, values
    top = dict(children)["inflora-s1"]
    # shown rounded (clbench.store.uiview): two decimals, three significant digits below 1
    assert top[column_key("metrics", "final/forgetting")] == "5.00"
    assert top[column_key("metrics", "final/avg_acc")] == "85.00"
    best_lora = next(r for n, r in children if n == "lora-s2")  # the higher of two protocols' lora-s2
    assert best_lora[column_key("metrics", "spectra/mean_top1_share")] == "0.800"
    # the top row's final/avg_acc: the cell rounded, MLflow's tooltip the value as logged (85.0, printed "85")
    assert (shown, tooltip) == ("85.00", "85"), (shown, tooltip)
    if os.environ.get("CLBENCH_SCREENSHOT_DIR"):  # to look at it
        shutil.copy(folder / "leaderboard-view.png", os.environ["CLBENCH_SCREENSHOT_DIR"])


def test_mlflow_compare_page_shows_final_acc_of_every_run(server):
    from mlflow.tracking import MlflowClient

    url, exps, _ = server
    runs = MlflowClient(tracking_uri=url).search_runs(
        [exps["bench"]], f"tags.`clbench.role` = 'child' and tags.`clbench.suite_hash` = '{HASH_A}' "
                         "and attributes.status = 'FINISHED'")
    ids = quote(json.dumps([r.info.run_id for r in runs]))
    page = CompareTable()
    page.feed(dump_dom(f"{url}/#/compare-runs?runs={ids}&experiments={quote(json.dumps([exps['bench']]))}",
                       width=2800))
    values = page.metric_row("final/acc")
    assert len(page.names) == len(runs) == 9 and len(values) == 9, (page.names, values)
    shown = sorted((name, float(v)) for name, v in zip(page.names, values))
    expected = sorted((f"{r[2]}-s{r[4]}", float(r[7][0])) for r in RUNS
                      if r[1] == HASH_A and r[5] == "FINISHED")
    assert shown == expected


PROBE = ("<script>window.addEventListener('load', () => {document.body.setAttribute('data-images', "
         "[...document.images].map(i => i.naturalWidth + 'x' + i.naturalHeight).join(','));"
         "document.body.setAttribute('data-tables', [...document.querySelectorAll('div.scroll')].map("
         "d => d.scrollWidth + '/' + d.clientWidth).join(','))})</script>")


def test_html_report_renders_with_its_plots(server):
    from clbench.analysis import leaderboard as lb
    from clbench.analysis.report import render

    url, _, folder = server
    html_text = render(lb.build("bench", url), "html")
    page = folder / "report.html"
    # The report has no scripts; the probe only reads back what Chromium decoded.
    page.write_text(html_text.replace("</body>", PROBE + "</body>"))
    dom = dump_dom(page.as_uri(), width=1600)
    sizes = re.search(r'data-images="([^"]*)"', dom)
    assert sizes, "the probe did not run"
    dims = [tuple(map(int, s.split("x"))) for s in sizes.group(1).split(",") if s]
    assert len(dims) == 6 and all(w > 200 and h > 200 for w, h in dims), dims
    assert "72.00 ± 4.97" in dom and "inflora seed 2 FAILED" in dom
    # every metric's column fits a 1600-pixel window: no horizontal scrolling
    widths = re.search(r'data-tables="([^"]*)"', dom).group(1).split(",")
    assert widths and all(int(w.split("/")[0]) <= int(w.split("/")[1]) for w in widths), widths


CELLS_PAGE = """<!doctype html><html><head>{script}</head><body>
<div class="ag-cell" col-id="metrics.`final/acc`"><span id="a">59.29666666666667</span></div>
<div class="ag-cell" col-id="metrics.`final/avg_acc`"><span id="c">59.29666666666667</span></div>
<div class="ag-cell" col-id="metrics.`final/forgetting`"><span id="f">-</span></div>
<div class="ag-cell" col-id="metrics.`final/bwt`"><span id="tie">-37.625</span></div>
<div class="ag-cell" col-id="metrics.`final/acc_til`"><span id="tie3">0.5625</span></div>
<div class="ag-cell" col-id="metrics.`final/avg_acc`"><span id="up">5.135</span></div>
<div class="ag-cell" col-id="metrics.`cost/trainable_params`"><span id="p">4226</span></div>
<div class="ag-cell" col-id="tags.`clbench.seed`"><span id="t">0.123456</span></div>
<div class="ag-header-cell" col-id="metrics.`final/avg_acc`"><span id="h">12.345678</span></div>
<script>
const USER_CHANGES = {user_changes};
const text = id => document.getElementById(id).textContent;
if (USER_CHANGES) {{  // the user changes the table's state, and the page (its script) loads again later
  localStorage.setItem({state_key}, '{{"orderByKey": "attributes.start_time"}}');
  const again = document.createElement("script");
  again.textContent = document.head.querySelector("script").textContent;
  document.head.appendChild(again);
}}
setTimeout(() => {{  // the grid draws later: a new row, a cell whose value changes
  document.body.insertAdjacentHTML("beforeend", '<div class="ag-row"><div class="ag-cell" '
    + 'col-id="metrics.`spectra/mean_top1_share`"><span id="b">0.8345678</span></div></div>');
  document.getElementById("a").firstChild.data = "-0.0000001234";
  document.getElementById("p").firstChild.data = "0";
}}, 50);
setTimeout(() => document.body.setAttribute("data-out", JSON.stringify({{
  a: text("a"), b: text("b"), c: text("c"), f: text("f"), tie: text("tie"), tie3: text("tie3"), up: text("up"), p: text("p"), t: text("t"), h: text("h"),
  state: localStorage.getItem({state_key}), mark: localStorage.getItem({mark_key}),
  workflow: localStorage.getItem("mlflow.workflowType_v1"), hash: location.hash}})), 400);
</script></body></html>"""


def test_page_script_rounds_metric_cells_and_seeds_the_leaderboard_view(tmp_path):
    """The script `clbench ui` puts first in MLflow's page, run by Chromium on a page with grid-like cells: metric
    cells read rounded as they are drawn and redrawn (two decimals, three significant digits below 1), other
    cells and headers keep their text, the experiment's runs-table state is the leaderboard view on a first
    visit and the user's own after they change it, and the base URL (no other) opens the latest suite's table."""
    from clbench.store import uiview

    script = uiview.page_script([("7", "bench", 123)], latest="7")
    state_key = uiview.PERSISTED_STATE_KEY.format(ids='["7"]')
    page = tmp_path / "cells.html"
    page.write_text(CELLS_PAGE.format(script=script, state_key=json.dumps(state_key), user_changes="true",
                                      mark_key=json.dumps(uiview.SEED_MARK_KEY.format(id="7"))))
    out = re.search(r'data-out="([^"]*)"', dump_dom(page.as_uri(), width=800))
    assert out, "the page's probe did not run"
    got = json.loads(html.unescape(out.group(1)))
    assert got["c"] == "59.30"
    # the digits the terminal leaderboard prints (Python's format: an exact binary tie goes to the even digit;
    # 5.135 is not a tie in binary)
    assert [got["tie"], got["tie3"], got["up"]] == [f"{-37.625:.2f}", f"{0.5625:.3f}", f"{5.135:.2f}"] \
        == ["-37.62", "0.562", "5.13"]
    assert (got["a"], got["b"], got["p"]) == ("-1.23e-7", "0.835", "0.00")  # redrawn / drawn late
    assert got["f"] == "-" and got["t"] == "0.123456" and got["h"] == "12.345678"  # not metric cells
    assert got["mark"] == uiview.seed_mark("7", "bench", 123)
    assert json.loads(got["state"]) == {"orderByKey": "attributes.start_time"}  # the user's change is kept
    assert json.loads(got["workflow"]) == "machine_learning"
    assert got["hash"] == "#/experiments/7/runs"  # the base URL opens the latest suite's runs table
    # a first visit (or a clbench view of another version) gets the leaderboard view
    page.write_text(CELLS_PAGE.format(script=script, state_key=json.dumps(state_key), user_changes="false",
                                      mark_key=json.dumps(uiview.SEED_MARK_KEY.format(id="7"))))
    got = json.loads(html.unescape(re.search(r'data-out="([^"]*)"', dump_dom(page.as_uri() + "#/compare-runs",
                                                                          width=800)).group(1)))
    assert json.loads(got["state"]) == uiview.view_state()
    assert got["hash"] == "#/compare-runs"  # any other address is left as it is


ROUTE_PAGE = """<!doctype html><html><head>{script}</head><body><script>
const state = id => localStorage.getItem("MLflowLocalStorage-1.1-ExperimentPage-" + JSON.stringify([id])
                                         + "-ReactComponentState");
const mark = id => localStorage.getItem("clbench.leaderboardView." + id);
const out = {{}};
history.pushState(null, "", "#/experiments/{plain}/runs");  // an experiment without the saved view
history.pushState(null, "", "#/experiments/{new}/runs?o=1");  // created after the page loaded (a router's push)
out.pushed = [state("{new}"), mark("{new}"), state("{plain}")];
localStorage.setItem("MLflowLocalStorage-1.1-ExperimentPage-" + JSON.stringify(["{new}"]) + "-ReactComponentState",
                     "mine");  // the user changes the table; a later visit keeps it
history.replaceState(null, "", "#/experiments/{new}");
out.kept = state("{new}");
window.addEventListener("hashchange", () => {{  // a typed address (or the back button): hashchange / popstate
  out.typed = [state("{other}"), mark("{other}")];
  document.body.setAttribute("data-out", JSON.stringify(out));
}});
location.hash = "#/experiments/{other}/runs";
</script></body></html>"""


def test_page_script_seeds_an_experiment_created_after_the_page_loaded(monkeypatch, tmp_path):
    """An experiment the served page does not list (a suite run while the tab is open) gets the leaderboard view
    as its runs-table state when the page's route first names it (a router's pushState, a typed address), from
    MLflow's own REST answer: the same state and mark a fresh page load would write (so a reload does not write it
    again), no state for an experiment without the saved view, and a change the user made afterwards is kept."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mlflow.tracking import MlflowClient
    from test_uiview import _served_app

    from clbench.store import uiview

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    plain = client.create_experiment("plain")
    new, other = (client.create_experiment(n, tags=uiview.experiment_tags()) for n in ("new-suite", "other-suite"))
    api = _served_app(monkeypatch, uri).test_client()  # MLflow's REST API itself
    page = ROUTE_PAGE.format(script=uiview.page_script([], None), plain=plain, new=new, other=other).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.startswith("/ajax-api/"):
                res = api.get(self.path)
                body, status, kind = res.get_data(), res.status_code, res.mimetype
            else:
                body, status, kind = page, 200, "text/html"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        dom = dump_dom(f"http://127.0.0.1:{httpd.server_address[1]}/", width=800)
    finally:
        httpd.shutdown()
        httpd.server_close()
    found = re.search(r'data-out="([^"]*)"', dom)
    assert found, "the page's probe did not run"
    got = json.loads(html.unescape(found.group(1)))
    view = json.dumps(uiview.view_state())
    marks = {e.experiment_id: uiview.seed_mark(e.experiment_id, e.name, e.creation_time)
             for e in map(client.get_experiment, (new, other))}
    assert got["pushed"] == [view, marks[new], None]
    assert got["kept"] == "mine"
    assert got["typed"] == [view, marks[other]]


def test_html_report_ranks_and_cd_diagram_render(tmp_path):
    """Three suites sharing three methods: the report (a static file, no server) shows the average ranks and
    the critical-difference diagram, and Chromium decodes the diagram."""
    from test_leaderboard_stats import SUITES, write_suites

    from clbench.analysis import leaderboard as lb
    from clbench.analysis.report import render

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_suites(uri, tmp_path / "artifacts", SUITES)
    page = tmp_path / "report.html"
    page.write_text(render(lb.build(["s1", "s2", "s3"], uri), "html").replace("</body>", PROBE + "</body>"))
    dom = dump_dom(page.as_uri())
    assert "Ranks across suites by final/acc" in dom and "average rank" in dom
    cd = re.search(r"<img[^>]*id=\"cd-diagram\"[^>]*>", dom) or re.search(r"<img[^>]*id='cd-diagram'[^>]*>", dom)
    assert cd, "no critical-difference diagram in the rendered page"
    sizes = re.search(r'data-images="([^"]*)"', dom)
    assert sizes, "the probe did not run"
    dims = [tuple(map(int, s.split("x"))) for s in sizes.group(1).split(",") if s]
    assert dims and dims[0][0] > 300 and dims[0][1] > 150, dims  # the diagram comes first and was decoded


HEADERS_JS = """[...document.querySelectorAll('.ag-header-cell[col-id]')].map(h => {
  const walk = document.createTreeWalker(h, NodeFilter.SHOW_TEXT), texts = [];
  for (let t = walk.nextNode(); t; t = walk.nextNode()) {
    if (!t.data.trim()) continue;
    const r = document.createRange(); r.selectNodeContents(t);
    texts.push([t.data.trim(), r.getBoundingClientRect().right]);
  }
  return [h.getAttribute('col-id'), h.getBoundingClientRect().right, texts];
})"""
# a row's pinned part (its name) and scrolling part (its metrics) are two .ag-row elements with one row-index
CELLS_JS = """(() => {
  const names = {}, cells = {};
  document.querySelectorAll('.ag-row[row-index]').forEach(r => {
    const i = r.getAttribute('row-index'), a = r.querySelector('a[href*="/runs/"]');
    if (a) names[i] = a.innerText.trim();
    r.querySelectorAll('.ag-cell[col-id^="metrics."]').forEach(c => {
      (cells[i] = cells[i] || {})[c.getAttribute('col-id')] = c.innerText.trim(); });
  });
  return Object.fromEntries(Object.keys(names).map(i => [names[i], cells[i] || {}]));
})()"""
ROWS = ".ag-row a[href*=\"/runs/\"]"


def run_link_names(browser) -> list[str]:
    return [n.strip() for n in browser.js(f"[...document.querySelectorAll('{ROWS}')].map(a => a.innerText)")]


@pytest.mark.slow  # one more Chromium session clicking through the UI (a minute or two under load)
def test_every_way_in_lands_on_the_leaderboard_view(server):
    """A fresh browser, as a new user: the base URL opens the runs table of the suite that ran last as its
    leaderboard view (the finished test-split child runs, best final/acc first; not MLflow's GenAI home); the
    breadcrumb's experiments list opens another suite's table as its leaderboard view too, whose values read
    rounded under whole headers; the saved view's address `clbench ui` prints shows the same; a run clicked
    there opens its Overview (not "Evaluations"); a run's own address (what `clbench run` prints against a
    server) leads back through its breadcrumb to the leaderboard view; an experiment created while the tab is open
    opens as its leaderboard view without a reload. A screenshot of each page is checked for
    being drawn (non-trivial PNG)."""
    from cdp import Browser
    from mlflow.tracking import MlflowClient

    from clbench.store.tracking import ensure_ui_views
    from clbench.store.uiview import (
        WORKFLOW,
        WORKFLOW_STORAGE_KEY,
        column_key,
        experiment_tags,
        view_columns,
        view_url,
    )

    url, exps, folder = server
    ensure_ui_views(url)
    exp, floats = exps["bench"], exps["floats"]
    client = MlflowClient(url)
    latest = client.search_runs([exp, floats], max_results=1, order_by=["attributes.start_time DESC"])[0]
    assert latest.info.experiment_id == exp  # the fixture's bench runs carry the later start times
    finished = sorted(f"{r[2]}-s{r[4]}" for r in RUNS if r[0] == "bench" and r[5] == "FINISHED")
    browser = Browser(CHROMIUM)
    try:
        browser.goto(url + "/")
        try:
            landed = browser.wait_for(f"document.querySelectorAll('{ROWS}').length >= 12 && location.hash",
                                      timeout=180)
        except TimeoutError:
            browser.screenshot(folder / "home.png")
            pytest.fail(f"the base URL did not open a runs table ({folder / 'home.png'}): {browser.js('location.href')}")
        assert f"/experiments/{exp}/runs" in landed and "genai" not in landed.lower(), landed
        assert json.loads(browser.js(f"localStorage.getItem('{WORKFLOW_STORAGE_KEY}')")) == WORKFLOW
        # the leaderboard view, not the plain table: only the finished children, best final/acc first (the two
        # lora-s0 runs of one protocol tie-break by MLflow's own order, so compare the sorted names too)
        names = run_link_names(browser)
        assert sorted(names) == finished and names[:3] == ["inflora-s1", "inflora-s0", "lora-s2"], names
        browser.screenshot(folder / "runs.png")

        # the experiments list (the breadcrumb's first link) and another suite in it
        browser.js("document.querySelector('a[href$=\"#/experiments\"], a[href$=\"/experiments\"]').click()")
        link = f'a[href$="experiments/{floats}"]'
        browser.wait_for(f"!!document.querySelector('{link}')")
        browser.js(f"document.querySelector('{link}').click()")
        browser.wait_for(f"location.hash.includes('/experiments/{floats}/runs') && "
                         f"document.querySelectorAll('{ROWS}').length >= 3 && "
                         f"document.querySelectorAll('.ag-header-cell[col-id=\"{column_key('metrics', 'final/acc')}\"]')"
                         ".length")
        names = run_link_names(browser)
        assert names == [f"{m}-s0" for m, *_ in sorted(FLOATS, key=lambda f: -f[1])], names
        cells = browser.js(CELLS_JS)
        assert cells["lora-s0"] == {"metrics.`final/acc`": "59.30", "metrics.`final/avg_acc`": "66.81",
                                    "metrics.`final/forgetting`": "12.35",
                                    "metrics.`spectra/mean_top1_share`": "0.835"}, cells
        assert cells["mymethod-s0"]["metrics.`final/forgetting`"] == "-1.23e-7", cells  # not a bare -0.00
        # every column of the view that is drawn shows its whole name inside its header
        headers = {col: (right, texts) for col, right, texts in browser.js(HEADERS_JS)}
        drawn = [c for c in view_columns() if c in headers]
        assert [c for c in view_columns() if c.startswith("metrics.")] == [c for c in drawn if c.startswith("metrics.")]
        for col in drawn:
            right, texts = headers[col]
            name = col.split(".", 1)[1].strip("`")
            assert texts and texts[0][0] == name and texts[0][1] <= right, (col, texts, right)
        browser.screenshot(folder / "floats.png")

        browser.goto(view_url(url, exp))  # the address `clbench ui` and the README give
        browser.wait_for(f"document.querySelectorAll('{ROWS}').length >= 12 && "
                         "location.hash.includes('viewStateShareKey')")
        assert sorted(run_link_names(browser)) == finished
        browser.screenshot(folder / "view.png")
        browser.js(f"document.querySelector('{ROWS}').click()")
        browser.wait_for("/runs\\/[0-9a-f]{32}/.test(location.hash) && document.body.innerText.includes('Overview')")
        text = browser.js("document.body.innerText")
        assert "Evaluations" not in text and "Model metrics" in text  # the model-training run page
        assert "clbench.suite_hash" in text  # the protocol, not a column of the view, is among the run's tags
        browser.screenshot(folder / "run.png")

        # a run's own address, typed or clicked in a terminal, and back to its experiment through the breadcrumb
        run = client.search_runs([floats], "tags.`clbench.method` = 'lora'")[0]
        browser.goto(f"{url}/#/experiments/{floats}/runs/{run.info.run_id}")
        browser.wait_for("document.body.innerText.includes('Overview') && document.body.innerText.includes('lora-s0')")
        crumb = f'a[href$="experiments/{floats}"], a[href$="experiments/{floats}/runs"]'
        browser.wait_for(f"!!document.querySelector('{crumb}')")
        browser.js(f"document.querySelector('{crumb}').click()")
        browser.wait_for(f"location.hash.includes('/experiments/{floats}/runs') && "
                         f"document.querySelectorAll('{ROWS}').length >= 3")
        assert run_link_names(browser) == names and browser.js(CELLS_JS)["lora-s0"] == cells["lora-s0"]

        # a suite run while this tab is open creates its experiment (tagged as `clbench run` tags it): without a
        # reload, the experiments list leads to its runs table as the leaderboard view (the page script looks the
        # new experiment up when the route first names it)
        later = add_fractional_runs(url, "later", experiment_tags())
        browser.js("document.querySelector('a[href$=\"#/experiments\"], a[href$=\"/experiments\"]').click()")
        link = f'a[href$="experiments/{later}"]'
        browser.wait_for(f"!!document.querySelector('{link}')")
        assert browser.js("performance.getEntriesByType('navigation').length") == 1  # still the first page load
        browser.js(f"document.querySelector('{link}').click()")
        browser.wait_for(f"location.hash.includes('/experiments/{later}/runs') && "
                         f"document.querySelectorAll('{ROWS}').length >= 3")
        assert run_link_names(browser) == names, run_link_names(browser)  # the children only, best first
        assert browser.js(CELLS_JS)["lora-s0"] == cells["lora-s0"]  # the view's columns, rounded
        browser.screenshot(folder / "later.png")
    finally:
        browser.close()
    for shot in ("runs.png", "view.png", "run.png", "floats.png", "later.png"):
        data = (folder / shot).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 20000, shot
    if os.environ.get("CLBENCH_SCREENSHOT_DIR"):  # to look at them
        for shot in ("runs.png", "view.png", "run.png", "floats.png", "later.png"):
            shutil.copy(folder / shot, os.environ["CLBENCH_SCREENSHOT_DIR"])
