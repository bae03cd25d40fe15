"""Shared fixtures: offline hub, an isolated cache folder, a temporary MLflow store, a temporary working folder.

Every test runs in its own temporary working folder with ``MLFLOW_TRACKING_URI`` pointing at a temporary
sqlite store: MLflow puts a sqlite store's artifacts under ``./mlruns`` of the *working directory*, so a test
that only set the tracking URI still wrote run folders into the checkout. Tests find their files through
``__file__``, never through the working directory.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny test models: one thread is faster than two on 2 cores (the kernels are too small to split), and
# subprocesses (`clbench run` in the resume, concurrency and scale-out tests) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # A session-wide cache keeps the tiny backbone's pretraining to one run per test session.
    cache = tmp_path_factory.getbasetemp() / "clbench-cache"
    monkeypatch.setenv("CLBENCH_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path_factory, monkeypatch):
    """No test writes ./mlflow.db or ./mlruns of the checkout: a temporary working folder and store."""
    work = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
