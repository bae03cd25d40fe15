"""The Ray executor: a suite's (method, seed) runs as Ray tasks on a local 2-CPU cluster.

One Ray submission of 2 methods x 2 seeds, one of whose workers is SIGKILLed mid-run (once): Ray retries the task,
the retry resumes from the run's checkpoint into the same MLflow run, and every run ends with the same final metrics
as the local sequential executor, with one parent and four children in MLflow and no duplicated step.
"""

from __future__ import annotations

import sys

import pytest

from clbench.errors import ClbenchError
from clbench.run.executors import RayExecutor, absolute_uri, check_tracking_for_cluster, make_executor
from clbench.run.runner import RunOptions, run_suite
from clbench.store.tracking import MlflowTracker
from clbench.suite import load_suite

SUITE = """\
name: raysuite
seeds: [0, 1]
stream: {name: synthetic, num_tasks: 3, num_classes: 6, samples_per_class: 16}
backbone: {name: vit_micro_clbench, image_size: 16, pretrained: false}
train: {epochs: 1, batch_size: 16, lr: 5.0e-3, max_steps_per_epoch: 2}
runtime: {device: cpu, log_every: 1000}
methods:
  - {name: lora, params: {rank: 2}}
  - {name: killlora, label: inclora, params: {rank: 2, fresh_per_task: true, marker: MARKER}}
plugins_dir: plugins
tracking: {experiment: raysuite}
"""

# IncLoRA whose process kills itself (SIGKILL, as a lost node or an OOM kill would) after its first step on task 1,
# once per marker file: the retried attempt finds the marker and trains on. (The CLBENCH_TEST_KILL_AT hook would
# fire again in every retry, which never completes.)
KILL_PLUGIN = '''
"""A test method: IncLoRA that SIGKILLs its own process once, on task 1."""
import os
import signal
from pathlib import Path

from clbench.methods.hookspecs import hookimpl
from clbench_plugins.lora import NaiveLoRA, NaiveLoRAParams


class KillParams(NaiveLoRAParams):
    marker: str = ""


class KillLoRA(NaiveLoRA):
    name = "killlora"
    aliases = ()
    Params = KillParams

    @hookimpl
    def after_optimizer_step(self, model, ctx):
        marker = Path(self.params.marker)
        if ctx.task == 1 and self.params.marker and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def register_methods(register):
    register(KillLoRA)
'''


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'clbench[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def children(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return runs, {(r.data.tags["clbench.method"], r.data.tags["clbench.seed"]): r for r in runs
                  if r.data.tags.get("clbench.role") == "child"}


@pytest.mark.slow  # ~75 s on 2 shared cores: Ray start-up and two worker processes importing torch
def test_ray_grid_with_a_killed_worker_matches_the_local_executor(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "killlora.py").write_text(KILL_PLUGIN)
    marker = tmp_path / "killed-once"
    path = tmp_path / "raysuite.yaml"
    path.write_text(SUITE.replace("MARKER", str(marker)))
    suite = load_suite(path)

    ray_uri = f"sqlite:///{tmp_path / 'ray.db'}"
    lines: list[str] = []
    records = run_suite(suite, str(path), RunOptions(tracker=MlflowTracker("raysuite", ray_uri),
                                                     progress=lines.append,
                                                     checkpoint_dir=str(tmp_path / "ray-ck"),
                                                     executor=RayExecutor(cpus_per_run=1),
                                                     trust_suite_plugins=True))
    assert marker.exists(), lines  # a worker was killed
    assert [(r.method, r.seed, r.status) for r in records] == [
        ("lora", 0, "FINISHED"), ("inclora", 0, "FINISHED"), ("lora", 1, "FINISHED"), ("inclora", 1, "FINISHED")]

    # The reference: the default executor, in this process, same suite (the marker exists: nothing is killed).
    local_uri = f"sqlite:///{tmp_path / 'local.db'}"
    local = run_suite(suite, str(path), RunOptions(tracker=MlflowTracker("raysuite", local_uri),
                                                   progress=lambda s: None,
                                                   checkpoint_dir=str(tmp_path / "local-ck"),
                                                   trust_suite_plugins=True))
    for got, want in zip(records, local, strict=True):
        assert (got.method, got.seed) == (want.method, want.seed)
        for key in ("final/acc", "final/avg_acc", "final/forgetting", "final/bwt", "final/acc_til"):
            assert got.metrics[key] == want.metrics[key], (got.method, got.seed, key)
        assert got.metrics["spectra/mean_top1_share"] == pytest.approx(want.metrics["spectra/mean_top1_share"],
                                                                       rel=1e-9)

    runs, kids = children(ray_uri, "raysuite")
    [parent] = [r for r in runs if r.data.tags.get("clbench.role") == "parent"]
    # One parent, one child per (method, seed): the killed run was continued, not started again (a fresh
    # start would have opened a fifth child run).
    assert len(runs) == 5 and len(kids) == 4
    client = MlflowClient(tracking_uri=ray_uri)
    for kid in kids.values():
        assert kid.info.status == "FINISHED"
        assert kid.data.tags["mlflow.parentRunId"] == parent.info.run_id
        steps = sorted(m.step for m in client.get_metric_history(kid.info.run_id, "eval/acc"))
        assert steps == [0, 1, 2]  # the killed run's task 0 logged once, tasks 1-2 by the retry
    assert parent.data.metrics["suite/runs_finished"] == 4.0


def test_local_sqlite_refused_on_a_multi_node_cluster():
    check_tracking_for_cluster("sqlite:////data/mlflow.db", 1, None)  # one machine: fine
    check_tracking_for_cluster("http://mlflow:5000", 8, "head:6379")  # a server: fine
    with pytest.raises(ClbenchError, match="local file.*3 nodes.*MLFLOW_TRACKING_URI"):
        check_tracking_for_cluster("sqlite:///mlflow.db", 3, "head:6379")
    with pytest.raises(ClbenchError, match="Ray Client"):
        check_tracking_for_cluster("/srv/mlruns", 1, "ray://head:10001")
    assert absolute_uri("sqlite:///mlflow.db").startswith("sqlite:////")
    assert absolute_uri("http://mlflow:5000") == "http://mlflow:5000"


def test_ray_missing_or_misused_gives_one_line(monkeypatch):
    with pytest.raises(ClbenchError, match="--address: only with --executor ray"):
        make_executor("local", address="head:6379")
    with pytest.raises(ClbenchError, match="choose local or ray"):
        make_executor("dask")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ClbenchError, match=r"Ray is not installed; pip install 'clbench\[ray\]'"):
        make_executor("ray")
