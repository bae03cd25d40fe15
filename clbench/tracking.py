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
