"""Resume after any crash: SIGKILL (and Ctrl-C) at named points of a tiny suite, then `clbench run` again.

One chain of `clbench run` processes, each killed at a different point, the last one left to finish; compared
with an uninterrupted run of the same suite. The kill is injected from the test side: the child process runs
``KILLER`` (below), which wraps one function of clbench to kill the process there, then runs the CLI; production
code knows nothing about it. Subprocesses are few on purpose: each costs seconds of imports.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.run import checkpoint
from clbench.run.runner import RunOptions, run_suite
from clbench.store.tracking import MlflowTracker
from clbench.suite import load_suite
from clbench.testing import mlflow_runs, tiny_suite_yaml

LABELS = ("lora", "inclora")
T = 3


def write_suite(folder: Path, name: str = "resume") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(tiny_suite_yaml(name))
    return path


def children(uri: str, experiment: str) -> dict:
    return {r.data.tags["clbench.method"]: r for r in mlflow_runs(uri, experiment, "child")}


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


# ``python -c KILLER POINT:TASK[:INT|:TERM] clbench-args...``: `clbench run` that kills itself with SIGKILL (SIGINT
# with ``:INT``, SIGTERM with ``:TERM``) the first time it reaches POINT of task TASK: ``train`` (the task's
# training starts), ``eval`` (the evaluation after the task starts), ``checkpoint`` (the task's checkpoint written to
# its temporary file, not yet renamed), ``ckwrite`` (the signal arrives while the TASK-th checkpoint file of the
# process is being written), ``log`` (the task's metrics in MLflow, before anything else), ``suite``
# (every run finished, the suite's figures about to be recorded on the parent run: the last seconds; TASK unused).
KILLER = """
import os, signal, sys
from pathlib import Path

from clbench.run import checkpoint, loop, recorder, runner

point, task, *how = sys.argv[1].split(":")
task = int(task)
fired = []


def die():
    fired.append(1)
    os.kill(os.getpid(), {"INT": signal.SIGINT, "TERM": signal.SIGTERM}.get("".join(how), signal.SIGKILL))


def at(owner, name, when):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            die()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if point == "suite":
    at(runner, "record_suite", lambda *a, **k: True)
elif point == "train":
    at(loop, "train_task", lambda loop_, ctx, *a, **k: ctx.task == task)
elif point == "eval":
    at(loop, "evaluate", lambda loop_, upto, *a, **k: upto == task)
elif point == "checkpoint":
    def half_written(store, payload):
        data = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "key": store.key, **payload}
        checkpoint.write_synced(checkpoint.temporary_path(store.path), lambda f: checkpoint.torch.save(data, f))
        return True

    at(checkpoint.RunStore, "save", lambda store, payload: payload["next_task"] - 1 == task and half_written(store, payload))
elif point == "ckwrite":  # a signal while the checkpoint file is being written (held until it is complete)
    write, seen = checkpoint.write_synced, []

    def interrupted(path, fn):  # the write of task TASK's checkpoint (the run's TASK-th checkpoint, 0-based)
        if path.name.startswith(".checkpoint.pt"):
            seen.append(path)
            if not fired and len(seen) == task + 1:
                die()
        return write(path, fn)

    checkpoint.write_synced = interrupted
elif point == "log":
    original = recorder.RunRecorder.on_task

    def on_task(self, result, state, model):
        original(self, result, state, model)
        if not fired and result.task == task:
            die()

    recorder.RunRecorder.on_task = on_task
sys.argv = ["clbench", *sys.argv[2:]]
from clbench.cli import main

