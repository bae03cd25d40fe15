"""End to end: `clbench run` on a tiny suite into a temporary MLflow store, runs read back and checked."""

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from clbench.cli import app

TINY = {
    "name": "tiny-e2e",
    "seeds": [0, 1],
    "stream": {"name": "synthetic", "num_tasks": 3, "num_classes": 6, "samples_per_class": 16},
    "backbone": {"name": "vit_micro_clbench", "image_size": 16, "pretrained": False},
    "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3},
    "runtime": {"device": "cpu"},
    "methods": [{"name": "lora", "params": {"rank": 2}},
                {"name": "lora", "label": "inclora", "params": {"rank": 2, "fresh_per_task": True}}],
    "tracking": {"experiment": "tiny-e2e"},
}


@pytest.fixture
def suite_file(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def test_run_logs_parent_and_children(suite_file, mlflow_uri, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", str(suite_file)])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("tiny-e2e")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("clbench.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("clbench.role") == "child"]
    assert len(parents) == 1 and len(children) == 4
    parent_id = parents[0].info.run_id
    assert {(r.data.tags["clbench.method"], r.data.tags["clbench.seed"]) for r in children} == {
        ("lora", "0"), ("lora", "1"), ("inclora", "0"), ("inclora", "1")}
    for r in children:
        tags, m = r.data.tags, r.data.metrics
        assert r.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent_id
        assert tags["clbench.suite"] == "tiny-e2e" and len(tags["clbench.suite_hash"]) == 12
        for key in ("clbench.version", "clbench.device", "clbench.method_name"):
            assert tags[key]
        for key in ("final/acc", "final/avg_acc", "final/forgetting", "final/bwt", "final/acc_til",
                    "cost/train_seconds", "cost/img_per_s", "cost/peak_mem_mb", "cost/trainable_params",
                    "cost/method_seconds", "cost/total_seconds", "cost/state_mb",
                    "spectra/top1_share", "spectra/eff_rank", "spectra/overlap", "eval/acc", "eval/acc/task_02"):
            assert key in m, key
        assert r.data.params["method.params.rank"] == "2"
        # the per-task history: eval/acc at steps 0, 1, 2 and R[i, 0] at every step
        hist = client.get_metric_history(r.info.run_id, "eval/acc")
        assert sorted(h.step for h in hist) == [0, 1, 2]
        # final metrics agree with the logged accuracy matrix
        R = np.loadtxt(client.download_artifacts(r.info.run_id, "acc_matrix.csv", str(tmp_path / r.info.run_id)),
                       delimiter=",")
        assert m["final/acc"] == pytest.approx(R[2].mean(), abs=1e-3)  # equal test sets per task
        assert m["eval/acc/task_00"] == pytest.approx(R[2, 0], abs=1e-3)
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"suite.yaml", "acc_matrix.csv", "acc_matrix.png", "provenance.json", "packages.json",
                "spectra.npz", "spectra.png"} <= names
    assert parents[0].data.metrics["suite/runs_finished"] == 4
    assert "suite/spearman_imbalance_forgetting" in parents[0].data.metrics


def test_dry_run_trains_nothing(suite_file, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", str(suite_file), "--dry-run", "--method", "inclora"])
    assert result.exit_code == 0, result.output
    planned = {ln.split()[1] for ln in result.output.splitlines() if ln.startswith("  run ")}
    assert planned == {"inclora"}
    # a label picks that entry only, even when another entry shares its method name
    result = CliRunner().invoke(app, ["run", str(suite_file), "--dry-run", "--method", "lora"])
    assert result.exit_code == 0, result.output
    assert {ln.split()[1] for ln in result.output.splitlines() if ln.startswith("  run ")} == {"lora"}


def test_same_seed_gives_identical_matrices(suite_file, mlflow_uri, tmp_path, monkeypatch):
    from clbench.run.runner import RunOptions, run_suite
    from clbench.store.tracking import NullTracker
    from clbench.suite import load_suite

    s = load_suite(suite_file, ["seeds=[3]", "methods=[{name: lora, params: {rank: 2}}]"])
    a = run_suite(s, str(suite_file), RunOptions(tracker=NullTracker(), progress=lambda m: None))
    b = run_suite(s, str(suite_file), RunOptions(tracker=NullTracker(), progress=lambda m: None))
    assert np.array_equal(a[0].R, b[0].R, equal_nan=True)
