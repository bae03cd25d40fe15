"""The MLflow UI's leaderboard view and model-training default, without a browser (tests/test_browser.py clicks
through the real UI): the view's filter selects exactly the runs the leaderboard lists, and the page ``clbench ui``
serves makes model training the browser's default workflow."""

from __future__ import annotations

import json
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


def test_the_served_page_defaults_the_browser_to_model_training(monkeypatch, tmp_path: Path):
    """The UI's index page (MLflow's Flask app with clbench.store.uiserver's hook) sets localStorage
    mlflow.workflowType_v1 to "machine_learning" before the app's scripts, only where the browser has none."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from mlflow.server import app

    from clbench.store import uiserver

    if uiserver._inject not in app.after_request_funcs.get(None, []):
        app.after_request(uiserver._inject)
    page = app.test_client().get("/").get_data(as_text=True)
    script = uiview.storage_script()
    assert script in page and page.index(script) < page.index("<script defer")
    assert 'localStorage.getItem("mlflow.workflowType_v1")===null' in script
    assert 'setItem("mlflow.workflowType_v1","\\"machine_learning\\"")' in script  # the hook's JSON value
    api = app.test_client().get("/health")
    assert script.encode() not in api.get_data()


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
