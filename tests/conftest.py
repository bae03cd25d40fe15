"""Shared fixtures: offline hub, an isolated cache folder, a temporary MLflow store, a temporary working folder.

Every test runs in its own temporary working folder with ``MLFLOW_TRACKING_URI`` pointing at a temporary
sqlite store: MLflow puts a sqlite store's artifacts under ``./mlruns`` of the *working directory*, so a test
that only set the tracking URI still wrote run folders into the checkout. Tests find their files through
``__file__``, never through the working directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny test models: one thread is faster than two on 2 cores (the kernels are too small to split), and
# subprocesses (`clbench run` in the resume, concurrency and scale-out tests) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # A session-wide cache folder (the quickstart's backbone weights ship with clbench and are never cached).
    cache = tmp_path_factory.getbasetemp() / "clbench-cache"
    monkeypatch.setenv("CLBENCH_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path_factory, monkeypatch):
    """No test writes ./mlflow.db or ./mlruns of the checkout: a temporary working folder and store."""
    work = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")


_FRESH_STORE: list[Path] = []


@pytest.fixture(autouse=True)
def _fast_store_creation(tmp_path_factory, monkeypatch):
    """Every new MLflow sqlite store a test opens in this process is a copy of one made once per session by
    clbench's own code: MLflow's migrations take seconds (over ten under load) per store, and dozens of tests open
    one. A store that already exists (a half-made one) still goes through clbench's code, as do the stores of
    `clbench run` subprocesses (tests/test_concurrency.py races two of them to create one)."""
    from clbench.store import tracking

    create = tracking.create_sqlite_store

    def copy_or_create(path: Path) -> None:
        if path.exists() and path.stat().st_size > 0:
            return create(path)
        if not _FRESH_STORE:
            fresh = tmp_path_factory.getbasetemp() / "fresh-store" / "mlflow.db"
            fresh.parent.mkdir(exist_ok=True)
            create(fresh)
            _FRESH_STORE.append(fresh)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")  # all or nothing, as clbench's own
        shutil.copyfile(_FRESH_STORE[0], tmp)
        os.replace(tmp, path)

    monkeypatch.setattr(tracking, "create_sqlite_store", copy_or_create)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
