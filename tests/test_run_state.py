"""Issue 32, exit codes and run state (cases 5-10): a hook that ends the process fails its run (and `clbench
check`, whose exit code is non-zero unless every check ran and passed); `check`
refuses a plugins folder that shadows a built-in as `run` does; Ctrl-C during a checkpoint write is held until
the file is complete; a FINISHED run drops the error tag of an earlier attempt; a run another process trains
keeps the shared parent RUNNING and a sweep from picking a best; a widened sweep continues the same sweep.
The checkpoint cases of case 10 are in the bad-input corpus (tests/bad_suites/checkpoint_*.yaml).

In-process where a run is needed (one tiny one-method suite).
"""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.methods.registry import discover
from clbench.run import checkpoint, runner
from clbench.suite import load_suite
from clbench.testing import mlflow_runs, tiny_suite_yaml

QUIET = (lambda s: None)  # noqa: E731


def one_method_suite(folder: Path, name: str = "state") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(tiny_suite_yaml(name, one_method=True))
    return path


def plugin_dir(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(body))
    return folder


# -- 5. a hook that ends the process ---------------------------------------------------------------------------
EXITING = '''
    import os
    {imports}
    from clbench import hookimpl
    from clbench_plugins.lora import NaiveLoRA

    class ExitLoRA(NaiveLoRA):
        name = "exitlora"
        aliases = ()

        @hookimpl
        def before_task(self, model, ctx):
            {exit}

    def register_methods(register):
        register(ExitLoRA)
'''


@pytest.mark.parametrize("imports, exit, what", [
    ("", "os._exit(0)", "hook before_task called os._exit(0)"),
    ("from os import _exit", "_exit(0)", "hook before_task called os._exit(0)"),
    ("from posix import _exit", "_exit(0)", "hook before_task called os._exit(0)"),
    ("import sys", "sys.exit(0)", "hook before_task called SystemExit(0)"),
], ids=["os._exit", "import-time-reference", "posix._exit", "sys.exit"])
def test_check_fails_a_method_that_ends_the_process(tmp_path, monkeypatch, imports, exit, what):
    """`clbench check` printed 'ok registration' and exited 0 for a plugin that killed it: a CI passed it. A
    reference taken at the plugin's import (`from os import _exit`) is the guard's too: check holds the guard from
    before it imports the plugins folder."""
    monkeypatch.chdir(tmp_path)
    plugin_dir(tmp_path / "plugs", "exitlora", EXITING.format(imports=imports, exit=exit))
    res = CliRunner().invoke(app, ["check", "exitlora", "--plugins-dir", "plugs"])
    assert res.exit_code == 1, res.output
    assert what in res.stderr.strip().splitlines()[-1], res.stderr
    assert "Traceback" not in res.output


