"""A tracking store, artifact folder, server or UI port that cannot work is one line and exit 1, before any run
exists and before MLflow writes anything (issue 23: read-only mlflow.db, mlruns a file, ui --port 99999 or a port
in use, ui / leaderboard on a file that is not an MLflow store, an unwritable sqlite folder, an unreachable
server).

Root writes through file modes, so a read-only file cannot be exercised by chmod alone: the permission tests run
the real command in a user namespace where this process's files belong to an unprivileged uid (``unshare``), and
in-process with ``os.access`` answering "denied" (what the checks consult) where that is not possible."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.store import storecheck, tracking
from clbench.store.tracking import MlflowTracker
from clbench.testing import tiny_suite_yaml

ONE_METHOD = "  - {name: lora, label: inclora, params: {rank: 2, fresh_per_task: true}}\n"
ENGINE_RETRIES = "SQLAlchemy engine could not be created"  # MLflow's warning, ten of them over ~100 s


def one_method_suite(folder: Path, name: str = "store") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(tiny_suite_yaml(name).replace(ONE_METHOD, ""))
    return path


def one_error_line(res) -> str:
    """The command failed with exactly one ``error:`` line and no traceback; returns that line."""
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def run_count(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    finally:
        con.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def deny_writes(monkeypatch, *paths: Path) -> None:
    """``os.access`` answers "not writable" for ``paths``, as it does for a non-root user on a 0444 file."""
    denied = {str(p) for p in paths}
    real = os.access

    def access(path, mode, *args, **kwargs):
        if str(path) in denied and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def no_engine(monkeypatch) -> None:
    """MLflow's engine creation (and its ~100 s of retries) must not even start."""
    import mlflow.store.db.utils as db_utils

    def refuse(*args, **kwargs):
        raise AssertionError("MLflow tried to open the store")

    monkeypatch.setattr(db_utils, "create_sqlalchemy_engine_with_retry", refuse)


def unprivileged() -> list[str]:
    """A command prefix under which file modes deny writes: none for a non-root user; for root, a user
    namespace in which this process's files belong to uid 1000 without capabilities. Skips where neither works."""
    if os.geteuid() != 0:
        return []
    prefix = ["unshare", "--user", "--map-user=1000", "--map-group=1000"]
    if shutil.which("unshare") is None:
        pytest.skip("running as root without `unshare`: a read-only file cannot be made to deny writes")
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"running as root and user namespaces are unavailable ({probe.stderr.decode().strip()})")
    return prefix


REAL_DENIAL = """
import json, sys
from typer.testing import CliRunner
from clbench.cli import app
out = []
for uri, ckdir in zip(sys.argv[2::2], sys.argv[3::2]):
    res = CliRunner(env={"MLFLOW_TRACKING_URI": uri}).invoke(app, ["run", sys.argv[1], "--checkpoint-dir", ckdir])
    out.append([res.exit_code, res.stderr, repr(res.exception)])
print(json.dumps(out))
"""


