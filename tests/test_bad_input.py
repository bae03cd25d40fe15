"""Every bad input a user can give is one clear line on stderr and exit code 1, never a traceback.

The corpus is ``tests/bad_suites/*.yaml``: each file's first line is ``# expect: <fragment of the error>``;
an optional ``# setup: garbage-checkpoint | foreign-checkpoint | other-run-checkpoint | next-task-out-of-range |
parent-run-checkpoint`` line plants a bad file where the run's checkpoint goes, an optional ``# args: ...`` line adds command-line arguments, an optional ``# needs: MODULE`` line skips the case when MODULE is not installed. No case may leave a run in the
store (the input is refused before any run exists). Runs in-process through typer's CliRunner (no subprocess start-up per case).
Also the safety defaults: YAML with safe_load (a python tag is an error, not code), ``clbench ui`` on loopback.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clbench.cli import app
from clbench.run import checkpoint
from clbench.suite import load_suite

CORPUS = Path(__file__).parent / "bad_suites"
CASES = sorted(CORPUS.glob("*.yaml"))


def header(path: Path, key: str) -> str | None:
    for line in path.read_bytes().decode("utf-8", "replace").splitlines()[:3]:  # some cases are not UTF-8
        if line.startswith(f"# {key}:"):
            return line.split(":", 1)[1].strip()
    return None


def test_corpus_is_large_and_every_case_says_what_it_expects():
    assert len(CASES) >= 30
    assert all(header(p, "expect") for p in CASES), [p.name for p in CASES if not header(p, "expect")]


def plant_checkpoint(suite_path: Path, ckdir: Path, uri: str, kind: str) -> None:
    from clbench.methods.registry import discover
    from clbench.run.runner import _store, plan_runs, run_key

    suite = load_suite(suite_path)
    [run] = plan_runs(suite, str(suite_path), discover([]), None)
    sdir = checkpoint.suite_dir(str(ckdir), suite.protocol_hash(), suite.name, suite.tracking.experiment or suite.name,
                                uri)
    target = checkpoint.run_folder(sdir, run.label, run_key(suite, run, 0), 0) / "checkpoint.pt"
    target.parent.mkdir(parents=True)
    store = _store(sdir, suite, run, 0)  # the runner's own: this run's folder, key and code identity
    if kind == "other-run-checkpoint":  # a real clbench checkpoint of another run, copied into this run's folder
        checkpoint.RunStore(store.dir, "another run's key", store.identity).save({"next_task": 1, "run_id": "x"})
    elif kind == "next-task-out-of-range":
        store.record_run("r")
        store.save({"next_task": 99, "run_id": "r"})
    elif kind == "parent-run-checkpoint":  # names the suite's parent run (it would log into the parent)
        store.record_run("child")
        store.save({"next_task": 1, "run_id": "parent"})
    elif kind == "garbage-checkpoint":
        target.write_bytes(b"\x80\x04 truncated")
    else:  # a real torch file, but someone else's
        torch.save({"state_dict": {"w": torch.zeros(2)}, "run_key": run_key(suite, run, 0)}, target)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_suite_is_one_clear_line(path, tmp_path, mlflow_uri, monkeypatch):
    expect = header(path, "expect")
    if header(path, "needs"):  # a case on a language model: the extra's own refusal comes first without it
        pytest.importorskip(header(path, "needs"), reason="the language-model extra is not installed")
    ckdir = tmp_path / "ck"
    setup = header(path, "setup")
    if setup:
        plant_checkpoint(path, ckdir, mlflow_uri, setup)
    monkeypatch.chdir(tmp_path)  # nothing a case does lands in the repository
    args = (header(path, "args") or "").split()
    res = CliRunner().invoke(app, ["run", str(path), "--checkpoint-dir", str(ckdir), *args])
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), repr(res.exception)
    stderr = res.stderr
    assert "Traceback" not in stderr and "Traceback" not in res.stdout
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0]  # the error is the last word
    assert expect in errors[0], f"expected {expect!r} in {errors[0]!r}"  # the fragment names the key or file
    if not setup:  # a planted checkpoint is found after the parent run exists (the run lifecycle's part)
        assert runs_in(mlflow_uri) == 0, "a bad input left a run in the store"


def runs_in(uri: str) -> int:
    """How many MLflow runs a sqlite store holds (0 when no store was made)."""
    import sqlite3

    db = Path(uri.removeprefix("sqlite:///"))
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        if not con.execute("select name from sqlite_master where name='runs'").fetchone():
            return 0
        return con.execute("select count(*) from runs").fetchone()[0]


def test_ui_binds_to_loopback_unless_told(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execvp", lambda prog, args: calls.append(args))
    with socket.socket() as s:  # `clbench ui` checks that its port is free: not 5000, which may be taken here
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    res = CliRunner().invoke(app, ["ui", "--backend-store-uri", "sqlite:///x.db", "--port", port])
    assert res.exit_code == 0, res.output
    args = calls[0]
    assert args[args.index("--host") + 1] == "127.0.0.1"
    CliRunner().invoke(app, ["ui", "--host", "0.0.0.0", "--backend-store-uri", "sqlite:///x.db", "--port", port])
    assert calls[1][calls[1].index("--host") + 1] == "0.0.0.0"


def test_a_suite_path_that_is_no_file_is_one_line(tmp_path):
    """/dev/zero never ends (the read filled memory); a folder is no suite either."""
    for target in ("/dev/zero", str(tmp_path)):
        res = CliRunner().invoke(app, ["run", target, "--dry-run"])
        assert res.exit_code == 1, (target, res.output, res.exception)
        assert res.stderr.strip() == f"error: {target}: not a regular file; give a suite YAML file"