main()
"""


def start_run(suite: Path, ckdir: Path, uri: str, kill: str | None) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}  # explicit: mlflow.set_tracking_uri rewrites os.environ
    args = ["run", str(suite), "--checkpoint-dir", str(ckdir)]
    cmd = [sys.executable, "-c", KILLER, kill, *args] if kill else [sys.executable, "-m", "clbench.cli", *args]
    # A test process started with nohup or `&` from a script inherits an ignored SIGINT, and Python then keeps it
    # ignored: the child gets the default disposition back, so the Ctrl-C point raises KeyboardInterrupt.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def clbench_run(suite: Path, ckdir: Path, uri: str, kill: str | None) -> subprocess.CompletedProcess:
    proc = start_run(suite, ckdir, uri, kill)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# eight `clbench run` processes (minutes on 2 shared cores); the default run's cover is tests/test_lifecycle.py's
# test_ctrl_c_at_task_0_then_task_1_resumes_the_same_run_to_the_uninterrupted_metrics (in-process) with
# tests/test_contract.py's bit-exact resume of every method
@pytest.mark.slow
def test_killed_at_every_point_resumes_to_identical_metrics(tmp_path, mlflow_uri):
    suite_path = write_suite(tmp_path)
    ckdir = tmp_path / "ck"

    # The reference: an uninterrupted `clbench run` of the same suite into another store, alongside the first
    # interrupted one. (A process, like the others: an in-process run differed in the last bit of a float64
    # spectrum, from the process's numerical environment, not from resuming.)
    ref_uri = f"sqlite:///{tmp_path / 'reference.db'}"
    reference = start_run(suite_path, tmp_path / "ref-ck", ref_uri, None)

    # SIGKILL during lora's first task, before any checkpoint: its child run is left RUNNING, and its id is
    # already in the run's folder.
    p = clbench_run(suite_path, ckdir, mlflow_uri, "train:0")
    assert p.returncode == -signal.SIGKILL, p.stderr[-6000:]
    first = children(mlflow_uri, "resume")["lora"].info.run_id

    # Ctrl-C during lora's task 1: the same MLflow run was continued from its first task; run and suite KILLED,
    # task 0 checkpointed.
    p = clbench_run(suite_path, ckdir, mlflow_uri, "train:1:INT")
    _, ref_err = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_err[-6000:]
    ref_children = children(ref_uri, "resume")
    assert p.returncode == 1, p.stderr[-6000:]
    assert "interrupted" in p.stderr.splitlines()[-1] and "Traceback" not in p.stderr
    assert f"resuming MLflow run {first} from its first task" in p.stderr
    killed = children(mlflow_uri, "resume")
    assert killed["lora"].info.status == "KILLED" and killed["lora"].info.run_id == first
    [parent] = mlflow_runs(mlflow_uri, "resume", "parent")
    assert parent.info.status == "KILLED"
    sdir = next(ckdir.iterdir())
    [ck_path] = sdir.glob("lora-*-s0/checkpoint.pt")
    ck = torch.load(ck_path, weights_only=True)
    assert ck["next_task"] == 1 and ck["run_id"] == first

    # SIGKILL while writing lora's task-1 checkpoint, mid-evaluation of task 2, right after inclora's task-1
    # metrics reached MLflow (its checkpoint already written); SIGTERM during inclora's last task (handled like
    # Ctrl-C: KILLED, one line, exit 1); SIGKILL in the last seconds (every run finished, the parent's figures not
    # yet recorded); the last invocation has nothing left to train and finishes the parent.
    for point in ("checkpoint:1", "eval:2", "log:1", "train:2:TERM", "suite:0"):
        p = clbench_run(suite_path, ckdir, mlflow_uri, point)
        if point.endswith("TERM"):
            assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-6000:]
            assert "resuming MLflow run" in p.stderr
            assert {r.info.status for r in mlflow_runs(mlflow_uri, "resume")} == {"KILLED", "FINISHED"}
        else:
            assert p.returncode == -signal.SIGKILL, (point, p.stderr[-6000:])
    p = clbench_run(suite_path, ckdir, mlflow_uri, None)
    assert p.returncode == 0, p.stderr[-6000:]
    assert "finishing suite run" in p.stderr
    assert not list(sdir.glob("*/.checkpoint.pt.tmp-*"))  # the half-written checkpoint was discarded

    runs = mlflow_runs(mlflow_uri, "resume")
    assert len(runs) == 3, [r.data.tags.get("mlflow.runName") for r in runs]  # one parent, two children
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.data.tags.get("mlflow.runName"), r.info.status)
                                                           for r in runs]
    [parent] = [r for r in runs if r.data.tags.get("clbench.role") == "parent"]
    assert parent.data.metrics["suite/runs_finished"] == 2
    got = children(mlflow_uri, "resume")
    for label in LABELS:
        run, want = got[label], ref_children[label]
        assert run.info.status == "FINISHED"
        for key in [k for k in want.data.metrics if k.startswith(("eval/", "spectra/", "train/loss"))]:
            h = history(mlflow_uri, run.info.run_id, key)
            steps = [s for s, _ in h]
            assert steps == sorted(set(steps)), f"{label} {key}: duplicate steps {steps}"  # no duplicates
            assert h == history(ref_uri, want.info.run_id, key), f"{label} {key}"  # no lost task, same values
        assert [s for s, _ in history(mlflow_uri, run.info.run_id, "eval/acc")] == list(range(T))
        for key, value in want.data.metrics.items():
            if key.startswith(("final/", "spectra/mean")):
                assert run.data.metrics[key] == value, f"{label} {key}"
                assert len(history(mlflow_uri, run.info.run_id, key)) == 1

    # Finished runs are skipped: no new MLflow run.
    records = run_suite(load_suite(suite_path), str(suite_path), RunOptions(tracker=MlflowTracker("resume", mlflow_uri),
                                                                            progress=lambda s: None,
                                                                            checkpoint_dir=str(ckdir)))
    assert [r.run_id for r in records] == [got[label].info.run_id for label in LABELS]
    assert [r.status for r in records] == ["FINISHED", "FINISHED"]
    assert records[0].metrics["final/acc"] == ref_children["lora"].data.metrics["final/acc"]
    assert len(mlflow_runs(mlflow_uri, "resume")) == 3

    # --restart forces a fresh run (a new parent and a new child), with the same accuracies.
    res = CliRunner().invoke(app, ["run", str(suite_path), "--checkpoint-dir", str(ckdir), "--restart",
                                   "--method", "inclora", "--set", f"tracking.uri={mlflow_uri}"])
    assert res.exit_code == 0, res.output
    assert len(mlflow_runs(mlflow_uri, "resume")) == 5
    [fresh] = [r for r in mlflow_runs(mlflow_uri, "resume", "child")
               if r.info.run_id not in {got[label].info.run_id for label in LABELS}]
    assert fresh.info.status == "FINISHED"
    assert (history(mlflow_uri, fresh.info.run_id, "eval/acc")
            == history(ref_uri, ref_children["inclora"].info.run_id, "eval/acc"))


NAN_PLUGIN = """
\"\"\"A test method: naive LoRA whose loss turns NaN on task 1.\"\"\"
import torch
from clbench.methods.hookspecs import hookimpl
from clbench_plugins.lora import NaiveLoRA


