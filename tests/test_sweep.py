"""`clbench sweep` (clbench.run.sweep): grid and seeded random search of one method entry on the validation split,
trials as nested child runs of one sweep parent, resumable, best point printed last, --then-test as a tuned run
the leaderboard marks; every bad input one line and exit 1 before any run. Tiny synthetic suite, in-process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from clbench import keys
from clbench.analysis.leaderboard import build, note_lines
from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.run.executors import LocalExecutor
from clbench.run.sweep import SweepOptions, Trial, best_line, plan_sweep, run_sweep, value_text
from clbench.store.tracking import read_runs
from clbench.suite import load_suite
from clbench.testing import tiny_suite_yaml

GRID = "methods.lora.params.rank=[1,2]"


@pytest.fixture
def suite_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_suite_yaml("tiny"))
    return path


def sweep(suite_path: Path, tmp_path: Path, *args: str):
    return CliRunner().invoke(app, ["sweep", str(suite_path), "--method", "lora", "--checkpoint-dir",
                                    str(tmp_path / "ck"), *args])


def mlflow_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=500)


def test_sweep_runs_nested_validation_trials_resumes_and_tests_the_best(suite_path, tmp_path, mlflow_uri):
    res = sweep(suite_path, tmp_path, "--grid", GRID)
    assert res.exit_code == 0, (res.output, res.exception)
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith("best: methods.lora.params.rank=") and " val/acc=" in lines[-1]
    assert any(line.startswith("1 ") for line in lines) and any(line.startswith("2 ") for line in lines)  # table

    runs = mlflow_runs(mlflow_uri)
    [parent] = [r for r in runs if r.data.tags.get(keys.ROLE) == keys.ROLE_PARENT]
    trials = [r for r in runs if r.data.tags.get(keys.ROLE) == keys.ROLE_CHILD]
    assert len(trials) == 2
    sweep_id = parent.data.tags[keys.SWEEP]
    assert parent.data.tags[keys.SPLIT] == keys.SPLIT_VALIDATION
    assert parent.data.tags[keys.SEARCH_SPACE] == f"--grid {GRID}"
    for t in trials:
        tags, metrics = t.data.tags, t.data.metrics
        assert tags[keys.SPLIT] == keys.SPLIT_VALIDATION and tags[keys.SWEEP] == sweep_id
        assert tags[keys.PARENT_RUN] == parent.info.run_id and tags[keys.SUITE] == "tiny"
        assert tags[keys.TRIAL] in ("methods.lora.params.rank=1", "methods.lora.params.rank=2")
        assert t.data.params["method.params.rank"] == tags[keys.TRIAL][-1]
        assert "val/acc" in metrics and "val/forgetting" in metrics
        assert not [k for k in metrics if k.startswith(("eval/", "final/"))]
    top = max(t.data.metrics["val/acc"] for t in trials)
    # ties go to the first point in grid order
    best = next(t for t in sorted(trials, key=lambda t: t.data.tags[keys.TRIAL]) if t.data.metrics["val/acc"] == top)
    assert lines[-1] == f"best: {best.data.tags[keys.TRIAL]} val/acc={top:.2f}"
    assert parent.data.tags[keys.SWEEP_BEST] == best.data.tags[keys.TRIAL]

    # the same command again: nothing retrained; with --then-test the best point runs on the test split
    again = sweep(suite_path, tmp_path, "--grid", GRID, "--then-test")
    assert again.exit_code == 0, (again.output, again.exception)
    assert "already finished" in again.stderr and again.stdout.strip().splitlines()[-1] == lines[-1]
    runs = mlflow_runs(mlflow_uri)
    assert len([r for r in runs if r.data.tags.get(keys.SPLIT) == keys.SPLIT_VALIDATION]) == 3  # parent + 2
    [tuned] = read_runs("tiny", mlflow_uri)  # the only test-split run
    assert tuned.tags[keys.TUNED] == "true" and tuned.tags[keys.METHOD] == "lora-tuned"
    assert tuned.tags[keys.SWEEP_RUN] == parent.info.run_id and tuned.tags[keys.SWEEP] == sweep_id
    assert tuned.params["method.params.rank"] == best.data.params["method.params.rank"]
    assert "final/acc" in tuned.metrics and not [k for k in tuned.metrics if k.startswith("val/")]
    [group] = build(None, mlflow_uri)
    assert group.rows[0].tuned["sweep_run"] == parent.info.run_id
    assert any(line.startswith("tuned: lora-tuned:") and parent.info.run_id in line and GRID in line
               for line in note_lines(group))


class CountingExecutor(LocalExecutor):
    """The local executor, counting jobs; interrupts (like Ctrl-C) before the job numbered ``stop_at``."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.jobs: list[str] = []
        self.stop_at = stop_at

    def run(self, jobs, *, tracker, planned, progress):
        records = []
        for job in jobs:
            if len(self.jobs) == self.stop_at:
                raise KeyboardInterrupt
            self.jobs.append(job.label)
            records += super().run([job], tracker=tracker, planned=planned, progress=progress)
        return records


