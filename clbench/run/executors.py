"""Where a suite's (method, seed) runs execute: here, one after the other (the default), or on a Ray cluster.

Both take the same list of :class:`clbench.run.plan.RunJob` (plain, picklable data) and run each through
:func:`clbench.run.runner.execute_job`, which trains under the run's checkpoint lock and resumes from its last
finished task. The driver (``run_suite``) has already created the suite's parent MLflow run; every run attaches
to it by id, so all of a suite's runs land in one MLflow store, whoever trains them.

Ray (optional, ``pip install 'clbench[ray]'``; imported only when used): each job is one Ray task asking for
``gpus_per_run`` GPUs (default: 1 when the cluster has GPUs, else 0) and ``cpus_per_run`` CPUs. A task whose
worker dies (node lost, OOM kill, preemption) is retried by Ray (``max_retries``); the retry loads the run's
checkpoint from the shared checkpoint folder and continues the same MLflow run, so a lost worker costs at most
one task of training and never makes a second MLflow run. Application errors are not retried.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from clbench.errors import ClbenchError
from clbench.run.plan import PlannedRun, RunJob, RunRecord
from clbench.run.runner import LocalExecutor, execute_job
from clbench.store.tracking import absolute_uri, local_store_path

# Forwarded to Ray workers, when set in the driver's environment: where data, caches and weights live and
# whether the hub may be reached. Tracking credentials are not forwarded: set them on the cluster's nodes.
FORWARDED_ENV = ("CLBENCH_CACHE", "CLBENCH_DATA", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME")


def check_tracking_for_cluster(uri: str, nodes: int, address: str | None) -> None:
    """A local file store (sqlite or files) is only visible on this machine: refuse it on a multi-node cluster
    or through Ray Client, where workers run elsewhere."""
    if local_store_path(uri) is None:
        return
    remote = address is not None and address.startswith("ray://")
    if nodes > 1 or remote:
        where = f"{nodes} nodes" if nodes > 1 else f"Ray Client at {address}"
        raise ClbenchError(f"--executor ray: the tracking store {uri} is a local file, which workers on other "
                           f"machines cannot write ({where}); start an MLflow server (mlflow server --host 0.0.0.0 "
                           "--backend-store-uri sqlite:///mlflow.db) and set MLFLOW_TRACKING_URI=http://HOST:5000")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ClbenchError("--executor ray: Ray is not installed; pip install 'clbench[ray]'") from None
    return ray


_WORKER_STREAMS: dict[Any, Any] = {}  # a Ray worker process reuses the stream of its previous run


def _ray_entry(job: RunJob, env: dict[str, str]) -> RunRecord:
    """A Ray task: one (method, seed), progress lines on the worker's stderr (Ray forwards them)."""
    os.environ.update(env)
    if len(_WORKER_STREAMS) > 1:  # keep at most one stream in memory
        _WORKER_STREAMS.clear()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    return execute_job(job, streams=_WORKER_STREAMS, progress=say)


