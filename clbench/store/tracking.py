"""MLflow tracking (the only module that imports mlflow; an import contract in pyproject.toml holds it) and a null tracker with the same interface.

Layout: one experiment per suite, one parent run per ``clbench run`` invocation, one child run per
(method, seed). Metrics are buffered and written with ``log_batch`` (one call per task instead of one per
value: on sqlite 1,000 single calls take seconds, one batch a tenth of a second).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from clbench import keys
from clbench.errors import ClbenchError
from clbench.paths import memory_store
from clbench.store.storecheck import (
    check_artifact_folder,
    check_file_store,
    check_sqlite_target,
    is_sqlite_file,
)

PARENT_TAG = keys.PARENT_RUN
HTTP_TIMEOUT_S = 10  # clbench's first request to a server: an MLflow server on a busy machine answers in far less
# every later request to a server (MLflow's defaults: 120 s and 7 retries with growing pauses, so a server that
# stops answering mid-run kept a run silent for minutes per request); the timeout bounds each wait for bytes,
# not a whole upload. An explicit MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES in the environment wins.
SERVER_REQUEST_TIMEOUT_S = 30
SERVER_REQUEST_RETRIES = 2
LOCK_RETRIES = 8  # sqlite allows one writer at a time; a concurrent `clbench run` may hold the lock briefly


class _Retrying:
    """Wraps an ``MlflowClient``: retries a call that failed with sqlite's "database is locked" (two
    ``clbench run`` processes sharing one sqlite store) with a growing pause, then gives up."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(LOCK_RETRIES + 1):
                try:
                    return attr(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - only lock contention is retried
                    if attempt == LOCK_RETRIES or "database is locked" not in str(exc):
                        raise
                    time.sleep(0.2 * 2 ** min(attempt, 4))
            raise AssertionError("unreachable")

        return call


@contextlib.contextmanager
def _store_init_lock(uri: str) -> Iterator[None]:
    """Serialise opening a sqlite store across processes: MLflow creates and migrates the tables of a new
    database on first open, and two processes doing that at once fail with "table ... already exists"."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        yield
        return
    import fcntl
    import hashlib

    from clbench.paths import cache_dir

    try:
        locks = cache_dir() / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        path = locks / f"mlflow-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"
        f = open(path, "a")  # closed by the with below
    except OSError as exc:  # the cache, not the store: blaming MLFLOW_TRACKING_URI would send the user astray
        raise ClbenchError(f"CLBENCH_CACHE: cannot write {exc.filename or 'the cache folder'} "
                           f"({exc.strerror or exc}); clbench keeps its locks, weights and data there: set "
                           "CLBENCH_CACHE to a writable folder") from None
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def local_store_path(uri: str) -> str | None:
    """The local file behind a tracking URI (sqlite or a file store), or None for a server."""
    if uri.startswith("sqlite:///"):
        return uri.removeprefix("sqlite:///")
    if uri.startswith("file:"):
        return uri.removeprefix("file://").removeprefix("file:")
    if "://" not in uri:
        return uri
    return None


def absolute_uri(uri: str) -> str:
    """A local store's URI with an absolute path: the key of checkpoints and locks (``sqlite:///mlflow.db`` in two
    folders is two stores), and what a worker with another working directory must open."""
    path = local_store_path(uri)
    if path is None or path == ":memory:" or Path(path).is_absolute():
        return uri
    full = Path(path).absolute()
    return f"sqlite:///{full}" if uri.startswith("sqlite:") else str(full)


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


# The tables MLflow's first migration creates: a sqlite file holding none of them was never an MLflow store.
MLFLOW_FIRST_TABLES = frozenset({"experiments", "runs", "metrics", "params", "tags"})


def _mlflow_tables() -> frozenset[str] | None:
    """Every table this MLflow makes, or None when its models cannot be imported (then only
    ``MLFLOW_FIRST_TABLES`` tells an MLflow store from another program's database)."""
    try:
        import importlib

        from mlflow.store.db.base_sql_model import Base

        for module in ("tracking", "model_registry", "workspace"):
            with contextlib.suppress(ImportError):
                importlib.import_module(f"mlflow.store.{module}.dbmodels.models")
        return frozenset(Base.metadata.tables) | {"alembic_version"}
    except Exception:  # noqa: BLE001 - MLflow internals moved
        return None


def sqlite_store_state(path: Path) -> tuple[str, int]:
    """(state, runs) of a sqlite file: ``complete`` (MLflow's latest schema), ``empty`` (no tables),
    ``half-made`` (MLflow's tables but not its latest schema: a creation or migration that was cut short, or an
    older MLflow's store), ``foreign`` (an SQLite database of another program: none of MLflow's first tables, or
    tables MLflow does not make), ``not-sqlite`` (not an SQLite file at all) or ``unreadable``; ``runs`` is how many
    runs it holds (-1 when unknown). Only ``half-made`` with no run is ever rebuilt (``create_sqlite_store``)."""
    import sqlite3

    if path.is_file() and path.stat().st_size > 0 and is_sqlite_file(path) is False:
        return "not-sqlite", -1
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return "unreadable", -1
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        tables = {t for t in tables if not t.startswith("sqlite_")}
        if not tables:
            return "empty", 0
        if not tables & MLFLOW_FIRST_TABLES:
            return "foreign", -1
        runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        version = (con.execute("SELECT version_num FROM alembic_version").fetchall()
                   if "alembic_version" in tables else [])
    except sqlite3.Error:
        return "unreadable", -1
    finally:
        con.close()
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        head = _get_latest_schema_revision()
    except Exception:  # noqa: BLE001 - MLflow internals moved: judge by the tables alone
        head = version[0][0] if len(version) == 1 else None
    if version == [(head,)]:
        return "complete", runs
    known = _mlflow_tables()
    if known is not None and tables - known:  # another program's tables: never rebuild (that would delete them)
        return "foreign", runs
    return "half-made", runs


def remove_stale_creations(path: Path) -> None:
    """Delete the ``.NAME.creating-PID`` files of ``create_sqlite_store`` runs that a kill cut short (their
    process is gone); call it under ``_store_init_lock``, where no live creation can be racing."""
    for stale in path.parent.glob(f".{path.name}.creating-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def create_sqlite_store(path: Path) -> None:
    """Make ``path`` a complete MLflow store, all or nothing: MLflow's tables are created in a sibling file, which
    is then renamed over ``path``. A store that does not exist yet, an empty file and a half-made store holding no
    run (a kill while MLflow was creating its tables) are (re)built; anything else is left alone. Call it under
    ``_store_init_lock``."""
    if path.exists() and path.stat().st_size > 0:
        state, runs = sqlite_store_state(path)
        if state != "half-made" or runs != 0:
            return
    from mlflow.tracking import MlflowClient

    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()  # creates and migrates the tables
        for stale in (f"{path}-journal", f"{path}-wal", f"{path}-shm"):  # belonged to the half-made file
            Path(stale).unlink(missing_ok=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def store_error(uri: str, exc: BaseException, verb: str = "open", flag: str = "--tracking-uri") -> ClbenchError:
    """One line for a store that cannot be used; "start the server" only where a server is the cause. ``flag``:
    the option of the command that named the store (``clbench ui`` has ``--backend-store-uri``)."""
    msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    path = _sqlite_file(uri)
    if "MLFLOW_ALLOW_FILE_STORE" in str(exc):  # MLflow 3's refusal of a file store; its remedy is the point
        msg = "MLflow 3 no longer writes file stores such as ./mlruns"
        hint = ("use a database store, e.g. sqlite:///mlflow.db (`mlflow migrate-filestore` moves an existing file "
                "store losslessly), or set MLFLOW_ALLOW_FILE_STORE=true to keep the file store")
    elif uri.startswith(("http://", "https://")):
        if "timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower():
            msg = f"it accepts connections but did not answer within {HTTP_TIMEOUT_S} s"
        hint = "start the server or fix MLFLOW_TRACKING_URI / tracking.uri"
    elif path is not None and path.is_file() and path.stat().st_size > 0:
        state, runs = sqlite_store_state(path)
        if state in ("not-sqlite", "foreign"):
            hint = (f"{path} is left untouched; point MLFLOW_TRACKING_URI / tracking.uri / {flag} at an "
                    "MLflow store or a new file")
        elif state == "half-made" and runs == 0:
            hint = (f"{path} is a half-made MLflow store holding no run (its creation was interrupted); "
                    "`clbench run` rebuilds it, or delete it")
        elif state in ("half-made", "unreadable"):
            hint = (f"{path} is not a usable MLflow store ({state}, {runs if runs >= 0 else 'unknown'} runs); "
                    "restore it from a backup, run `mlflow db upgrade` for an older MLflow's store, or point "
                    "MLFLOW_TRACKING_URI elsewhere")
        else:
            hint = f"check that {path} and its folder are readable and writable, or fix MLFLOW_TRACKING_URI"
    else:
        hint = "check the path and its permissions, or fix MLFLOW_TRACKING_URI / tracking.uri"
    return ClbenchError(f"tracking: cannot {verb} the MLflow tracking store at {uri} ({msg}); {hint}")


STATE_WORDS = {
    "not-sqlite": "not an SQLite database",
    "foreign": "another program's SQLite database, not an MLflow store",
    "half-made": "an unfinished or older MLflow schema",
    "unreadable": "cannot be opened",
    "empty": "an empty database",
}


def state_error(uri: str, path: Path, verb: str, flag: str = "--tracking-uri") -> ClbenchError:
    """``store_error`` for a sqlite file that is not a complete MLflow store, saying what it is instead."""
    if path.is_dir():
        return ClbenchError(f"tracking: {path} is a folder, not an sqlite file; point {uri} at a file (e.g. "
                            f"sqlite:///{path / 'mlflow.db'}) or fix MLFLOW_TRACKING_URI / {flag}")
    state, _ = sqlite_store_state(path)
    return store_error(uri, RuntimeError(f"{path.name}: {STATE_WORDS.get(state, state)}"), verb, flag)


def probe_http(uri: str, timeout: float = 3.0) -> None:
    """Fail at once, with one line, when an http(s) tracking server does not accept connections (MLflow's own
    client would retry with backoff for minutes)."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise ClbenchError(f"tracking: cannot reach the MLflow tracking server at {uri} ({exc.strerror or exc}); "
                           "start the server or fix MLFLOW_TRACKING_URI / tracking.uri") from None


@contextlib.contextmanager
def fast_http(timeout_s: int = HTTP_TIMEOUT_S) -> Iterator[None]:
    """MLflow's HTTP client without retries and with a short timeout, for clbench's first request to a server
    (MLflow's defaults retry a server that does not answer for minutes before saying so)."""
    fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {k: os.environ.get(k) for k in fast}
    os.environ.update(fast)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_local_store(uri: str, write: bool) -> None:
    """One line, before MLflow touches anything, for a store that cannot work: a server that does not answer, an
    sqlite file or folder that cannot be written (``write``), a file where a file store's folder should be."""
    probe_http(uri)
    sqlite = _sqlite_file(uri)
    if sqlite is not None:
        if write:
            check_sqlite_target(sqlite, uri)
        return
    path = local_store_path(uri)
    if path is not None and path != ":memory:":
        check_file_store(Path(path), uri)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as dotted keys, values as strings (MLflow params are strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


MLFLOW_DB_LOGGER = "mlflow.store.db.utils"  # logs a full traceback of every database error it then raises


def quiet_mlflow_store_errors() -> None:
    """MLflow logs each sqlite error (a full disk, a locked database) with its whole traceback before raising it;
    clbench turns the raised error into one line (``store_error``, clbench.recorder.on_disk_full) and retries a
    locked database itself, so those ~20-line tracebacks only bury that line."""
    import logging

    logging.getLogger(MLFLOW_DB_LOGGER).setLevel(logging.CRITICAL)


def refuse_memory_store(uri: str) -> None:
    if memory_store(uri):
        raise ClbenchError(f"tracking: {uri} does not persist (an in-memory store: every result would be gone when "
                           "clbench exits and a rerun would train again); point MLFLOW_TRACKING_URI, "
                           "--tracking-uri or the suite's tracking.uri at a file, e.g. sqlite:///mlflow.db")


def results_store(suite: Any, flag: str | None = None) -> tuple[str, str]:
    """(uri, where it came from) of the store a suite's runs go to. Precedence: ``--tracking-uri``, then
    ``$MLFLOW_TRACKING_URI``, then the suite's ``tracking.uri`` (resolved against the suite's folder), then
    MLflow's default: the person running the command decides, not a suite file they received."""
    import mlflow

    if flag:
        return flag, "--tracking-uri"
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env, "MLFLOW_TRACKING_URI"
    if suite.tracking.uri:
        return suite.tracking.uri, "tracking.uri of the suite file"
    return mlflow.get_tracking_uri(), "MLflow's default"


def where_results_go(suite: Any, experiment: str, uri: str, origin: str) -> str:
    """The line said before the first run: the store, why that one, and a suite ``tracking.uri`` it overrides."""
    line = f"results go to MLflow experiment '{experiment}' in {uri} (from {origin}"
    if suite.tracking.uri and origin in ("--tracking-uri", "MLFLOW_TRACKING_URI") and suite.tracking.uri != uri:
        line += f"; the suite's tracking.uri {suite.tracking.uri} is overridden"
    if uri.startswith(("http://", "https://")):
        line += "; a tracking server: runs, params and artifacts are sent there"
    return line + ")"


def store_uri(uri: str | None = None) -> str:
    """The tracking store to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's own default (``./mlflow.db``,
    artifacts in ``./mlruns``). The one rule for ``clbench run``, ``clbench leaderboard`` and ``clbench ui``."""
    import mlflow

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def read_only_run_status(uri: str, experiment: str) -> Callable[[str], str | None]:
    """``run_id -> status`` of a run of ``experiment`` in the store at ``uri`` (None: no such active run), without
    creating the store (a local store that does not exist yet has no runs); ``clbench run --dry-run``'s view of
    ``MlflowTracker.run_status``."""
    path = local_store_path(uri)
    if path is not None and (path == ":memory:" or not Path(path).exists()):
        return lambda run_id: None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)

    def status(run_id: str) -> str | None:
        try:
            run = client.get_run(run_id)
            exp = client.get_experiment(run.info.experiment_id)
        except Exception:  # noqa: BLE001 - unknown id or unreadable store: not finished
            return None
        return run.info.status if run.info.lifecycle_stage == "active" and exp.name == experiment else None

    return status


class Tracker(Protocol):
    """What the runner and recorder need from a tracker (``MlflowTracker``, ``NullTracker``)."""

    uri: str
    readable: bool  # its runs can be read back (``read_runs``): the suite's summary and report need that

    def start_run(self, name: str, tags: dict[str, str], params: dict[str, Any],
                  parent: str | None = None) -> str: ...

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None: ...

    def log_params(self, run_id: str, params: dict[str, Any]) -> None: ...

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None: ...

    def log_artifacts(self, run_id: str, folder: str | Path, artifact_path: str | None = None) -> None: ...

    def flush(self, run_id: str | None = None) -> None: ...

    def end_run(self, run_id: str, status: str = "FINISHED") -> None: ...

    def run_status(self, run_id: str) -> str | None: ...

    def reopen_run(self, run_id: str) -> None: ...

    def logged_steps(self, run_id: str, key: str) -> set[int]: ...


class NullTracker:
    """Logs nothing; used by ``--dry-run`` style calls and unit tests of the loop."""

    uri = "none"
    readable = False

    def start_run(self, name: str, tags: dict[str, str], params: dict[str, Any], parent: str | None = None) -> str:
        return f"null-{name}-{time.monotonic_ns()}"

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        pass

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        pass

    def log_artifacts(self, run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
        pass

    def flush(self, run_id: str | None = None) -> None:
        pass

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        pass

    def run_status(self, run_id: str) -> str | None:
        return None  # nothing is stored, so nothing can be resumed into

    def reopen_run(self, run_id: str) -> None:
        pass

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        return set()


class MlflowTracker:
    """Batched MLflow logging through ``MlflowClient``."""

    readable = True

    def __init__(self, experiment: str, uri: str | None = None) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        refuse_memory_store(uri or mlflow.get_tracking_uri())
        quiet_mlflow_store_errors()
        self.uri = absolute_uri(uri or mlflow.get_tracking_uri())
        self.where: str | None = None  # the "results go to ..." line (clbench.runner.open_results_store)
        mlflow.set_tracking_uri(self.uri)
        check_local_store(self.uri, write=True)  # a read-only or unplaceable store: one line, at once
        self._buffers: dict[str, list] = {}
        try:
            with fast_http(), _store_init_lock(self.uri):  # the first request answers "is the store usable" quickly
                sqlite = _sqlite_file(self.uri)
                if sqlite is not None:
                    remove_stale_creations(sqlite)
                    create_sqlite_store(sqlite)
                    if sqlite_store_state(sqlite)[0] != "complete":  # left alone: not ours to rebuild
                        raise state_error(self.uri, sqlite, "open")
                self.client = _Retrying(MlflowClient(tracking_uri=self.uri))
                self.experiment_id = self._experiment(experiment)
                location = self.client.get_experiment(self.experiment_id).artifact_location
        except ClbenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot use this store"
            raise store_error(self.uri, exc) from None
        # artifacts are written when a run ends: a file or read-only folder in their way would fail it then
        check_artifact_folder(location, experiment)
        if self.uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(SERVER_REQUEST_TIMEOUT_S))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(SERVER_REQUEST_RETRIES))

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp:
            return exp.experiment_id
        try:
            # MLflow 3 opens an experiment on its GenAI overview unless told it holds training runs; the saved
            # view makes its runs table the leaderboard (clbench.store.uiview)
            from clbench.store.uiview import experiment_tags

            return self.client.create_experiment(name, tags=experiment_tags())
        except Exception:  # another process created it between our lookup and create
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def run_status(self, run_id: str) -> str | None:
        """The run's status (RUNNING, FINISHED, FAILED, KILLED), or None if it does not exist or is deleted."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - unknown id
            return None
        if run.info.lifecycle_stage != "active" or run.info.experiment_id != self.experiment_id:
            return None
        return run.info.status

    def reopen_run(self, run_id: str) -> None:
        """Mark a resumed run RUNNING again (its metrics and params stay)."""
        self.client.update_run(run_id, status="RUNNING")

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps at which ``key`` was logged (to never log a task's metrics twice after a crash)."""
        return {int(m.step) for m in self.client.get_metric_history(run_id, key)}

    def start_run(self, name: str, tags: dict[str, str], params: dict[str, Any], parent: str | None = None) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        all_tags = {MLFLOW_RUN_NAME: name, **tags}
        if parent:
            all_tags[PARENT_TAG] = parent
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        buf = self._buffers.setdefault(run_id, [])
        buf += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self, run_id: str | None = None) -> None:
        for rid in [run_id] if run_id else list(self._buffers):
            buf = self._buffers.pop(rid, [])
            for i in range(0, len(buf), 1000):
                self.client.log_batch(rid, metrics=buf[i:i + 1000])

    def log_artifacts(self, run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """End the run; a FINISHED run drops the ``clbench.error`` tag an earlier failed attempt of it left (the
        rerun that continued it succeeded)."""
        self.flush(run_id)
        if status == "FINISHED" and keys.ERROR in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, keys.ERROR)
        self.client.set_terminated(run_id, status)


def make_tracker(experiment: str, uri: str | None) -> MlflowTracker:
    return MlflowTracker(experiment, store_uri(uri))


def ui_store(uri: str) -> str:
    """What ``clbench ui`` finds at a local store: ``new`` (no store yet, or an empty file: MLflow's UI creates
    its tables), ``ready`` or ``read-only`` (served, the leaderboard view not tagged). A file that is not an
    MLflow store is refused before MLflow's UI would write its tables into it."""
    check_local_store(uri, write=False)
    path = _sqlite_file(uri)
    if path is None:
        return "ready"
    if not path.exists() or (path.is_file() and sqlite_store_state(path)[0] == "empty"):
        return "new"
    if path.is_dir() or sqlite_store_state(path)[0] != "complete":
        raise state_error(uri, path, "open", "--backend-store-uri")
    return "ready" if os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK) else "read-only"


def ensure_ui_views(uri: str) -> list[tuple[str, str]]:
    """Tag every experiment holding clbench runs for MLflow's UI (training-runs mode, the leaderboard as a saved
    view; see clbench.store.uiview), also those created by older clbench versions. Returns (name, id) of each."""
    from mlflow.tracking import MlflowClient

    from clbench.store.uiview import KIND, KIND_TAG, VIEW_TAG, experiment_tags

    try:
        client = MlflowClient(tracking_uri=uri)
        found = []
        for exp in client.search_experiments():
            if not client.search_runs([exp.experiment_id], filter_string="tags.`clbench.role` = 'parent'",
                                      max_results=1):
                continue
            found.append((exp.name, exp.experiment_id))
            if exp.tags.get(KIND_TAG) != KIND:
                client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
            if not _same_view(exp.tags.get(VIEW_TAG)):
                client.set_experiment_tag(exp.experiment_id, VIEW_TAG, experiment_tags()[VIEW_TAG])
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot use this store"
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ClbenchError(f"tracking: cannot use the MLflow tracking store at {uri} ({msg}); fix "
                           "--backend-store-uri / MLFLOW_TRACKING_URI") from None
    return found


def _same_view(tag_value: str | None) -> bool:
    """Whether a stored saved view already holds this version's view state (its timestamps may differ)."""
    import json

    from clbench.store.uiview import view_state

    try:
        return json.loads(json.loads(tag_value)["state"]) == view_state()
    except (ValueError, KeyError, TypeError):
        return False


# --- Reading (the leaderboard's only door into MLflow; it never writes) -------------------------------------

def artifact_downloader(uri: str | None) -> Callable[[str, str, str], str]:
    """``download(run_id, artifact_path, dest_dir) -> local path`` for the store at ``uri`` (MLflow's default
    when None): how the suite's report reads artifacts back without importing mlflow itself."""
    from mlflow.tracking import MlflowClient

    return (MlflowClient(uri) if uri else MlflowClient()).download_artifacts


def search_runs(uri: str, experiment: str, role: str | None = None) -> list[Any]:
    """The MLflow runs (MLflow's own objects) of ``experiment`` in the store at ``uri``, none when the experiment
    does not exist; only those whose ``clbench.role`` tag is ``role`` ("parent" or "child") when it is given."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return [r for r in runs if role is None or r.data.tags.get(keys.ROLE) == role]


CHILD_FILTER = f"tags.`{keys.ROLE}` = '{keys.ROLE_CHILD}'"
HISTORY_KEYS = (keys.EVAL_ACC,)


@dataclass
class RunInfo:
    """One clbench child run as read back from MLflow. ``metrics`` holds each key's last value; ``history``
    maps a key of ``read_runs(history=...)`` to its (step, value) points sorted by step."""

    run_id: str
    run_name: str | None
    experiment: str
    status: str
    start_time: int | None  # ms since the epoch
    end_time: int | None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def resolve_read_uri(uri: str | None) -> str:
    """The store to read (``store_uri``).

    A sqlite store that does not exist is an error here: opening it would create an empty database, and reading
    must never write.
    """
    resolved = store_uri(uri)
    check_local_store(resolved, write=False)
    quiet_mlflow_store_errors()
    path = _sqlite_file(resolved)
    if path is not None:
        if not path.exists():
            raise ClbenchError(f"tracking: no MLflow store at {resolved} ({path} does not exist); run "
                               "`clbench run SUITE` here first or set MLFLOW_TRACKING_URI")
        state, _ = sqlite_store_state(path) if path.is_file() else ("unreadable", -1)
        if state == "empty":  # MLflow would create its tables in it: reading must not write
            raise ClbenchError(f"tracking: {path} holds no MLflow store yet (an empty database); run "
                               "`clbench run SUITE` with it first or set MLFLOW_TRACKING_URI")
        if state != "complete":
            raise state_error(resolved, path, "read")
    return resolved


def read_runs(experiment: str | None = None, uri: str | None = None,
              history: tuple[str, ...] = HISTORY_KEYS, validation: bool = False) -> list[RunInfo]:
    """Every clbench child run (active, not deleted) of ``experiment`` (all experiments when None). Runs on the
    validation split (``clbench.split=validation``: a sweep's trials) are left out unless ``validation``: they
    measured no test image, so no leaderboard or suite figure may average them with test runs."""
    from mlflow.tracking import MlflowClient

    resolved = resolve_read_uri(uri)
    try:
        client = MlflowClient(tracking_uri=resolved)
        with fast_http():  # a server that accepts but does not answer: seconds, not minutes of retries
            experiments = client.search_experiments()
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot use this store"
        raise store_error(resolved, exc, "read") from None
    names = {e.experiment_id: e.name for e in experiments}
    if experiment is not None:
        ids = [i for i, n in names.items() if n == experiment]
        if not ids:
            raise ClbenchError(f"leaderboard: no MLflow experiment '{experiment}' in {resolved}; experiments: "
                               f"{', '.join(sorted(names.values())) or '(none)'}")
    else:
        ids = list(names)
    out: list[RunInfo] = []
    token = None
    while ids:
        page = client.search_runs(ids, filter_string=CHILD_FILTER, max_results=1000, page_token=token)
        for run in page:
            info, data = run.info, run.data
            if not validation and data.tags.get(keys.SPLIT) == keys.SPLIT_VALIDATION:
                continue
            hist = {}
            for key in history:
                if key in data.metrics:
                    points = client.get_metric_history(info.run_id, key)
                    hist[key] = sorted((int(m.step), float(m.value)) for m in points)
            out.append(RunInfo(info.run_id, info.run_name, names[info.experiment_id], info.status, info.start_time,
                               info.end_time, dict(data.tags), dict(data.params), dict(data.metrics), hist))
        token = page.token
        if not token:
            break
    return out
