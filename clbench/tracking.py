"""MLflow tracking (the only module that imports mlflow) and a null tracker with the same interface.

Layout: one experiment per suite, one parent run per ``clbench run`` invocation, one child run per
(method, seed). Metrics are buffered and written with ``log_batch`` (one call per task instead of one per
value: on sqlite 1,000 single calls take seconds, one batch a tenth of a second).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from clbench.errors import ClbenchError

PARENT_TAG = "mlflow.parentRunId"


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


class NullTracker:
    """Logs nothing; used by ``--dry-run`` style calls and unit tests of the loop."""

    uri = "none"

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


class MlflowTracker:
    """Batched MLflow logging through ``MlflowClient``."""

    def __init__(self, experiment: str, uri: str | None = None) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        if uri:
            mlflow.set_tracking_uri(uri)
        self.uri = mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self._buffers: dict[str, list] = {}
        try:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot use this store"
            msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ClbenchError(f"tracking: cannot reach the MLflow tracking store at {self.uri} ({msg}); start the "
                               "server or fix MLFLOW_TRACKING_URI / tracking.uri") from None

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
        self.flush(run_id)
        self.client.set_terminated(run_id, status)


def make_tracker(experiment: str, uri: str | None) -> MlflowTracker:
    return MlflowTracker(experiment, uri or os.environ.get("MLFLOW_TRACKING_URI") or None)


# --- Reading (the leaderboard's only door into MLflow; it never writes) -------------------------------------

CHILD_FILTER = "tags.`clbench.role` = 'child'"
HISTORY_KEYS = ("eval/acc", "spectra/top1_share", "spectra/overlap")


def resolve_read_uri(uri: str | None) -> str:
    """The store to read: ``uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's own default.

    A sqlite store that does not exist is an error here: opening it would create an empty database, and reading
    must never write.
    """
    import mlflow

    resolved = uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if resolved.startswith("sqlite:///"):
        path = Path(resolved.removeprefix("sqlite:///"))
        if str(path) != ":memory:" and not path.exists():
            raise ClbenchError(f"tracking: no MLflow store at {resolved} ({path} does not exist); run "
                               "`clbench run SUITE` here first or set MLFLOW_TRACKING_URI")
    return resolved


def read_runs(experiment: str | None = None, uri: str | None = None,
              history: tuple[str, ...] = HISTORY_KEYS) -> list[dict[str, Any]]:
    """Every clbench child run (active, not deleted) of ``experiment`` (all experiments when None), as plain dicts.

    Each dict has run_id, run_name, experiment, status, start_time (ms), end_time, tags, params, metrics (last
    value per key) and history (key -> list of (step, value) sorted by step, for the keys in ``history``).
    """
    from mlflow.tracking import MlflowClient

    resolved = resolve_read_uri(uri)
    try:
        client = MlflowClient(tracking_uri=resolved)
        experiments = client.search_experiments()
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot use this store"
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ClbenchError(f"tracking: cannot read the MLflow tracking store at {resolved} ({msg}); start the "
                           "server or fix MLFLOW_TRACKING_URI") from None
    names = {e.experiment_id: e.name for e in experiments}
    if experiment is not None:
        ids = [i for i, n in names.items() if n == experiment]
        if not ids:
            raise ClbenchError(f"leaderboard: no MLflow experiment '{experiment}' in {resolved}; experiments: "
                               f"{', '.join(sorted(names.values())) or '(none)'}")
    else:
        ids = list(names)
    out: list[dict[str, Any]] = []
    token = None
    while ids:
        page = client.search_runs(ids, filter_string=CHILD_FILTER, max_results=1000, page_token=token)
        for run in page:
            info, data = run.info, run.data
            hist = {}
            for key in history:
                if key in data.metrics:
                    points = client.get_metric_history(info.run_id, key)
                    hist[key] = sorted((int(m.step), float(m.value)) for m in points)
            out.append({"run_id": info.run_id, "run_name": info.run_name, "experiment": names[info.experiment_id],
                        "status": info.status, "start_time": info.start_time, "end_time": info.end_time,
                        "tags": dict(data.tags), "params": dict(data.params), "metrics": dict(data.metrics),
                        "history": hist})
        token = page.token
        if not token:
            break
    return out