def test_a_killed_sweep_continues_through_the_executor(suite_path, tmp_path, mlflow_uri):
    plan = plan_sweep(load_suite(suite_path), str(suite_path), "lora", [GRID])
    first = CountingExecutor(stop_at=1)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, executor=first, checkpoint_dir=str(tmp_path / "ck"), progress=lambda s: None)
    assert first.jobs == ["lora[rank=1]"]
    done_before = {r.run_id for r in read_runs(None, mlflow_uri, validation=True)}
    second = CountingExecutor()
    result = run_sweep(plan, executor=second, checkpoint_dir=str(tmp_path / "ck"), progress=lambda s: None)
    assert second.jobs == ["lora[rank=2]"]  # the finished trial is not rerun
    assert [r.status for r in result.records] == ["FINISHED", "FINISHED"]
    assert result.records[0].run_id in done_before and result.best is not None
    parents = [r for r in mlflow_runs(mlflow_uri) if r.data.tags.get(keys.ROLE) == keys.ROLE_PARENT]
    assert len(parents) == 1  # one sweep parent, continued


def test_random_search_is_seeded_and_validated(suite_path):
    suite = load_suite(suite_path)
    grid = ["methods.lora.train.lr=loguniform(1.0e-4,1.0e-1)", "methods.lora.params.rank=int(1,4)"]
    plan = plan_sweep(suite, str(suite_path), "lora", grid, SweepOptions(random_n=5, seed=3))
    assert len(plan.trials) == 5
    for t in plan.trials:
        lr, rank = t.point["methods.lora.train.lr"], t.point["methods.lora.params.rank"]
        assert 1e-4 <= lr <= 1e-1 and 1 <= rank <= 4 and isinstance(rank, int)
        assert yaml.safe_load(value_text(lr)) == lr  # the printed value is the value that ran
        assert t.entry["train"]["lr"] == lr and t.entry["params"]["rank"] == rank
    same = plan_sweep(suite, str(suite_path), "lora", grid, SweepOptions(random_n=5, seed=3))
    other = plan_sweep(suite, str(suite_path), "lora", grid, SweepOptions(random_n=5, seed=4))
    assert [t.point for t in same.trials] == [t.point for t in plan.trials] and same.sweep_id == plan.sweep_id
    assert [t.point for t in other.trials] != [t.point for t in plan.trials]
    grid_plan = plan_sweep(suite, str(suite_path), "inclora", ["train.lr=[0.01, 1.0e-3]",
                                                               "methods.inclora.params.rank=[1,2]"])
    assert len(grid_plan.trials) == 4 and grid_plan.suite.split == "validation"
    assert grid_plan.trials[0].entry["params"]["fresh_per_task"] is True  # the entry's own params stay
    assert grid_plan.suite.protocol_hash() != suite.protocol_hash()


@pytest.mark.parametrize("args,expect", [
    (["--method", "nope", "--grid", GRID], "--method nope: not a method label"),
    (["--method", "lora", "--grid", "methods.lora.params.rnak=[1,2]"], "unknown key 'rnak' (did you mean rank?)"),
    (["--method", "lora", "--grid", "stream.num_tasks=[1,3]"], "unknown key 'stream.num_tasks'"),
    (["--method", "lora", "--grid", "methods.inclora.params.rank=[1]"], "is not the swept method entry"),
    (["--method", "lora", "--grid", "methods.lora.params.rank=[]"], "empty grid"),
    (["--method", "lora", "--grid", "methods.lora.params.rank=[2,abc]"],
     "--grid methods.lora.params.rank=[2,abc]: rank: "),
    (["--method", "lora", "--grid", "methods.lora.params.rank=[0]"], "--grid methods.lora.params.rank=[0]: rank"),
    (["--method", "lora", "--grid", GRID, "--set", "validation.fraction=1.5"], "validation.fraction"),
    (["--method", "lora", "--random", "4"], "no --grid given; give the ranges to sample"),
    (["--method", "lora", "--grid", "methods.lora.params.rank=int(1,4)"], "add --random N"),
    (["--method", "lora", "--grid", GRID, "--metric", "val/nope"], "--metric val/nope: the trials do not log it"),
    (["--method", "lora", "--grid", GRID, "--metric", "final/acc"], "--metric final/acc: the trials do not log"),
    (["--method", "lora"], "no --grid given"),
])
def test_bad_input_is_one_line_before_any_run(suite_path, tmp_path, mlflow_uri, monkeypatch, args, expect):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["sweep", str(suite_path), "--checkpoint-dir", str(tmp_path / "ck"), *args])
    assert res.exit_code == 1, (res.output, res.exception)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and res.stderr.strip().splitlines() == errors, res.stderr
    assert expect in errors[0], errors[0]
    assert not Path(mlflow_uri.removeprefix("sqlite:///")).exists()  # nothing ran, no store made


