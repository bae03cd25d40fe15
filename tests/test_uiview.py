"""The MLflow UI's leaderboard view and model-training default, without a browser (tests/test_browser.py clicks
through the real UI): the view's filter selects exactly the runs the leaderboard lists, and the page ``clbench ui``
serves makes model training the browser's default workflow."""

from __future__ import annotations

import json
import re
from pathlib import Path

from test_leaderboard import T0, make_store

from clbench.analysis import leaderboard as lb
from clbench.store import uiview


def test_view_filter_selects_the_runs_the_leaderboard_averages(tmp_path: Path):
    """Finished test-split children only: no suite or sweep parent, no validation trial, no failed or running
    run (a superseded seed is listed in both places: the leaderboard names it under the table)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exps = make_store(uri, tmp_path / "artifacts")
    client = MlflowClient(uri)
    sweep = client.create_run(exps["bench"], start_time=T0, tags={"clbench.role": "sweep"})
    trial = client.create_run(exps["bench"], start_time=T0, tags={
        "clbench.role": "child", "clbench.split": "validation", "clbench.method": "lora", "clbench.seed": "0",
        "clbench.suite_hash": "aaaaaaaaaaaa", "mlflow.parentRunId": sweep.info.run_id})
    client.log_batch(trial.info.run_id, metrics=[Metric("val/acc", 50.0, T0, 4)])
    for run in (sweep, trial):
        client.set_terminated(run.info.run_id, "FINISHED")
    state = json.loads(json.loads(uiview.view_tag_value())["state"])
    shown = {r.info.run_id for r in client.search_runs([exps["bench"]], state["searchFilter"], max_results=1000)}
    groups = lb.build("bench", uri)
    averaged = {r["run_id"] for g in groups for row in g.rows for r in row.runs}
    superseded = {rid for g in groups for row in g.rows for rid in row.superseded}
    assert averaged and shown == averaged | superseded
    assert state["orderByKey"] == "metrics.`final/acc`" and state["orderByAsc"] is False


def _served_app(monkeypatch, uri: str):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("_MLFLOW_SERVER_FILE_STORE", uri)  # what `mlflow ui` sets for its server's store
    from mlflow.server import app, handlers

    from clbench.store import uiserver

    monkeypatch.setattr(handlers, "_tracking_store", None)  # the store of this test, not an earlier one's
    if uiserver._inject not in app.after_request_funcs.get(None, []):
        app.before_request(uiserver._unconditional)
        app.after_request(uiserver._inject)
    return app


def test_the_served_page_defaults_the_browser_to_model_training(monkeypatch, tmp_path: Path):
    """The UI's index page (MLflow's Flask app with clbench.store.uiserver's hooks) sets localStorage
    mlflow.workflowType_v1 to "machine_learning" before the app's scripts, only where the browser has none."""
    app = _served_app(monkeypatch, f"sqlite:///{tmp_path / 'mlflow.db'}")
    page = app.test_client().get("/").get_data(as_text=True)
    script = uiview.page_script([], None)
    assert script in page and page.index(script) < page.index("<script defer")
    defaults = json.loads(re.search(r"D=(\{.*?\}),E=", script).group(1))
    assert defaults[uiview.WORKFLOW_STORAGE_KEY] == '"machine_learning"'  # the hook's JSON value
    assert "if(S.getItem(k)===null)S.setItem(k,D[k])" in script  # a browser's own choice is kept
    api = app.test_client().get("/health")
    assert b"mlflow.workflowType_v1" not in api.get_data()


def test_the_page_seeds_each_clbench_experiment_with_the_leaderboard_view(monkeypatch, tmp_path: Path):
    """The page lists the store's clbench experiments (those `clbench ui` tagged with the saved view) and nothing
    else; for each, the runs table's persisted state MLflow restores (its LocalStorageUtils key for the experiment)
    is the view's state: sort, filter, columns and their widths. The page is never cached, and a browser's
    conditional request still gets it whole with the store's experiments of now."""
    from mlflow.tracking import MlflowClient

    from clbench.store.tracking import ensure_ui_views

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exps = make_store(uri, tmp_path / "artifacts")
    plain = MlflowClient(uri).create_experiment("not-clbench")
    app = _served_app(monkeypatch, uri)
    first = app.test_client().get("/")
    assert re.search(r"E=\[\]", first.get_data(as_text=True))  # nothing tagged yet: nothing seeded
    tagged = dict(ensure_ui_views(uri))
    assert set(tagged) == {"bench"}  # "other" holds children only (no parent run), "not-clbench" nothing
    # a browser holding a copy (say from plain `mlflow ui` on this address) asks whether it changed
    res = app.test_client().get("/", headers={"If-Modified-Since": "Mon, 01 Jan 2125 00:00:00 GMT"})
    assert res.status_code == 200 and res.headers["Cache-Control"] == "no-store" and "ETag" not in res.headers
    page = res.get_data(as_text=True)
    seeds = json.loads(re.search(r"E=(\[.*?\]),V=", page).group(1))
    assert [s["state_key"] for s in seeds] == [f'MLflowLocalStorage-1.1-ExperimentPage-["{exps["bench"]}"]'
                                               "-ReactComponentState"]
    assert plain not in seeds[0]["state_key"] and seeds[0]["mark_key"].endswith(exps["bench"])
    state = json.loads(json.loads(re.search(r",V=(\".*?\"),L=", page).group(1)))
    assert state == uiview.view_state()
    assert re.search(r",L=(.*?),K=", page).group(1) == json.dumps(exps["bench"])  # where the base URL opens
    assert state["columnOrder"] == state["selectedColumns"] and set(state["columnWidths"]) == set(state["columnOrder"])
    assert state["columnWidths"]["metrics.`spectra/mean_top1_share`"] > state["columnWidths"]["metrics.`final/acc`"]
    # another store with an experiment of the same id and name gets its own mark (and so the view again)
    assert seeds[0]["mark"] != uiview.seed_mark(exps["bench"], "bench", 0)


def test_clbench_ui_serves_the_model_training_app(monkeypatch):
    """`clbench ui` runs clbench.store.uiserver (MLflow's `mlflow ui`, uvicorn serving clbench.store.uiserver:app)."""
    import os
    import socket

    from typer.testing import CliRunner

    from clbench.cli import app

    calls = []
    monkeypatch.setattr(os, "execvp", lambda prog, args: calls.append(args))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    res = CliRunner().invoke(app, ["ui", "--backend-store-uri", "sqlite:///x.db", "--port", port])
    assert res.exit_code == 0, res.output
    assert calls[0][1:3] == ["-m", "clbench.store.uiserver"] and "model-training" in res.output
