"""Two `clbench run` processes writing to one fresh sqlite MLflow store at the same time both finish intact.

They share the experiment too, so both race to create the store's tables and the experiment (serialised
and retried in clbench/store/tracking.py), then interleave their per-task writes.
"""

from __future__ import annotations

import os
import subprocess
import sys

from clbench.testing import tiny_suite_yaml


def test_two_processes_share_one_sqlite_store(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    procs = []
    for name in ("alpha", "beta"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(tiny_suite_yaml(name, "shared", one_method=True))  # one run each: the race is the same
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
        procs.append(subprocess.Popen([sys.executable, "-m", "clbench.cli", "run", str(path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err

    client = MlflowClient(tracking_uri=mlflow_uri)
    exps = [e for e in client.search_experiments() if e.name == "shared"]
    assert len(exps) == 1
    runs = client.search_runs([exps[0].experiment_id], max_results=100)
    by_suite: dict[str, list] = {}
    for r in runs:
        by_suite.setdefault(r.data.tags["clbench.suite"], []).append(r)
    assert sorted(by_suite) == ["alpha", "beta"]
    for suite, rs in by_suite.items():
        roles = sorted(r.data.tags["clbench.role"] for r in rs)
        assert roles == ["child", "parent"], (suite, roles)
        for r in rs:
            assert r.info.status == "FINISHED", (suite, r.info.run_name)
            if r.data.tags["clbench.role"] == "child":
                steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "eval/acc"))
                assert steps == [0, 1, 2], (suite, r.info.run_name, steps)
                assert "final/acc" in r.data.metrics
                assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"acc_matrix.csv", "suite.yaml"}
    # Same protocol, same seed: the two processes' results agree exactly.
    finals = {s: sorted((r.data.tags["clbench.method"], r.data.metrics["final/acc"]) for r in rs
                        if r.data.tags["clbench.role"] == "child") for s, rs in by_suite.items()}
    assert finals["alpha"] == finals["beta"]
