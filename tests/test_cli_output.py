"""What a new user sees: the preflight before any MLflow run exists, and the lines that end `clbench run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.run.preflight import backbone_problem, preflight, stream_problem
from clbench.suite import load_suite
from clbench.testing import tiny_suite_yaml

REPO = Path(__file__).resolve().parents[1]


def test_offline_vit_suite_fails_before_creating_any_run(tmp_path, mlflow_uri):
    """`clbench run suites/vit.yaml` offline, with empty caches: one line, exit 1, nothing in the store, and the
    retry says the same (no "continuing suite run" of a run that never ran)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MLFLOW_TRACKING_URI": mlflow_uri,
           "CLBENCH_CACHE": str(tmp_path / "cache")}
    env.pop("CLBENCH_DATA", None)
    for _ in range(2):
        res = subprocess.run([sys.executable, "-m", "clbench.cli", "run", str(REPO / "suites" / "vit.yaml")],
                             env=env, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 1 and len(lines) == 1, res.stderr[-3000:]
        # the weights are missing whatever the network does (HF_HUB_OFFLINE); CIFAR-100 too when offline
        assert lines[0].startswith("error: ") and "backbone.name" in lines[0] and "vit_base_patch16_224" in lines[0]
        assert "before creating any MLflow run" in lines[0] and "continuing" not in res.stderr
    db = Path(mlflow_uri.removeprefix("sqlite:///"))
    if db.exists():  # nothing opened it, but if something did it must hold no run
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri)
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not (tmp_path / "cache" / "runs").exists()  # no checkpoint folder either


def test_preflight_names_each_missing_thing(tmp_path, monkeypatch):
    import clbench.data.datasets.download as dl

    suite = load_suite(REPO / "suites" / "vit.yaml", [f"stream.root={tmp_path / 'data'}", "stream.download=false",
                                                      f"backbone.checkpoint={tmp_path / 'w.safetensors'}"])
    problem = stream_problem(suite.stream)
    assert "stream.root" in problem and "stream.download is false" in problem
    assert "backbone.checkpoint: file not found" in backbone_problem(suite.backbone)
    with pytest.raises(ClbenchError, match="stream.root.*; backbone.checkpoint"):
        preflight(suite)
    # downloads allowed but the host unreachable: said so; reachable: fine (the runner downloads)
    suite.stream.download = True
    monkeypatch.setattr(dl, "reachable", lambda url: False)
    assert "cannot be reached" in stream_problem(suite.stream)
    monkeypatch.setattr(dl, "reachable", lambda url: True)
    assert stream_problem(suite.stream) is None
    (tmp_path / "data" / "cifar-100-python").mkdir(parents=True)
    monkeypatch.setattr(dl, "reachable", lambda url: False)
    assert stream_problem(suite.stream) is None  # present: no network needed
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))  # a weights file that opens
    preflight(suite)
    preflight(load_suite(REPO / "suites" / "quickstart.yaml"))  # offline suites need nothing


def test_run_ends_with_where_the_results_are_and_what_to_do_next(tmp_path, mlflow_uri):
    suite_path = tmp_path / "first.yaml"
    suite_path.write_text(tiny_suite_yaml("first"))
    res = CliRunner().invoke(app, ["run", str(suite_path), "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.exit_code == 0, res.output + res.stderr
    tail = res.stdout.strip().splitlines()[-3:]
    assert tail[0] == f"results: MLflow experiment 'first' in {mlflow_uri}", tail
    assert tail[1].strip().startswith(f"clbench leaderboard {suite_path}")
    assert tail[2].strip().startswith("clbench ui")
    # "til" is explained before the first progress line that shows it
    err = res.stderr.splitlines()
    legend = next(i for i, ln in enumerate(err) if ln.startswith("acc: class-incremental"))
    first_til = next(i for i, ln in enumerate(err) if "(til " in ln)
    assert legend < first_til and "til: task-incremental" in err[legend]
    # the leaderboard command it names works as printed
    lb = CliRunner().invoke(app, tail[1].split("#")[0].split()[1:])
    assert lb.exit_code == 0 and "inclora" in lb.stdout, lb.output


def test_run_on_a_suite_store_names_that_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the environment would win over the suite's tracking.uri
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    suite_path = tmp_path / "there.yaml"
    suite_path.write_text(tiny_suite_yaml("there").replace("tracking: {experiment: there}",
                                                           f"tracking: {{experiment: there, uri: '{uri}'}}"))
    res = CliRunner().invoke(app, ["run", str(suite_path), "--method", "lora",
                                   "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.exit_code == 0, res.output + res.stderr
    tail = res.stdout.strip().splitlines()[-3:]
    assert uri in tail[0] and f"--tracking-uri {uri}" in tail[1] and f"clbench ui --backend-store-uri {uri}" in tail[2]
    assert f"results go to MLflow experiment 'there' in {uri} (from tracking.uri of the suite file)" in res.stderr


def test_run_help_keeps_brackets_and_names_values():
    res = CliRunner().invoke(app, ["run", "--help"], terminal_width=120)
    assert res.exit_code == 0
    assert "pip install 'clbench[ray]'" in " ".join(res.output.split())  # no rich markup eating [ray]
    assert "<bool>" not in res.output and "<list[" not in res.output, res.output
    assert "--set KEY=VALUE" in res.output and "--method NAME" in res.output


def test_flat_spectrum_scatter_has_no_offset_text(tmp_path):
    """forgetting_vs_imbalance.png of a perfectly balanced method: equal x values must not turn into an axis
    offset ("1e-8+2.5e-1") drawn over the axis label."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from clbench.analysis import plots

    captured = {}
    real_close = plt.close

    def keep(fig):
        captured["fig"] = fig
        real_close(fig)

    plt.close = keep
    try:
        # float noise around an exactly balanced 0.25 (matplotlib alone draws the offset "1e-7+2.5e-1")
        plots.scatter([0.2500001, 0.2500002, 0.2500003, 0.2500001], [3.0, 5.5, 2.0, 7.0], list("abcd"),
                      tmp_path / "f.png", ("x", "y", "t"))
    finally:
        plt.close = real_close
    ax = captured["fig"].axes[0]
    captured["fig"].canvas.draw()
    assert ax.xaxis.get_offset_text().get_text() == "" and ax.yaxis.get_offset_text().get_text() == ""