def test_plan_refuses_an_ambiguous_method_name(suite_path):
    suite = load_suite(suite_path, ["methods.0.label=a"])  # entries a and inclora both run method lora
    with pytest.raises(ClbenchError, match="2 entries of .* use method 'lora'"):
        plan_sweep(suite, str(suite_path), "lora", ["methods.a.params.rank=[1]"])
    assert len(plan_sweep(suite, str(suite_path), "a", ["methods.a.params.rank=[1]"]).trials) == 1


@pytest.mark.slow  # Ray start-up and a worker importing torch (~1 min); the executor path is covered cheaply above
def test_sweep_on_ray_runs_validation_trials_in_workers(suite_path, tmp_path, mlflow_uri):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'clbench[ray]')")
    from clbench.run.executors import RayExecutor

    plan = plan_sweep(load_suite(suite_path), str(suite_path), "lora", [GRID])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep(plan, executor=RayExecutor(), checkpoint_dir=str(tmp_path / "ck"),
                           progress=lambda s: None)
    finally:
        ray.shutdown()
    assert [r.status for r in result.records] == ["FINISHED", "FINISHED"] and result.best is not None
    trials = read_runs(None, mlflow_uri, validation=True)
    assert len(trials) == 2 and all(t.tags[keys.SPLIT] == keys.SPLIT_VALIDATION for t in trials)
    assert all("val/acc" in t.metrics and not any(k.startswith(("eval/", "final/")) for k in t.metrics)
               for t in trials)  # the worker ran the validation split (the split travels with the pickled job)


def test_best_line_separates_keys_with_commas():
    """Issue 20's format: ``best: KEY=VALUE[, KEY=VALUE] METRIC=X``."""
    from types import SimpleNamespace

    trial = Trial(label="lora[x]", point={"methods.lora.params.rank": 2, "methods.lora.train.lr": 0.001},
                        entry={})
    result = SimpleNamespace(best=trial, best_value=26.5, plan=SimpleNamespace(metric="val/acc"))
    assert best_line(result) == "best: methods.lora.params.rank=2, methods.lora.train.lr=0.001 val/acc=26.50"


def test_a_sweep_whose_weights_are_downloaded_first_keeps_its_id(suite_path, tmp_path, mlflow_uri, monkeypatch):
    """The sweep's id hashes the suite, which covers the sha256 of the backbone's weights: the first call hashed
    `hub:<repo>, not downloaded`, every later call the downloaded file's sha256, so a rerun started a second sweep
    instead of continuing the first. The first call now plans again once the weights are there."""
    import clbench.model.backbones as backbones
    import clbench.run.runner as runner
    import clbench.suite as suite_module

    def download(name, pretrained, checkpoint):  # a hub backbone whose file arrives on the first call
        monkeypatch.setattr(suite_module, "weights_identity", lambda *a: "f" * 64)
        for module in (backbones, runner):
            monkeypatch.setattr(module, "fetch_hub_weights", lambda *a: False)
        return True

    monkeypatch.setattr(suite_module, "weights_identity", lambda *a: "hub:some/repo, not downloaded")
    for module in (backbones, runner):  # wherever the download is called from
        monkeypatch.setattr(module, "fetch_hub_weights", download)
    first = sweep(suite_path, tmp_path, "--grid", "methods.lora.params.rank=[1]")
    assert first.exit_code == 0, (first.output, first.exception)
    again = sweep(suite_path, tmp_path, "--grid", "methods.lora.params.rank=[1]", "--dry-run")
    assert again.exit_code == 0, again.output
    ids = [re.search(r"^sweep (\w+) ", res.stdout, re.M).group(1) for res in (first, again)]
    assert ids[0] == ids[1], ids
    [parent] = [r for r in mlflow_runs(mlflow_uri) if r.data.tags.get(keys.ROLE) == keys.ROLE_PARENT]
    assert parent.data.tags[keys.SWEEP] == ids[0]
