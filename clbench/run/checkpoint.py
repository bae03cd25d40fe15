"""Resumable runs: atomic per-task checkpoints and finished-run markers.

A benchmark run is hours of accelerator time, so after every finished task the runner writes everything
needed to continue (model state dict, the method's own state, RNG states, accuracy matrices, spectra so far,
the MLflow run id, the task's metrics not yet confirmed in MLflow) to ``checkpoint.pt``: a temporary file,
fsync, then an atomic rename, so a crash at any moment leaves either the previous or the new checkpoint.

Layout (``root`` = ``--checkpoint-dir`` or ``<cache>/runs``)::

    root/<suite key>/parent.json               the parent MLflow run of this suite (reused on resume)
    root/<suite key>/<run folder>/run.json     the run's MLflow run id, written before its training starts
    root/<suite key>/<run folder>/checkpoint.pt
    root/<suite key>/<run folder>/done.json    written after the run finished (final metrics, run id)
    root/<suite key>/<run folder>/lock         held while a process trains this (method, seed)

The suite key hashes the protocol, the suite name, the experiment and the (absolute) tracking URI. A run folder
is ``<label>-<digest>-s<seed>``: the readable label, then a digest of the exact label and the run key (method
name, resolved params, training settings, seed, protocol), so two labels that read alike never share a folder and
each params' progress keeps its own checkpoint. Each checkpoint also stores the run key, so a checkpoint is
only ever resumed by the exact same run. Checkpoints load with ``torch.load(weights_only=True)`` only.

Crash tests (tests/test_resume.py) kill ``clbench run`` processes at named points from the test side, by
wrapping functions of this module, the loop and the recorder; nothing here knows about them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import random
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clbench.errors import ClbenchError

FORMAT = "clbench-checkpoint"
VERSION = 1
READABLE = 60  # characters of a suite name or label kept in a folder name (a digest keeps them apart)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_root() -> Path:
    from clbench.paths import cache_dir

    return cache_dir() / "runs"


def suite_dir(root: str | Path | None, protocol_hash: str, name: str, experiment: str, tracking_uri: str) -> Path:
    """The folder of a suite's runs; the name stays readable, the hash keeps different suites apart."""
    key = digest({"protocol": protocol_hash, "name": name, "experiment": experiment, "uri": tracking_uri})
    base = Path(root).expanduser() if root else default_root()
    return base / f"{readable(name)}-{key[:12]}"