class RayExecutor:
    """Each job as one Ray task on the cluster at ``address`` (None: start a local one, or use the one this
    process already joined with ``ray.init``)."""

    def __init__(self, address: str | None = None, gpus_per_run: float | None = None, cpus_per_run: float = 1.0,
                 max_retries: int = 3, init_kwargs: dict[str, Any] | None = None) -> None:
        if gpus_per_run is not None and gpus_per_run < 0 or cpus_per_run < 0:
            raise ClbenchError("--ray-gpus-per-run / --ray-cpus-per-run: must be >= 0")
        if max_retries < 0:
            raise ClbenchError("--ray-max-retries: must be >= 0")
        self.address = address
        self.gpus_per_run = gpus_per_run
        self.cpus_per_run = cpus_per_run
        self.max_retries = max_retries
        self.init_kwargs = init_kwargs or {}
        _import_ray()  # fail before anything is logged

    def _connect(self, ray) -> bool:
        if ray.is_initialized():
            return False
        try:
            ray.init(address=self.address, log_to_driver=True, **self.init_kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ClbenchError(f"--address {self.address}: cannot join the Ray cluster ({msg})") from None
        return True

    def run(self, jobs: Sequence[RunJob], *, tracker, planned: Sequence[PlannedRun],
            progress: Callable[[str], None]) -> list[RunRecord]:
        if not jobs:
            return []
        ray = _import_ray()
        from ray.exceptions import RayError, RayTaskError

        owned = self._connect(ray)
        try:
            nodes = len([n for n in ray.nodes() if n.get("Alive")])
            check_tracking_for_cluster(tracker.uri, nodes, self.address)
            cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
            gpus = self.gpus_per_run if self.gpus_per_run is not None else (1.0 if cluster_gpus > 0 else 0.0)
            for job in jobs:
                device = job.suite.runtime.device
                if device.startswith("cuda") and gpus == 0:
                    raise ClbenchError(f"runtime.device: {device} but each Ray task gets no GPU (the cluster has "
                                       f"{cluster_gpus:g}); set --ray-gpus-per-run or runtime.device=auto")
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            task = ray.remote(_ray_entry).options(num_gpus=gpus, num_cpus=self.cpus_per_run,
                                                  max_retries=self.max_retries, retry_exceptions=False)
            uri = absolute_uri(tracker.uri)
            refs = {}
            for job in jobs:
                job.tracking_uri = uri
                refs[task.remote(job, env)] = job
            progress(f"submitted {len(jobs)} runs to Ray ({nodes} node(s), {gpus:g} GPU and "
                     f"{self.cpus_per_run:g} CPU per run, up to {self.max_retries} retries)")
            done: dict[tuple[str, int], RunRecord] = {}
            pending = list(refs)
            try:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    job = refs[ready[0]]
                    try:
                        rec = ray.get(ready[0])
                    except RayTaskError as exc:  # the run raised: keep the others going, report it as failed
                        cause = getattr(exc, "cause", None) or exc
                        msg = str(cause).splitlines()[0][:300] if str(cause) else type(cause).__name__
                        progress(f"[{job.label} seed {job.seed}] FAILED on Ray: {msg}")
                        rec = RunRecord(job.label, job.seed, "", "FAILED")
                    except RayError as exc:  # the worker died more often than max_retries allows
                        progress(f"[{job.label} seed {job.seed}] FAILED on Ray: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else ''}; its checkpoint stays, "
                                 "run the same command again to resume it")
                        rec = RunRecord(job.label, job.seed, "", "FAILED")
                    done[(job.label, job.seed)] = rec
                    if rec.status != "FAILED":
                        progress(f"[{job.label} seed {job.seed}] {rec.status} on Ray")
                    progress(f"{len(done)} of {len(refs)} runs done")
            except KeyboardInterrupt:
                for ref in pending:  # a KeyboardInterrupt in each task: the run is marked KILLED, resumable
                    ray.cancel(ref)
                raise
            return [done[(job.label, job.seed)] for job in jobs]
        finally:
            if owned:
                ray.shutdown()


def _entry(job: RunJob) -> int:
    return next(i for i, m in enumerate(job.suite.methods) if m.display == job.label)


def make_executor(name: str, address: str | None = None, gpus_per_run: float | None = None,
                  cpus_per_run: float = 1.0, max_retries: int = 3):
    """The executor named on the command line (``local`` or ``ray``)."""
    if name == "local":
        if address is not None:
            raise ClbenchError("--address: only with --executor ray")
        return LocalExecutor()
    if name == "ray":
        from clbench.run import distributed

        if distributed.world_size() > 1:
            raise ClbenchError("--executor ray: not under torchrun; launch torchrun inside a run, or use Ray "
                               "for the grid")
        return RayExecutor(address, gpus_per_run, cpus_per_run, max_retries)
    raise ClbenchError(f"--executor {name}: choose local or ray")
