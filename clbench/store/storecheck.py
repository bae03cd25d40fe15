"""Up-front checks of the places MLflow will write to or listen on, so that each cannot-work case is one line
before any run exists (or before the UI server starts) instead of a traceback after training, a minute of
SQLAlchemy retries or an error buried in a server log.

- the sqlite file and its folder (``check_sqlite_target``): a read-only ``mlflow.db``, a folder that cannot be
  written or created, a path through a file;
- the artifact folder of an experiment (``check_artifact_folder``): ``mlruns`` that is a file, a read-only one;
- a plain path given as a tracking URI (``check_file_store``): a file where MLflow expects its file-store folder;
- the UI's port (``check_port``): out of range, already in use, not an address of this machine.

Permissions are judged with ``os.access``, which answers for the real user (root writes through file modes, and
so does sqlite for it). No mlflow import here: ``clbench.store.tracking`` calls these with what MLflow told it.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from urllib.parse import unquote, urlparse

from clbench.errors import ClbenchError

SQLITE_HEADER = b"SQLite format 3\x00"


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (what a ``mkdir -p`` of ``path`` would start from)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _through_file(path: Path) -> Path | None:
    """The ancestor of ``path`` that exists but is not a folder (``mlruns`` a file under ``mlruns/1/...``)."""
    top = _first_existing(path)
    return None if top.is_dir() or top == path else top


def _writable_folder(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def is_sqlite_file(path: Path) -> bool | None:
    """Whether a non-empty file starts with SQLite's header; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return None


def check_sqlite_target(path: Path, uri: str) -> None:
    """A sqlite store ``clbench run`` can write: the file (if any) is a readable, writable file, and its folder
    exists and is writable (sqlite keeps its journal beside the file) or can be created, which it then is."""
    fix = "fix MLFLOW_TRACKING_URI / tracking.uri"
    blocker = _through_file(path)
    if blocker is not None:
        raise ClbenchError(f"tracking: cannot create the MLflow store {path} of {uri}: {blocker} is a file, not a "
                           f"folder; {fix}")
    if path.is_dir():
        raise ClbenchError(f"tracking: {path} is a folder, not an sqlite file; point {uri} at a file inside it "
                           f"(e.g. sqlite:///{path / 'mlflow.db'}) or {fix}")
    folder = path.parent
    if not folder.exists():
        top = _first_existing(folder)
        if not _writable_folder(top):
            raise ClbenchError(f"tracking: cannot create the folder {folder} of the MLflow store {path}: {top} is "
                               f"not writable; create it with write permission or {fix}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ClbenchError(f"tracking: cannot create the folder {folder} of the MLflow store {path} "
                               f"({exc.strerror or exc}); {fix}") from None
    elif not _writable_folder(folder):
        raise ClbenchError(f"tracking: the folder {folder} of the MLflow store {path} is not writable (sqlite "
                           f"writes its journal there); make it writable (chmod u+w {folder}) or {fix}")
    if path.exists() and not os.access(path, os.R_OK):
        raise ClbenchError(f"tracking: the MLflow store {path} cannot be read (permission denied); chmod u+rw "
                           f"{path} or {fix}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ClbenchError(f"tracking: the MLflow store {path} is read-only; make it writable (chmod u+w {path}) "
                           f"or {fix}")


def local_artifact_folder(location: str) -> Path | None:
    """The local folder behind an experiment's artifact location, or None for a remote one (s3://, the
    server's mlflow-artifacts:, ...)."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        return None
    return Path(location)


def check_artifact_folder(location: str, experiment: str) -> None:
    """MLflow writes an experiment's run artifacts (plots, matrices, the suite) under ``location`` at the end
    of each run: a file in its way or a folder that cannot be written would fail the run after its training."""
    folder = local_artifact_folder(location)
    if folder is None:
        return
    where = f"MLflow keeps the artifacts of experiment '{experiment}' in {folder}"
    blocker = folder if folder.exists() and not folder.is_dir() else _through_file(folder)
    if blocker is not None:
        raise ClbenchError(f"tracking: {blocker} is a file, not a folder ({where}); move or rename {blocker}, "
                           "or use another tracking.experiment")
    top = _first_existing(folder)
    if not _writable_folder(top):
        raise ClbenchError(f"tracking: {top} is not writable ({where}); make it writable (chmod u+w {top}) or "
                           "use another tracking.experiment")


def check_file_store(path: Path, uri: str) -> None:
    """A plain path as tracking URI is MLflow's file store: a folder. A file there is most often an sqlite store
    given without its scheme."""
    if not path.exists() or path.is_dir():
        return
    hint = (f"an sqlite store is given as sqlite:///{path.absolute()}" if is_sqlite_file(path)
            else "point it at an MLflow store (sqlite:///FILE, a folder, or http://HOST:PORT)")
    raise ClbenchError(f"tracking: {uri} is a file, not an MLflow file-store folder; {hint}")


def check_port(host: str, port: int) -> None:
    """The UI can listen on ``host:port``: a TCP port number, free (not held by another server), and ``host`` an
    address of this machine. Bound and released here with the server's own option (SO_REUSEADDR), so a port
    that the server could take is never refused."""
    if not 1 <= port <= 65535:
        raise ClbenchError(f"--port {port}: a TCP port is 1..65535 (e.g. --port 5000)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ClbenchError(f"--host {host}: not an address or known host name ({exc}); use e.g. --host "
                           "127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ClbenchError(_bind_error(host, port, exc)) from None
    finally:
        sock.close()


def _bind_error(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"--port {port}: {host}:{port} is already in use (another MLflow UI or server?); stop it or pick "
                "another port, e.g. --port 5001")
    if exc.errno == errno.EACCES:
        return f"--port {port}: not allowed to listen on {host}:{port} (ports below 1024 need privileges); pick " \
               "a port above 1023, e.g. --port 5000"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: not an address of this machine; use 127.0.0.1 (this machine only) or 0.0.0.0"
    return f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})"