def test_a_hook_that_exits_fails_its_run_and_the_suite_goes_on(tmp_path, mlflow_uri):
    """SystemExit(0) in a hook: `clbench run` exited 0 with no message, the suite's other methods never ran."""
    plugs = plugin_dir(tmp_path / "plugs", "exitlora", EXITING.format(imports="", exit="raise SystemExit(0)"))
    suite = tmp_path / "s.yaml"
    suite.write_text(tiny_suite_yaml("exits").replace("{name: lora, params", "{name: exitlora, params"))
    res = CliRunner().invoke(app, ["run", str(suite), "--plugins-dir", str(plugs),
                                   "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.exit_code == 1, res.output
    [failed] = [ln for ln in res.stderr.splitlines() if "FAILED:" in ln]
    assert "hook before_task called SystemExit(0)" in failed, failed
    runs = {r.data.tags["clbench.method"]: r for r in mlflow_runs(mlflow_uri, "exits", "child")}
    assert runs["exitlora"].info.status == "FAILED" and "SystemExit(0)" in runs["exitlora"].data.tags["clbench.error"]
    assert runs["inclora"].info.status == "FINISHED"  # the suite's other method still trained


# -- 6. check refuses a plugins folder that shadows a built-in, as run does ---------------------------------------
def test_check_refuses_a_plugins_folder_that_registers_a_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plugin_dir(tmp_path / "plugs", "mylora", '''
        from clbench_plugins.lora import NaiveLoRA

        class MyLoRA(NaiveLoRA):
            name = "lora"
            aliases = ()

        def register_methods(register):
            register(MyLoRA)
    ''')
    res = CliRunner().invoke(app, ["check", "lora", "--plugins-dir", "plugs"])
    assert res.exit_code == 1, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert "registered twice" in line and "mylora.py" in line and "ok " not in res.stdout, res.output


# -- 7. Ctrl-C during a checkpoint write ----------------------------------------------------------------------
def test_ctrl_c_during_a_checkpoint_write_waits_for_the_complete_file(tmp_path, monkeypatch):
    """Ctrl-C 35-60 ms after 'task N done' crashed inside torch's zip writer or aborted the process: the
    interrupt now arrives once the atomic write is complete (the run then ends KILLED and resumes from it)."""
    import torch

    write = checkpoint.write_synced

    def interrupted(path, fn):
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler at its next bytecode: inside the write
        return write(path, fn)

    monkeypatch.setattr(checkpoint, "write_synced", interrupted)
    store = checkpoint.RunStore(tmp_path, "k")
    with pytest.raises(KeyboardInterrupt):
        store.save({"next_task": 1, "model": {"w": torch.arange(1000.0)}})
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
    monkeypatch.undo()
    ck = store.load()
    assert ck is not None and torch.equal(ck["model"]["w"], torch.arange(1000.0))
    assert not list(tmp_path.glob(".checkpoint.pt.tmp-*"))


# -- 8. a FINISHED run keeps no error tag ------------------------------------------------------------------------
def test_a_run_finished_by_a_rerun_drops_the_error_of_the_failed_attempt(tmp_path, mlflow_uri, monkeypatch):
    from clbench.run import loop

    suite_path = one_method_suite(tmp_path)
    suite, ck = load_suite(suite_path), str(tmp_path / "ck")
    train_task = loop.train_task

    def crashes(loop_, ctx, *args, **kwargs):
        if ctx.task == 1:
            raise RuntimeError("CUDA error: an illegal memory access")
        return train_task(loop_, ctx, *args, **kwargs)

    monkeypatch.setattr(loop, "train_task", crashes)
    with pytest.raises(RuntimeError):
        runner.run_suite(suite, str(suite_path), runner.RunOptions(progress=QUIET, checkpoint_dir=ck))
    assert all("clbench.error" in r.data.tags for r in mlflow_runs(mlflow_uri, "state"))
    monkeypatch.setattr(loop, "train_task", train_task)
    runner.run_suite(suite, str(suite_path), runner.RunOptions(progress=QUIET, checkpoint_dir=ck))
    runs = mlflow_runs(mlflow_uri, "state")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert [r.data.tags.get("clbench.error") for r in runs] == [None, None]


# -- 9. two processes on one suite or sweep ---------------------------------------------------------------------
def test_a_run_that_another_process_trains_keeps_the_shared_parent_running(tmp_path, mlflow_uri, monkeypatch):
    """A second `clbench run` that found every run busy marked the shared parent FINISHED while the first still
    trained."""
    from clbench.run import loop

    suite_path = one_method_suite(tmp_path)
    suite, ck = load_suite(suite_path), str(tmp_path / "ck")
    monkeypatch.setattr(loop, "train_task", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # the first process: its parent and run exist ...
        runner.run_suite(suite, str(suite_path), runner.RunOptions(progress=QUIET, checkpoint_dir=ck))
    [parent] = mlflow_runs(mlflow_uri, "state", "parent")
    [planned] = runner.plan_runs(suite, str(suite_path), discover([]), None)
    sdir = checkpoint.suite_dir(ck, suite.protocol_hash(), suite.name, "state", mlflow_uri)
    first = runner._store(sdir, suite, planned, 0)
    assert first.lock()  # ... and it trains the run right now (it holds the run's lock)
    try:
        lines: list[str] = []
        [record] = runner.run_suite(suite, str(suite_path), runner.RunOptions(progress=lines.append,
                                                                              checkpoint_dir=ck))
    finally:
        first.unlock()
    assert record.status == "BUSY"
    assert any("stays RUNNING" in ln for ln in lines), lines
    [parent] = mlflow_runs(mlflow_uri, "state", "parent")
    assert parent.info.status == "RUNNING"  # the first process, not this one, finishes it


def _sweep(suite_path: Path, values: str):
    from clbench.run.sweep import plan_sweep

    return plan_sweep(load_suite(suite_path), str(suite_path), "lora", [f"methods.lora.params.rank={values}"])


def test_a_sweep_whose_points_another_process_trains_picks_no_best(tmp_path, mlflow_uri):
    """Two identical sweeps at once each picked their own best (and --then-test made two LABEL-tuned rows)."""
    from clbench.run.sweep import run_sweep

    suite_path = one_method_suite(tmp_path)
    plan, ck = _sweep(suite_path, "[1,2]"), str(tmp_path / "ck")
    sdir = checkpoint.suite_dir(ck, plan.suite.protocol_hash(), plan.suite.name, plan.suite.tracking.experiment,
                                mlflow_uri)
    stores = [runner._store(sdir, plan.suite, p, plan.seed)
              for p in runner.plan_runs(plan.suite, str(suite_path), discover([]), None)]
    assert all(st.lock() for st in stores)  # the other sweep trains every point now
    try:
        with pytest.raises(ClbenchError, match=r"2 of its 2 points are being trained by another clbench process"):
            run_sweep(plan, checkpoint_dir=ck, progress=QUIET)
    finally:
        for st in stores:
            st.unlock()


def test_a_widened_grid_continues_the_same_sweep(tmp_path):
    """Widening the grid after a kill retrained the finished points and left the killed sweep's parent RUNNING:
    the sweep's identity (its checkpoint folder and parent run) no longer depends on its points."""
    suite_path = one_method_suite(tmp_path)
    narrow, wide = _sweep(suite_path, "[1,2]"), _sweep(suite_path, "[1,2,4]")
    assert narrow.sweep_id == wide.sweep_id and narrow.suite.name == wide.suite.name
    assert [t.label for t in narrow.trials] == [t.label for t in wide.trials][:2]
    narrow_keys, wide_keys = ({p.label: runner.run_key(s.suite, p, 0)
                               for p in runner.plan_runs(s.suite, str(suite_path), discover([]), None)}
                              for s in (narrow, wide))
    assert len(wide_keys) == 3 and narrow_keys.items() <= wide_keys.items()  # a shared point: one run, one folder