def readable(name: str) -> str:
    """The readable part of a folder name: letters, digits, ``_.-``; short enough for any file system."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:READABLE]


def run_folder(suite_folder: Path, label: str, run_key: str, seed: int) -> Path:
    """The folder of one (method, seed): readable label, a digest of the exact label and run key, the seed."""
    return suite_folder / f"{readable(label)}-{digest({'label': label, 'key': run_key})[:10]}-s{seed}"


# -- RNG state as weights_only-loadable values --------------------------------------------------------
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(cached)],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- spectra tracker state (np arrays -> tensors so weights_only can load them) ----------------------
def spectra_state(tracker) -> dict[str, Any]:
    def rows(rs):
        return [{k: torch.from_numpy(np.asarray(v)) for k, v in r.items()} for r in rs]

    return {"layers": list(tracker.layers), "task_values": rows(tracker.task_values),
            "cum_values": rows(tracker.cum_values),
            "cumulative": {k: [u.B, u.A] for k, u in tracker.cumulative.items()},
            "bases": dict(tracker.bases), "layer_metrics": tracker.layer_metrics}


def load_spectra_state(tracker, state: dict[str, Any]) -> None:
    from clbench.model.lora import LowRank

    def rows(rs):
        return [{k: v.numpy() for k, v in r.items()} for r in rs]

    tracker.layers = list(state["layers"])
    tracker.task_values = rows(state["task_values"])
    tracker.cum_values = rows(state["cum_values"])
    tracker.cumulative = {k: LowRank(b, a) for k, (b, a) in state["cumulative"].items()}
    tracker.bases = dict(state["bases"])
    tracker.layer_metrics = [dict(m) for m in state["layer_metrics"]]


def check_loadable(obj: Any, what: str) -> None:
    """Fail now, not at the resume after a crash, when ``obj`` would not load with ``weights_only=True``
    (numpy arrays, custom classes): only tensors, numbers, strings, None and lists/tuples/dicts of them."""
    import io

    buf = io.BytesIO()
    try:
        torch.save(obj, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        lines = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        detail = lines[0][:160] if lines else type(exc).__name__
        raise ClbenchError(f"{what} cannot be checkpointed safely ({detail}); return only tensors, numbers, "
                           "strings and lists/dicts of them") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """The temporary sibling ``atomic_write`` writes before renaming (``RunStore.load`` removes stale ones)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_synced(path: Path, write) -> None:
    """Write through ``write(file)`` into ``path`` and fsync it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Ctrl-C and SIGTERM arriving inside the block are held until it ends, then delivered to the handler that
    was in place (the runner's: the run ends KILLED): a write cut half-way crashed inside torch's zip writer
    (``inline_container.cc``) or aborted the process, and the run ended FAILED. Main thread only (where Python
    delivers signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
             for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)
        if pending:
            previous = saved[pending[0]]
            if callable(previous):
                previous(pending[0], None)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(pending[0])


def atomic_write(path: Path, write) -> None:
    """Write through ``write(file)`` into a temporary sibling, fsync it, then rename it over ``path``; an
    interrupt during it is delivered once the file is complete (``deferred_interrupts``)."""
    tmp = temporary_path(path)
    with deferred_interrupts():
        write_synced(tmp, write)
        os.replace(tmp, path)
        _fsync_dir(path.parent)


class RunStore:
    """The checkpoint folder of one (method, seed): load, save, done marker, lock."""

    def __init__(self, directory: Path, run_key: str, identity: dict[str, str] | None = None) -> None:
        self.dir = Path(directory)
        self.key = run_key
        # the code that trains the run (method source digest, clbench version): a checkpoint or finished run of
        # other code is refused, never continued nor skipped (``check_identity``)
        self.identity = dict(identity) if identity is not None else None
        self.path = self.dir / "checkpoint.pt"
        self.done_path = self.dir / "done.json"
        self.run_path = self.dir / "run.json"
        self._lock_fd: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def lock(self) -> bool:
        """Take the run's lock (False when another process is training this run right now)."""
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def clear(self) -> None:
        """Forget this run (``--restart``): the checkpoint, the done marker and stale temporary files."""
        for p in [self.path, self.done_path, self.run_path, *self.dir.glob(".*.tmp-*")]:
            p.unlink(missing_ok=True)

    # -- the MLflow run ---------------------------------------------------------------------------
    def record_run(self, run_id: str) -> None:
        """Remember the run's MLflow run id before training starts: a rerun after a kill at any instant
        (even in the first task, before any checkpoint) continues this run instead of opening another."""
        write_json(self.run_path, {"key": self.key, "run_id": run_id})

    def recorded_run(self) -> str | None:
        """The MLflow run id ``record_run`` wrote for this exact run, or None."""
        info = read_json(self.run_path) or {}
        run_id = info.get("run_id")
        return run_id if info.get("key") == self.key and isinstance(run_id, str) else None

    # -- checkpoint ------------------------------------------------------------------------------
    def load(self) -> dict[str, Any] | None:
        """The checkpoint of this exact run, or None when there is none yet.

        An unreadable or foreign file, another run's checkpoint (its run key differs) or one of other code is the
        user's to resolve: one clear line, never a silent restart nor a resume into the wrong run.
        """
        for stale in self.dir.glob(".checkpoint.pt.tmp-*"):  # a crash while writing: the rename never happened
            stale.unlink(missing_ok=True)
        if not self.path.exists():
            return None
        refuse_special(self.path, "checkpoint")
        try:
            ck = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ClbenchError(f"checkpoint {self.path}: cannot be read ({type(exc).__name__}); delete it or run "
                               "again with --restart") from None
        if not isinstance(ck, dict) or ck.get("format") != FORMAT:
            raise ClbenchError(f"checkpoint {self.path}: not a clbench checkpoint; delete it or run again with "
                               "--restart")
        if ck.get("version") != VERSION:
            raise ClbenchError(f"checkpoint {self.path}: written by checkpoint format {ck.get('version')}, this "
                               f"clbench reads {VERSION}; run again with --restart")
        if ck.get("key") != self.key:
            raise ClbenchError(f"checkpoint {self.path}: belongs to another run (run key {str(ck.get('key'))[:16]}, "
                               f"this folder's run is {self.key[:16]}); it was copied or moved here: delete it or run "
                               "again with --restart")
        self.check_identity(ck.get("identity"), self.path, f"checkpointed after {ck.get('next_task')} finished task(s)")
        return ck

    def check_identity(self, recorded: Any, where: Path, what: str) -> None:
        """Refuse a checkpoint or finished marker written by other code than this run's (``identity``): resuming
        would mix two versions of the method in one run, skipping would report the old code's numbers."""
        if self.identity is None or recorded == self.identity:
            return
        old = recorded if isinstance(recorded, dict) else {}
        changed = [f"{k} {old.get(k, '(not recorded)')} -> {v}" for k, v in self.identity.items() if old.get(k) != v]
        raise ClbenchError(f"{where}: this run was {what} by other code ({'; '.join(changed)}); continuing would "
                           "mix the two: run again with --restart to train it afresh with this code, or give the "
                           "changed method a new label")

    def save(self, payload: dict[str, Any]) -> None:
        """Checkpoint ``payload`` (``next_task``, ``R``, ``model``, ...) atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "version": VERSION, "key": self.key, "identity": self.identity, **payload}
        atomic_write(self.path, lambda f: torch.save(data, f))

    # -- finished runs ---------------------------------------------------------------------------
    def done(self) -> dict[str, Any] | None:
        if not self.done_path.exists():
            return None
        refuse_special(self.done_path, "finished marker")
        try:
            info = json.loads(self.done_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or info.get("key") != self.key:
            return None
        self.check_identity(info.get("identity"), self.done_path, "finished")
        info["metrics"] = {k: float("nan") if v is None else v for k, v in (info.get("metrics") or {}).items()}
        return info

    def mark_done(self, run_id: str, metrics: dict[str, float], R: np.ndarray) -> None:
        """Write ``done.json``: strict JSON, a NaN (an accuracy matrix's unseen cells) written as null."""
        blob = json.dumps({"key": self.key, "identity": self.identity, "run_id": run_id, "metrics": {k: _finite(v) for k, v in metrics.items()},
                           "R": [[_finite(v) for v in row] for row in np.asarray(R, dtype=float).tolist()]},
                          allow_nan=False).encode()
        atomic_write(self.done_path, lambda f: f.write(blob))


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(data).encode()
    atomic_write(path, lambda f: f.write(blob))


def refuse_special(path: Path, what: str) -> None:
    """A FIFO, device or socket where a file of ours should be would block the read for ever: one line instead."""
    if path.exists() and not path.is_file():
        kind = "a FIFO" if path.is_fifo() else "a folder" if path.is_dir() else "not a regular file"
        raise ClbenchError(f"{what} {path}: is {kind}, not a file clbench wrote; remove it or run again with "
                           "--restart")


def read_json(path: Path) -> dict[str, Any] | None:
    refuse_special(path, "record")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