def denied_runs(prefix: list[str], suite: Path, *cases: tuple[str, Path]) -> list[tuple[int, str]]:
    """``clbench run SUITE`` against each (tracking URI, checkpoint dir), in one unprivileged process (its
    imports take most of the time); (exit code, stderr) of each."""
    args = [str(x) for case in cases for x in case]
    proc = subprocess.run([*prefix, sys.executable, "-c", REAL_DENIAL, str(suite), *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [(code, err) for code, err, _ in json.loads(proc.stdout.splitlines()[-1])]


def assert_one_line(code: int, stderr: str) -> str:
    assert code == 1 and "Traceback" not in stderr and ENGINE_RETRIES not in stderr, (code, stderr[-3000:])
    lines = [ln for ln in stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def template_store(tmp_path_factory) -> Path:
    """A complete MLflow store holding one finished run of experiment ``store``, made once (MLflow's migrations
    take seconds), in a folder that did not exist: the tracker creates it."""
    db = tmp_path_factory.mktemp("template") / "new" / "sub" / "mlflow.db"
    tracker = MlflowTracker("store", f"sqlite:///{db}")
    tracker.end_run(tracker.start_run("earlier", {}, {}), "FINISHED")
    return db


@pytest.fixture
def store(tmp_path, template_store) -> Path:
    db = tmp_path / "db" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(template_store, db)
    return db


def test_missing_store_folder_is_created(template_store):
    assert tracking.sqlite_store_state(template_store) == ("complete", 1)


# -- 1. a read-only mlflow.db -----------------------------------------------------------------------------------
def test_read_only_store_in_process(tmp_path, store, monkeypatch):
    """The same refusal where only ``os.access`` can say "read-only" (root): the CLI, one line, no run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    before = digest(store)
    deny_writes(monkeypatch, store)
    res = CliRunner().invoke(app, ["run", str(one_method_suite(tmp_path)), "--checkpoint-dir", str(tmp_path / "ck")])
    line = one_error_line(res)
    assert "read-only" in line and str(store) in line, line
    assert digest(store) == before and not (tmp_path / "ck").exists()


# -- 2. mlruns (the artifact folder) a file ---------------------------------------------------------------------
def test_artifact_folder_that_is_a_file_is_refused_before_training(tmp_path, store, monkeypatch):
    """Today the run trains, then fails with NotADirectoryError when it logs its artifacts."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # MLflow's default artifact root for a sqlite store: ./mlruns
    (work / "mlruns").write_text("not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    suite = one_method_suite(tmp_path, "art")  # a new experiment: its artifacts go to ./mlruns/<id>
    res = CliRunner().invoke(app, ["run", str(suite), "--checkpoint-dir", str(tmp_path / "ck")])
    line = one_error_line(res)
    assert f"{work / 'mlruns'} is a file, not a folder" in line and "move or rename" in line, line
    assert run_count(store) == 1 and not (tmp_path / "ck").exists()


def test_artifact_folder_checks():
    assert storecheck.local_artifact_folder("s3://bucket/x") is None
    assert storecheck.local_artifact_folder("mlflow-artifacts:/1") is None
    assert storecheck.local_artifact_folder("file:///a/b%20c") == Path("/a/b c")
    assert storecheck.local_artifact_folder("/a/mlruns/1") == Path("/a/mlruns/1")
    storecheck.check_artifact_folder("s3://bucket/x", "e")  # remote: not ours to check


def test_artifact_folder_under_a_file_or_read_only(tmp_path, monkeypatch):
    blocker = tmp_path / "mlruns"
    blocker.write_text("x")
    with pytest.raises(ClbenchError, match=f"{blocker} is a file, not a folder"):
        storecheck.check_artifact_folder(f"file://{blocker}/3", "e")
    folder = tmp_path / "ro"
    folder.mkdir()
    storecheck.check_artifact_folder(str(folder / "3"), "e")  # not there yet: created by MLflow, fine
    deny_writes(monkeypatch, folder)
    with pytest.raises(ClbenchError, match=f"{folder} is not writable"):
        storecheck.check_artifact_folder(str(folder / "3"), "e")


# -- 3. clbench ui: the port ------------------------------------------------------------------------------------
@pytest.fixture
def no_exec(monkeypatch) -> list:
    """``clbench ui`` replaces itself with MLflow's server: record the command instead."""
    calls: list = []
    monkeypatch.setattr(os, "execvp", lambda file, args: calls.append(args))
    return calls


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_ui_port_out_of_range(store, port, no_exec):
    res = CliRunner().invoke(app, ["ui", "--backend-store-uri", f"sqlite:///{store}", f"--port={port}"])
    line = one_error_line(res)
    assert f"--port {port}" in line and "1..65535" in line, line
    assert no_exec == []


def test_ui_port_in_use_and_a_free_one(store, no_exec):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        res = CliRunner().invoke(app, ["ui", "--backend-store-uri", f"sqlite:///{store}", "--port", str(port)])
        line = one_error_line(res)
        assert f"127.0.0.1:{port} is already in use" in line and "--port" in line, line
        assert no_exec == []
    # the port is free again: the check lets the server have it
    res = CliRunner().invoke(app, ["ui", "--backend-store-uri", f"sqlite:///{store}", "--port", str(port)])
    assert res.exit_code == 0, res.output
    [args] = no_exec
    assert args[args.index("--port") + 1] == str(port) and f"sqlite:///{store}" in args


def test_ui_host_that_is_not_an_address(store, no_exec):
    res = CliRunner().invoke(app, ["ui", "--backend-store-uri", f"sqlite:///{store}", "--host", "no such host!"])
    assert "--host no such host!" in one_error_line(res)
    assert no_exec == []


# -- 4. ui / leaderboard / run on a file that is not an MLflow store ------------------------------------------
def foreign_db(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO users (name) VALUES ('ann')")
    con.commit()
    con.close()
    return path


def text_file(path: Path) -> Path:
    path.write_text("meeting notes, not a database\n" * 4)
    return path


@pytest.mark.parametrize("make, words", [(text_file, "not an SQLite database"),
                                         (foreign_db, "another program's SQLite database")])
def test_ui_and_leaderboard_on_a_file_that_is_not_a_store(tmp_path, make, words, no_exec):
    path = make(tmp_path / "data.db")
    before = digest(path)
    uri = f"sqlite:///{path}"
    for args in (["ui", "--backend-store-uri", uri], ["leaderboard", "--tracking-uri", uri]):
        line = one_error_line(CliRunner().invoke(app, args))
        assert words in line and "left untouched" in line and "start the server" not in line, line
        other = {"--backend-store-uri": "--tracking-uri", "--tracking-uri": "--backend-store-uri"}[args[1]]
        assert args[1] in line and other not in line, line  # the hint names the command's own flag (issue 32)
        assert digest(path) == before  # MLflow's UI would have written its 65 tables into it
    assert no_exec == []


def test_run_never_rebuilds_another_programs_database(tmp_path):
    """Today `clbench run` took a foreign database for a half-made MLflow store and replaced it."""
    path = foreign_db(tmp_path / "app.db")
    before = digest(path)
    with pytest.raises(ClbenchError, match="another program's SQLite database.*left untouched"):
        MlflowTracker("store", f"sqlite:///{path}")
    assert digest(path) == before
    assert tracking.sqlite_store_state(path) == ("foreign", -1)
    text = text_file(tmp_path / "notes.db")
    with pytest.raises(ClbenchError, match="not an SQLite database"):
        MlflowTracker("store", f"sqlite:///{text}")
    assert tracking.sqlite_store_state(text) == ("not-sqlite", -1)


def test_a_file_given_as_a_file_store(tmp_path, store, monkeypatch):
    """A plain path is MLflow's file store (a folder): a file there is refused, an sqlite one with the fix."""
    monkeypatch.chdir(store.parent)
    notes = text_file(store.parent / "notes.txt")
    line = one_error_line(CliRunner().invoke(app, ["leaderboard", "--tracking-uri", "notes.txt"]))
    assert "notes.txt is a file, not an MLflow file-store folder" in line, line
    line = one_error_line(CliRunner().invoke(app, ["leaderboard", "--tracking-uri", "mlflow.db"]))
    assert f"sqlite:///{store}" in line, line
    with pytest.raises(ClbenchError, match="not an MLflow file-store folder"):
        MlflowTracker("store", f"file:{notes}")
    assert notes.read_text().startswith("meeting notes")


# -- 5. an sqlite folder that cannot be written ----------------------------------------------------------------
@pytest.mark.slow  # one process importing clbench (~10 s of CPU); the in-process tests above and below cover it
def test_read_only_store_and_unwritable_folder_as_an_unprivileged_user(tmp_path, store):
    """The real thing, where file modes deny: a 0444 mlflow.db (today: a traceback once the parent run is
    inserted) and a 0555 folder for a new store (today: ten SQLAlchemy warnings over ~100 s, then the error)."""
    prefix = unprivileged()
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    store.chmod(0o444)
    try:
        results = denied_runs(prefix, one_method_suite(tmp_path), (f"sqlite:///{store}", tmp_path / "ck1"),
                              (f"sqlite:///{folder / 'mlflow.db'}", tmp_path / "ck2"))
    finally:
        store.chmod(0o644)
        folder.chmod(0o755)
    line = assert_one_line(*results[0])
    assert "read-only" in line and str(store) in line and "chmod u+w" in line, line
    line = assert_one_line(*results[1])
    assert f"the folder {folder} of the MLflow store" in line and "not writable" in line, line
    assert run_count(store) == 1 and list(folder.iterdir()) == []  # no run, nothing made
    assert not (tmp_path / "ck1").exists() and not (tmp_path / "ck2").exists()  # nothing trained


def test_unwritable_store_folder_in_process(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    deny_writes(monkeypatch, folder)
    no_engine(monkeypatch)
    with pytest.raises(ClbenchError, match=f"the folder {folder} of the MLflow store .* not writable"):
        MlflowTracker("store", f"sqlite:///{folder / 'mlflow.db'}")
    # a folder to create under one that cannot be written, and a path through a file: the same, at once
    with pytest.raises(ClbenchError, match=f"cannot create the folder {folder / 'a'}.*{folder} is not writable"):
        MlflowTracker("store", f"sqlite:///{folder / 'a' / 'b' / 'mlflow.db'}")
    blocker = text_file(tmp_path / "file")
    with pytest.raises(ClbenchError, match=f"{blocker} is a file, not a folder"):
        MlflowTracker("store", f"sqlite:///{blocker / 'mlflow.db'}")
    with pytest.raises(ClbenchError, match="is a folder, not an sqlite file"):
        MlflowTracker("store", f"sqlite:///{folder}")


# -- 6. an MLflow server that does not answer -------------------------------------------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def test_unreachable_server_is_one_line_at_once(tmp_path, monkeypatch):
    """Today `leaderboard` retried for ~250 s; MLflow's HTTP client is never reached now."""
    import mlflow.utils.rest_utils as rest

    def refuse(*args, **kwargs):
        raise AssertionError("MLflow's HTTP client was called")

    monkeypatch.setattr(rest, "http_request", refuse)
    uri = f"http://127.0.0.1:{closed_port()}"
    line = one_error_line(CliRunner().invoke(app, ["leaderboard", "--tracking-uri", uri]))
    assert f"cannot reach the MLflow tracking server at {uri}" in line and "start the server" in line, line
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    res = CliRunner().invoke(app, ["run", str(one_method_suite(tmp_path)), "--checkpoint-dir", str(tmp_path / "ck")])
    assert f"cannot reach the MLflow tracking server at {uri}" in one_error_line(res)
    assert not (tmp_path / "ck").exists()


def test_first_request_to_a_server_has_no_retries(monkeypatch):
    """A server that accepts connections but does not answer: the first request times out once (seconds),
    without MLflow's minutes of retries; the caller's own settings come back afterwards."""
    from mlflow.tracking import MlflowClient

    seen: dict = {}

    def search_experiments(self, *args, **kwargs):
        seen.update({k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                                    "MLFLOW_HTTP_REQUEST_TIMEOUT")})
        raise ConnectionError("read timed out")

    monkeypatch.setattr(MlflowClient, "search_experiments", search_experiments)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    with socket.socket() as listening:  # accepts (the kernel's backlog) but never answers
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        uri = f"http://127.0.0.1:{listening.getsockname()[1]}"
        silent = f"store at {uri} .it accepts connections but did not answer within 10 s"
        with pytest.raises(ClbenchError, match=silent):
            tracking.read_runs(None, uri)
    assert seen == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