class NanLoRA(NaiveLoRA):
    name = "nanlora"
    aliases = ()

    @hookimpl
    def loss_terms(self, model, batch, logits, ctx):
        return {"boom": logits.sum() * float("nan")} if ctx.task == 1 else {}


def register_methods(register):
    register(NanLoRA)
"""


def test_nonfinite_loss_fails_that_run_keeps_its_work_and_the_suite_goes_on(tmp_path, mlflow_uri):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "nanlora.py").write_text(NAN_PLUGIN)
    text = tiny_suite_yaml("nan").replace("  - {name: lora, label: inclora, params: {rank: 2, fresh_per_task: true}}",
                                          "  - {name: nanlora, params: {rank: 2}}")
    suite_path = tmp_path / "nan.yaml"
    suite_path.write_text(text + "plugins_dir: plugins\n")
    lines: list[str] = []
    records = run_suite(load_suite(suite_path), str(suite_path), RunOptions(tracker=MlflowTracker("nan", mlflow_uri),
                                                                            progress=lines.append,
                                                                            checkpoint_dir=str(tmp_path / "ck"),
                                                                            trust_suite_plugins=True))
    assert [(r.method, r.status) for r in records] == [("lora", "FINISHED"), ("nanlora", "FAILED")]
    assert any("FAILED: non-finite training loss on task 1" in ln for ln in lines), lines
    got = children(mlflow_uri, "nan")
    assert got["nanlora"].info.status == "FAILED"
    assert "non-finite" in got["nanlora"].data.tags["clbench.error"]
    assert got["lora"].info.status == "FINISHED"
    # Nothing computed is lost: task 0's metrics stay in MLflow and its checkpoint stays on disk.
    assert [s for s, _ in history(mlflow_uri, got["nanlora"].info.run_id, "eval/acc")] == [0]
    [ck_path] = (tmp_path / "ck").glob("*/nanlora-*-s0/checkpoint.pt")
    assert torch.load(ck_path, weights_only=True)["next_task"] == 1


def test_unreachable_tracking_server_fails_fast_with_one_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    suite_path = write_suite(tmp_path, "unreachable")
    res = CliRunner().invoke(app, ["run", str(suite_path), "--tracking-uri", f"http://127.0.0.1:{port}"])
    assert res.exit_code == 1
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and f"http://127.0.0.1:{port}" in err[0] and "cannot reach" in err[0], res.stderr
    assert "building stream" not in res.stderr  # detected before any data or training


@pytest.mark.slow  # two processes; the default run's cover: test_run_state's in-process Ctrl-C during the write
def test_ctrl_c_while_the_checkpoint_is_written_ends_killed_with_the_checkpoint_complete(tmp_path, mlflow_uri):
    """Ctrl-C 35-60 ms after 'task N done' crashed inside torch's zip writer (a 60-line traceback, the run
    FAILED) or aborted the process: the interrupt now waits for the complete file (issue 32 case 7)."""
    suite_path = tmp_path / "ckwrite.yaml"
    suite_path.write_text(tiny_suite_yaml("ckwrite", one_method=True))
    ckdir = tmp_path / "ck"
    p = clbench_run(suite_path, ckdir, mlflow_uri, "ckwrite:0:INT")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-6000:]
    assert "interrupted" in p.stderr.splitlines()[-1]
    assert {r.info.status for r in mlflow_runs(mlflow_uri, "ckwrite")} == {"KILLED"}
    [ck_path] = next(ckdir.iterdir()).glob("lora-*-s0/checkpoint.pt")
    assert torch.load(ck_path, weights_only=True)["next_task"] == 1  # complete, and loadable
    p = clbench_run(suite_path, ckdir, mlflow_uri, None)
    assert p.returncode == 0 and "after task 1/3" in p.stderr, p.stderr[-6000:]


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["CLBENCH_CACHE"]) / "pwned",))


def test_checkpoints_load_weights_only_and_foreign_files_give_one_line(tmp_path):
    store = checkpoint.RunStore(tmp_path / "run", "key")
    store.dir.mkdir()
    store.path.write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "x": _Evil()}))
    with pytest.raises(ClbenchError, match="cannot be read .*--restart"):
        store.load()
    assert not (Path(os.environ["CLBENCH_CACHE"]) / "pwned").exists()  # the pickle's payload never ran
    torch.save({"state_dict": {}}, store.path)
    with pytest.raises(ClbenchError, match="not a clbench checkpoint"):
        store.load()
    store.save({"next_task": 1, "R": torch.zeros(2)})
    assert store.load()["next_task"] == 1
    with pytest.raises(ClbenchError, match="belongs to another run .*--restart"):  # never resumed, never ignored
        checkpoint.RunStore(store.dir, "another run").load()
    assert not list(store.dir.glob(".checkpoint.pt.tmp-*"))


def test_method_state_that_would_not_load_is_refused_when_saved():
    checkpoint.check_loadable({"basis": torch.eye(2), "n": [1, 2.5, "x", None]}, "ok")
    with pytest.raises(ClbenchError, match="method 'x': method_state.. cannot be checkpointed"):
        checkpoint.check_loadable({"basis": np.eye(2)}, "method 'x': method_state()")


def test_rng_state_roundtrip():
    state = checkpoint.rng_state()
    a = (torch.rand(3), np.random.rand(3))
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
