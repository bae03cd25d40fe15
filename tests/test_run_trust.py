"""Issue 32, data loss and trust (cases 1-4): a store that does not persist is refused; a checkpoint or finished
run of other code (the method's source digest, clbench's version) is refused, never continued or skipped; the
command line and the environment decide where results go, said before the first run, and a suite's relative
tracking.uri is the suite folder's; labels hold only a safe character set.

In-process and cheap: one tiny one-method suite where a run is needed. The suite-file cases are also in the
bad-input corpus (tests/bad_suites: store_memory, label_*).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.run import runner
from clbench.store import tracking
from clbench.suite import load_suite
from clbench.testing import lora_plugin, mlflow_runs, tiny_suite, write_plugin


def one_method_suite(folder: Path, name: str = "trust") -> Path:
    return tiny_suite(folder, name, one_method=True)


def one_error(res) -> str:
    """The single ``error:`` line a refused command printed (exit 1, no traceback)."""
    assert res.exit_code == 1, (res.exit_code, res.output)
    assert "Traceback" not in res.output, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


# -- 1. a store that does not persist ---------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["sqlite:///:memory:", "sqlite://", "sqlite:///file::memory:?cache=shared"])
def test_a_store_that_does_not_persist_is_refused_before_training(tmp_path, monkeypatch, uri):
    suite = one_method_suite(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    res = CliRunner().invoke(app, ["run", str(suite), "--checkpoint-dir", str(tmp_path / "ck")])
    line = one_error(res)
    assert "does not persist" in line and "MLFLOW_TRACKING_URI" in line, line
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").rglob("checkpoint.pt"))


def test_a_suite_naming_an_in_memory_store_is_refused_naming_the_key(tmp_path):
    suite = one_method_suite(tmp_path)
    suite.write_text(suite.read_text().replace("tracking: {experiment: trust}",
                                               "tracking: {experiment: trust, uri: 'sqlite:///:memory:'}"))
    with pytest.raises(ClbenchError, match=r"tracking\.uri: .*does not persist"):
        load_suite(suite)


# -- 2. a run's identity includes its code --------------------------------------------------------------------
def test_a_run_of_edited_code_is_refused_for_resume_and_for_skipping(tmp_path, mlflow_uri, monkeypatch):
    """Killed after task 0, the plugin edited, the rerun resumed the old run with the new code (and a finished
    run was skipped as 'already finished' after an edit): both are refused in one line naming --restart and a new
    label; --restart trains afresh with the new code."""
    from clbench.run import loop

    plugins = tmp_path / "plugs"
    plugin = write_plugin(plugins, "editlora", lora_plugin("editlora", paper="a plugin edited between two runs"))
    suite_path = one_method_suite(tmp_path).resolve()
    suite_path.write_text(suite_path.read_text().replace("{name: lora, params", "{name: editlora, params"))
    suite, ck, quiet = load_suite(suite_path), str(tmp_path / "ck"), (lambda s: None)
    run = dict(plugins_dirs=[str(plugins)], progress=quiet, checkpoint_dir=ck)

    train_task = loop.train_task

    def interrupted(loop_, ctx, *args, **kwargs):
        if ctx.task == 1:
            raise KeyboardInterrupt
        return train_task(loop_, ctx, *args, **kwargs)

    monkeypatch.setattr(loop, "train_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_suite(suite, str(suite_path), runner.RunOptions(**run))
    monkeypatch.setattr(loop, "train_task", train_task)
    plugin.write_text(plugin.read_text() + "\n# an edit: another loss term would go here\n")
    with pytest.raises(ClbenchError) as err:
        runner.run_suite(suite, str(suite_path), runner.RunOptions(**run))
    msg = str(err.value)
    assert "checkpoint.pt" in msg and "after 1 finished task" in msg and "method_code" in msg, msg
    assert "--restart" in msg and "new label" in msg and "\n" not in msg, msg
    [child] = mlflow_runs(mlflow_uri, "trust", "child")
    assert child.info.status == "KILLED"  # the refused rerun touched nothing

    [rec] = runner.run_suite(suite, str(suite_path), runner.RunOptions(restart=True, **run))
    assert rec.status == "FINISHED"
    [child] = [r for r in mlflow_runs(mlflow_uri, "trust", "child") if r.info.run_id == rec.run_id]
    from clbench.methods.registry import discover

    assert child.data.tags["clbench.code_digest"] == discover([plugins]).get("editlora").code_digest()
    plugin.write_text(plugin.read_text() + "# a second edit\n")
    res = CliRunner().invoke(app, ["run", str(suite_path), "--plugins-dir", str(plugins), "--checkpoint-dir", ck])
    line = one_error(res)
    assert "done.json" in line and "finished by other code" in line and "--restart" in line, line
    assert "already finished" not in res.output


def test_a_checkpoint_of_another_clbench_version_is_refused(tmp_path):
    from clbench.run import checkpoint

    old = checkpoint.RunStore(tmp_path, "k", {"method_code": "abc", "clbench": "0.0.1"})
    old.save({"next_task": 2})
    with pytest.raises(ClbenchError, match=r"clbench 0\.0\.1 -> 0\.2\.0.*--restart"):
        checkpoint.RunStore(tmp_path, "k", {"method_code": "abc", "clbench": "0.2.0"}).load()
    legacy = checkpoint.RunStore(tmp_path, "k")  # written before runs had an identity
    legacy.save({"next_task": 2})
    with pytest.raises(ClbenchError, match=r"clbench \(not recorded\) -> 0\.2\.0"):
        checkpoint.RunStore(tmp_path, "k", {"method_code": "abc", "clbench": "0.2.0"}).load()


# -- 3. where results go --------------------------------------------------------------------------------------
def test_the_command_line_and_the_environment_win_over_the_suite_file(tmp_path, monkeypatch):
    suite = one_method_suite(tmp_path / "suites")
    suite.write_text(suite.read_text().replace("tracking: {experiment: trust}",
                                               "tracking: {experiment: trust, uri: 'sqlite:///results/suite.db'}"))
    monkeypatch.chdir(tmp_path)
    loaded = load_suite(suite)
    suite_db = (tmp_path / "suites" / "results" / "suite.db").resolve()
    assert loaded.tracking.uri == f"sqlite:///{suite_db}"  # the suite's folder, as README says, not the cwd
    env = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    assert tracking.results_store(loaded, None) == (env, "MLFLOW_TRACKING_URI")
    assert tracking.results_store(loaded, "sqlite:///flag.db") == ("sqlite:///flag.db", "--tracking-uri")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.results_store(loaded, None) == (f"sqlite:///{suite_db}", "tracking.uri of the suite file")


def test_where_results_go_is_said_before_the_first_run(tmp_path, monkeypatch, mlflow_uri):
    suite = one_method_suite(tmp_path)
    suite.write_text(suite.read_text().replace("tracking: {experiment: trust}",
                                               "tracking: {experiment: trust, uri: 'sqlite:///elsewhere.db'}"))
    res = CliRunner().invoke(app, ["run", str(suite), "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    [where] = [i for i, ln in enumerate(lines) if ln.startswith("results go to")]
    first_run = next(i for i, ln in enumerate(lines) if "run 1 of 1" in ln)
    assert where < first_run, lines
    assert mlflow_uri in lines[where] and "from MLFLOW_TRACKING_URI" in lines[where], lines[where]
    assert "tracking.uri" in lines[where]  # the suite's own store is named as overridden
    assert not (tmp_path / "elsewhere.db").exists()
    assert mlflow_runs(mlflow_uri, "trust", "child")[0].info.status == "FINISHED"
    assert f"in {mlflow_uri}" in res.stdout  # the closing 'results:' line names the same store


# -- 4. labels ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label, what", [
    ("lora\nx", "U+000A"),
    ("lo\x00ra", "U+0000"),
    ("\x1b[31mlora", "U+001B"),
    ("lora\u202e", "U+202E"),
    ("l\u043era", "U+043E CYRILLIC SMALL LETTER O"),  # reads as 'lora'
    ("<script>alert(1)</script>", "'<'"),
    ("=HYPERLINK(1)", "start with a letter or digit"),
    ("lora x", "' '"),
])
def test_labels_outside_the_safe_set_are_refused_in_one_line(tmp_path, label, what):
    import yaml

    suite = one_method_suite(tmp_path)
    suite.write_text(suite.read_text().replace("{name: lora, params", f"{{name: lora, label: {yaml.safe_dump(label, default_style=chr(34)).strip()}, params"))
    with pytest.raises(ClbenchError) as err:
        load_suite(suite)
    msg = str(err.value)
    assert "methods.0.label" in msg and what in msg and "\n" not in msg, msg
    assert "\x1b" not in msg and "\x00" not in msg and "\u202e" not in msg  # the message itself is safe to print


def test_labels_a_sweep_makes_stay_in_the_safe_set(tmp_path):
    """A trial is labelled LABEL[KEY=VALUE,...]; a list value (JSON, with quotes) must not put it outside the
    set (plan_sweep validates every trial entry as a suite entry)."""
    from clbench.run.sweep import plan_sweep

    suite = load_suite(one_method_suite(tmp_path))
    plan = plan_sweep(suite, "s.yaml", "lora", ["methods.lora.params.targets=[[qkv],[q,v]]",
                                                "train.lr=[1.0e-3,2.0e-3]"])
    labels = [t.label for t in plan.trials]
    assert len(set(labels)) == 4 and all('"' not in x and " " not in x for x in labels), labels
