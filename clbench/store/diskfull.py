"""A full disk: one line naming what could not be written and what the rerun resumes.

A full disk (checkpoint folder, artifact store or tracking database) ends the invocation with one
:class:`DiskFullError` line (:func:`on_disk_full`): the checkpoint is written before the task's metrics are
logged, so nothing computed is lost but the task whose checkpoint could not be written. :func:`naming_disk_full`
wraps a tracker so that each of its calls names the tracking store.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from typing import Any

from clbench.errors import ClbenchError
from clbench.store.tracking import Tracker

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# sqlite's SQLITE_FULL, as MLflow's SQLAlchemy store passes it on (an OperationalError inside an MlflowException)
SQLITE_FULL = "database or disk is full"


class DiskFullError(ClbenchError):
    """A write failed for lack of disk space (or quota); the message says which store and what a rerun resumes."""


def disk_full_detail(exc: BaseException | None) -> str | None:
    """``exc`` (or an error it was raised from) as "No space left on device: PATH", or None when it is not a
    full disk."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            reason = exc.strerror or os.strerror(exc.errno)
            return f"{reason}: {exc.filename}" if exc.filename else reason
        if SQLITE_FULL in str(exc):
            return SQLITE_FULL
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def on_disk_full(what: str | None, rerun: str = "each unfinished run resumes from its last checkpoint; nothing "
                 "computed is lost", tracking_uri: str = "") -> Iterator[None]:
    """Turn a full disk while writing ``what`` into one :class:`DiskFullError` line: which store, the error, and
    ``rerun`` (what running the same command again does). ``what=None``: the invocation-wide net under the
    named sites, naming the tracking store at ``tracking_uri`` (sqlite's error names no file) or the file the
    error names."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        detail = disk_full_detail(exc)
        if detail is None:
            raise
        if what is None:
            what = f"the MLflow tracking store {tracking_uri}".rstrip() if detail == SQLITE_FULL else "a file"
        raise DiskFullError(f"disk full: cannot write {what} ({detail}); free space there and run the same "
                            f"command again: {rerun}") from None


class DiskFullNaming:
    """A tracker whose every call but ``log_artifacts`` names the tracking store (its database or files) on a full
    disk; the callers of ``log_artifacts`` name the artifacts and what the rerun does. Everything else is the
    wrapped tracker's."""

    def __init__(self, tracker: Tracker) -> None:
        self._tracker = tracker

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._tracker, name)
        if not callable(attr) or name == "log_artifacts":
            return attr
        what = f"the MLflow tracking store {getattr(self._tracker, 'uri', '')}"

        def call(*args: Any, **kwargs: Any) -> Any:
            with on_disk_full(what):
                return attr(*args, **kwargs)

        return call


def naming_disk_full(tracker: Tracker) -> Tracker:
    """``tracker`` wrapped in :class:`DiskFullNaming` (once)."""
    return tracker if isinstance(tracker, DiskFullNaming) else DiskFullNaming(tracker)  # type: ignore[return-value]
