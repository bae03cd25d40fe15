"""A run's lifecycle and the data it leaves (issue 23, items 1-7 and the lifecycle half of its misleading-failure
list): stores created all or nothing, run ids recorded before training, parents finished by a rerun, folders
checked before any run exists, collision-free per-params run folders, absolute tracking URIs, strict-JSON done
markers, --restart under the lock. The kill-at-any-instant chain is tests/test_resume.py; these are in-process
and cheap (one tiny one-method suite where a run is needed)."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.run import checkpoint, runner
from clbench.store import tracking
from clbench.store.tracking import MlflowTracker
from clbench.suite import load_suite
from clbench.testing import mlflow_runs, tiny_suite_yaml


def one_method_suite(folder: Path, name: str = "life") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(tiny_suite_yaml(name, one_method=True))
    return path


# -- item 1: a store is created all or nothing ----------------------------------------------------------------
def half_made_store(path: Path) -> None:
    """What a kill right after "Creating initial MLflow database tables" leaves: the first tables, no migration."""
    import sqlalchemy
    from mlflow.store.tracking.dbmodels.initial_models import Base

    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    engine.dispose()


def test_half_made_store_without_runs_is_rebuilt_and_leaderboard_never_writes(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    half_made_store(db)
    assert tracking.sqlite_store_state(db) == ("half-made", 0)
    # reading never repairs (nor writes): one line that says what to do, no "start the server"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    res = CliRunner().invoke(app, ["leaderboard"])
    assert res.exit_code == 1 and "half-made" in res.stderr and "clbench run" in res.stderr, res.stderr
    assert "start the server" not in res.stderr
    tracker = MlflowTracker("life", f"sqlite:///{db}")  # what `clbench run` opens: rebuilt, then usable
    assert tracking.sqlite_store_state(db)[0] == "complete"
    tracker.end_run(tracker.start_run("x", {}, {}), "FINISHED")
    assert not list(tmp_path.glob(".mlflow.db.creating-*"))

    # an empty file (a store about to be created) is no store to read: no table is created in it
    empty = tmp_path / "empty.db"
    empty.touch()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{empty}")
    res = CliRunner().invoke(app, ["leaderboard"])
    assert res.exit_code == 1 and "holds no MLflow store" in res.stderr, res.stderr
    assert empty.stat().st_size == 0


def test_damaged_store_with_runs_is_left_alone_with_advice(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    tracker = MlflowTracker("life", uri)
    tracker.end_run(tracker.start_run("x", {}, {}), "FINISHED")
    with sqlite3.connect(db) as con:  # a migration cut short: the recorded schema is older than the tables
        con.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")
    with pytest.raises(ClbenchError) as err:  # another spelling of the path: MLflow caches a store per URI
        MlflowTracker("life", f"sqlite:///{tmp_path}/../{tmp_path.name}/mlflow.db")
    msg = str(err.value)
    assert "1 runs" in msg and "backup" in msg and "start the server" not in msg, msg
    assert tracking.sqlite_store_state(db) == ("half-made", 1)  # nothing was deleted


# -- items 2-4: run ids recorded, parents finished, failures end every opened run ------------------------------
def planned_store(tmp_path, mlflow_uri):
    """The one-method suite, its tracker and checkpoint dir, and the RunStore the runner will use for seed 0."""
    suite_path = one_method_suite(tmp_path)
    suite, ckdir = load_suite(suite_path), str(tmp_path / "ck")
    tracker = MlflowTracker("life", mlflow_uri)
    [run] = runner.plan_runs(suite, str(suite_path), runner.discover([]), None)
    sdir = checkpoint.suite_dir(ckdir, suite.protocol_hash(), suite.name, "life", tracker.uri)
    return suite_path, suite, ckdir, tracker, runner._store(sdir, suite, run, 0)  # its folder, key and code identity


def test_truncated_checkpoint_restart_marks_old_run_killed(tmp_path, mlflow_uri):
    suite_path, suite, ckdir, tracker, store = planned_store(tmp_path, mlflow_uri)
    old = tracker.start_run("lora-s0", {"clbench.role": "child"}, {})  # a run left RUNNING by a kill ...
    store.record_run(old)
    store.path.write_bytes(b"\x80\x04 truncated")  # ... whose checkpoint was cut short
    with pytest.raises(ClbenchError, match="cannot be read"):
        runner.run_suite(suite, str(suite_path), runner.RunOptions(tracker=tracker, progress=lambda s: None,
                                                                   checkpoint_dir=ckdir))
    assert tracker.run_status(old) == "RUNNING"
    lines: list[str] = []
    [record] = runner.run_suite(suite, str(suite_path), runner.RunOptions(tracker=tracker,
                                                                          progress=lines.append,
                                                                          checkpoint_dir=ckdir, restart=True))
    assert tracker.run_status(old) == "KILLED"
    assert record.status == "FINISHED" and record.run_id != old
    assert any(f"starting MLflow run {record.run_id}" in ln for ln in lines), lines
    assert store.recorded_run() == record.run_id
    # done.json is strict JSON (the accuracy matrix's unseen cells are null, not NaN)
    done = json.loads(store.done_path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in done.json"))
    assert done["R"][0][1] is None
    assert np.isnan(runner._finished_record(("lora", 0), store, tracker).R[0, 1])


def test_failure_after_the_parent_exists_ends_it_failed_and_a_rerun_finishes_it(tmp_path, mlflow_uri, monkeypatch):
    suite_path = one_method_suite(tmp_path)
    suite, ckdir = load_suite(suite_path), str(tmp_path / "ck")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "record_suite", broken)
    with pytest.raises(ClbenchError, match="disk full: .*No space left on device"):  # one line (clbench.run.recorder)
        runner.run_suite(suite, str(suite_path), runner.RunOptions(progress=lambda s: None,
                                                                   checkpoint_dir=ckdir))
    [parent] = mlflow_runs(mlflow_uri, "life", "parent")
    assert parent.info.status == "FAILED" and "No space left" in parent.data.tags["clbench.error"]
    assert mlflow_runs(mlflow_uri, "life", "child")[0].info.status == "FINISHED"

    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    lines: list[str] = []
    runner.run_suite(suite, str(suite_path), runner.RunOptions(progress=lines.append, checkpoint_dir=ckdir))
    assert any("finishing suite run" in ln for ln in lines), lines
    runs = mlflow_runs(mlflow_uri, "life")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert mlflow_runs(mlflow_uri, "life", "parent")[0].data.metrics["suite/runs_finished"] == 1


def test_ctrl_c_at_task_0_then_task_1_resumes_the_same_run_to_the_uninterrupted_metrics(tmp_path, mlflow_uri,
                                                                                        monkeypatch):
    """In-process and seconds long, the default run's cover of tests/test_resume.py's kill chain (slow: SIGKILL,
    SIGTERM and Ctrl-C at every point through `clbench run` processes): interrupted before task 0's checkpoint and
    again in task 1, the reruns continue the one MLflow run, which ends as an uninterrupted run does."""
    from clbench.run import loop

    suite_path = one_method_suite(tmp_path)
    suite, ckdir, quiet = load_suite(suite_path), str(tmp_path / "ck"), (lambda s: None)
    ref_uri = f"sqlite:///{tmp_path / 'reference.db'}"
    [want] = runner.run_suite(suite, str(suite_path), runner.RunOptions(tracker=MlflowTracker("life", ref_uri),
                                                                        progress=quiet,
                                                                        checkpoint_dir=str(tmp_path / "ref-ck")))
    train_task = loop.train_task
    for task in (0, 1):
        def interrupted(loop_, ctx, *args, task=task, **kwargs):
            if ctx.task == task:
                raise KeyboardInterrupt
            return train_task(loop_, ctx, *args, **kwargs)

        monkeypatch.setattr(loop, "train_task", interrupted)
        with pytest.raises(KeyboardInterrupt):
            runner.run_suite(suite, str(suite_path), runner.RunOptions(tracker=MlflowTracker("life", mlflow_uri),
                                                                       progress=quiet, checkpoint_dir=ckdir))
        assert {r.info.status for r in mlflow_runs(mlflow_uri, "life")} == {"KILLED"}
    monkeypatch.setattr(loop, "train_task", train_task)
    lines: list[str] = []
    [got] = runner.run_suite(suite, str(suite_path), runner.RunOptions(tracker=MlflowTracker("life", mlflow_uri),
                                                                       progress=lines.append,
                                                                       checkpoint_dir=ckdir))
    assert any(f"resuming MLflow run {got.run_id} after task 1/3" in ln for ln in lines), lines
    runs = mlflow_runs(mlflow_uri, "life")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}  # one parent, one child
    assert np.array_equal(got.R, want.R, equal_nan=True)
    assert {k: v for k, v in got.metrics.items() if k.startswith("final/")} == \
        {k: v for k, v in want.metrics.items() if k.startswith("final/")}
    client = MlflowTracker("life", mlflow_uri).client
    steps = [m.step for m in client.get_metric_history(got.run_id, "eval/acc")]
    assert sorted(steps) == [0, 1, 2]  # each task logged once: none lost, none repeated


def test_unusable_checkpoint_dir_is_refused_before_any_run_exists(tmp_path, mlflow_uri):
    suite_path = one_method_suite(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = CliRunner().invoke(app, ["run", str(suite_path), "--checkpoint-dir", str(blocker)])
    assert res.exit_code == 1, res.output
    err = [ln for ln in res.stderr.splitlines() if ln.strip() and "INFO" not in ln]
    assert len(err) == 1 and "--checkpoint-dir" in err[0] and "Traceback" not in res.stderr, res.stderr
    assert mlflow_runs(mlflow_uri, "life") == []


def test_long_names_fit_any_file_system():
    key = "k" * 16
    assert len(checkpoint.suite_dir("/r", "p", "n" * 300, "e", "u").name) < 100
    assert len(checkpoint.run_folder(Path("/r"), "l" * 300, key, 0).name) < 100


def test_restart_waits_for_the_lock_of_a_run_being_trained(tmp_path, mlflow_uri):
    suite_path, suite, ckdir, tracker, training = planned_store(tmp_path, mlflow_uri)
    training.save({"next_task": 1})
    assert training.lock()  # another process trains it now
    try:
        with pytest.raises(ClbenchError, match="--restart: lora seed 0 is being trained"):
            runner.run_suite(suite, str(suite_path), runner.RunOptions(tracker=tracker,
                                                                       progress=lambda s: None,
                                                                       checkpoint_dir=ckdir, restart=True))
    finally:
        training.unlock()
    assert training.path.exists() and mlflow_runs(mlflow_uri, "life") == []


# -- items 5-7: one folder per exact label and params, keyed on the absolute store ----------------------------
def test_run_folders_are_collision_free_and_per_params(tmp_path):
    sdir = tmp_path / "suite"
    assert checkpoint.run_folder(sdir, "lora/ü", "k", 0) != checkpoint.run_folder(sdir, "lora_ü", "k", 0)
    assert checkpoint.run_folder(sdir, "lora", "rank 2", 0) != checkpoint.run_folder(sdir, "lora", "rank 4", 0)
    assert checkpoint.run_folder(sdir, "lora", "k", 0) == checkpoint.run_folder(sdir, "lora", "k", 0)


def test_labels_that_cannot_be_told_apart_are_refused(tmp_path):
    """Labels differing only in case; those differing in Unicode form (é composed or not) never get this far:
    a label is ASCII (tests/test_run_trust.py)."""
    text = tiny_suite_yaml("twins").replace("label: inclora", "label: LoRA_E")
    text = text.replace("  - {name: lora, params: {rank: 2}}", "  - {name: lora, label: lora_e, params: {rank: 2}}")
    path = tmp_path / "twins.yaml"
    path.write_text(text)
    with pytest.raises(ClbenchError, match="cannot be told apart"):
        runner.run_suite(load_suite(path), str(path), runner.RunOptions(dry_run=True,
                                                                        progress=lambda s: None))
    path.write_text(text.replace("label: lora_e,", "label: lora_\u00e9,"))
    with pytest.raises(ClbenchError, match=r"methods\.0\.label: .*U\+00E9 LATIN SMALL LETTER E WITH ACUTE"):
        load_suite(path)


def test_relative_tracking_uri_is_keyed_on_its_absolute_path(tmp_path, monkeypatch):
    uris = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        uris.append(MlflowTracker("life", "sqlite:///mlflow.db").uri)
    assert uris[0] != uris[1] and all(u == f"sqlite:///{tmp_path / f}/mlflow.db" for u, f in zip(uris, "ab"))


def test_done_marker_is_strict_json(tmp_path):
    store = checkpoint.RunStore(tmp_path, "k")
    store.mark_done("r", {"final/acc": 1.0, "final/bwt": float("nan")}, np.array([[1.0, np.nan]]))
    json.loads(store.done_path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in done.json"))
    info = store.done()
    assert np.isnan(info["metrics"]["final/bwt"]) and info["R"] == [[1.0, None]]


def test_sigterm_stops_like_ctrl_c_and_a_second_signal_raises_nothing(capsys):
    import os
    import signal

    with pytest.raises(KeyboardInterrupt), runner._stop_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pthread_kill(threading.main_thread().ident, 0)  # let the handler run here
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGINT)  # while the runs are being ended: a message, no exception
            signal.pthread_kill(threading.main_thread().ident, 0)
            raise
    assert "still ending the runs as KILLED" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_dry_run_after_a_finished_run_says_skip_where_the_real_run_skips(tmp_path, mlflow_uri):
    """--dry-run applies the real run's skip rule (a done checkpoint whose MLflow run is FINISHED), labels the
    suite hash and the checkpoint folder apart, keeps its lines short and ends with a summary."""
    suite_path, suite, ckdir, tracker, store = planned_store(tmp_path, mlflow_uri)
    lines: list[str] = []
    runner.run_suite(suite, str(suite_path), runner.RunOptions(progress=lines.append, checkpoint_dir=ckdir,
                                                               dry_run=True))
    assert lines[-1].startswith("1 runs: 1 run;") and any(ln.startswith("  run ") for ln in lines), lines
    run_id = tracker.start_run("lora-s0", {"clbench.role": "child"}, {})
    tracker.end_run(run_id, "FINISHED")
    store.dir.mkdir(parents=True)
    store.mark_done(run_id, {"final/acc": 50.0}, np.full((2, 2), 50.0))
    lines.clear()
    runner.run_suite(suite, str(suite_path), runner.RunOptions(progress=lines.append, checkpoint_dir=ckdir,
                                                               dry_run=True))
    assert any(ln.startswith("  skip (finished) ") and run_id in ln for ln in lines), lines
    assert lines[-1].startswith("1 runs: 1 skip (finished);")
    assert f"suite hash {suite.protocol_hash()} (the protocol" in lines[0]
    assert lines[1].startswith("checkpoint folder ") and "not the suite hash" in lines[2]
    assert max(len(ln) for ln in lines[3:]) <= 120, lines
    real: list[str] = []
    [record] = runner.run_suite(suite, str(suite_path), runner.RunOptions(tracker=tracker,
                                                                          progress=real.append,
                                                                          checkpoint_dir=ckdir))
    assert record.run_id == run_id and any("already finished" in ln for ln in real), real  # the real run skips too
    lines.clear()
    runner.run_suite(suite, str(suite_path), runner.RunOptions(progress=lines.append, checkpoint_dir=ckdir,
                                                               dry_run=True, restart=True))
    assert lines[-1].startswith("1 runs: 1 run;")  # --restart would train it again
