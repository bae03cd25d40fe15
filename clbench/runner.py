"""Execution: run a suite's planned (method, seed) runs, each resumed from its checkpoint or started afresh.

``run_suite`` plans (``clbench.plan``), skips finished runs, opens the parent MLflow run, hands the rest to an
executor (``clbench.executors``; by default here, one after the other) and records the suite's figures
(``clbench.recorder.record_suite``). ``execute_job`` is the unit of work of every executor: one (method, seed)
under its checkpoint lock. ``run_one`` builds the model and method, runs the loop (``clbench.loop``) with a
``RunRecorder`` as its callback, and ends the MLflow run. MLflow layout: one parent run per invocation, one
child per (method, seed).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import clbench
from clbench import checkpoint, distributed, keys
from clbench.backbones import build_model
from clbench.errors import ClbenchError
from clbench.loop import LoopState, resolve_device, resolved_precision, run_stream
from clbench.plan import PlannedRun, RunJob, RunRecord, plan_runs, run_key, safe_label
from clbench.recorder import RunRecorder, git_sha, record_suite
from clbench.registry import discover, run_manager
from clbench.streams import build_stream, load_avalanche
from clbench.suite import Suite
from clbench.tracking import NullTracker, Tracker, make_tracker

__all__ = ["PlannedRun", "RunJob", "RunRecord", "execute_job", "plan_runs", "run_key", "run_one", "run_suite"]


def run_suite(suite: Suite, source: str, *, methods: list[str] | None = None, seeds: list[int] | None = None,
              plugins_dirs: list[str] = (), tracker: Tracker | None = None, progress: Callable[[str], None] = print,
              dry_run: bool = False, restart: bool = False, checkpoint_dir: str | None = None,
              executor=None) -> list[RunRecord]:
    """Run every planned (method, seed); resume unfinished ones from their checkpoints, skip finished ones
    (``restart=True`` forgets both and starts fresh runs).

    ``executor`` (clbench.executors) runs the unfinished ones: the default trains them here, one after the
    other; ``RayExecutor`` submits each as a task to a Ray cluster. Under torchrun, ranks above 0 follow rank 0
    (clbench.distributed): the same runs, nothing logged or checkpointed."""
    registry = discover([d for d in [suite.plugins_dir, *plugins_dirs] if d])
    planned = plan_runs(suite, source, registry, methods)
    seeds = seeds or suite.seeds
    if dry_run:
        progress(f"suite hash {suite.protocol_hash()}")
        for run in planned:
            for seed in seeds:
                progress(f"would run {run.label} ({run.info.source}) seed {seed}: {run.params.model_dump()}")
        return []
    experiment = suite.tracking.experiment or suite.name
    if distributed.active():
        load_avalanche()  # before the process group exists (clbench.streams.load_avalanche says why)
    if distributed.is_follower():  # torchrun rank > 0: rank 0 decides, logs and checkpoints
        return follow(suite, planned, seeds)
    tracker = tracker or make_tracker(experiment, suite.tracking.uri)
    sdir = checkpoint.suite_dir(checkpoint_dir, suite.protocol_hash(), suite.name, experiment, tracker.uri)
    stores = {(run.label, seed): checkpoint.RunStore(sdir / f"{safe_label(run.label)}-s{seed}",
                                                     run_key(suite, run, seed))
              for seed in seeds for run in planned}
    if restart:
        for store in stores.values():
            store.clear()
        (sdir / "parent.json").unlink(missing_ok=True)
    finished = {k: _finished_record(k, st, tracker) for k, st in stores.items()}
    distributed.announce({k for k, v in finished.items() if v is not None})
    if all(finished.values()):
        progress(f"every selected run of {suite.name} is already finished (checkpoints in {sdir}); "
                 "use --restart to run them again")
        return [r for r in finished.values() if r is not None]
    suite_yaml = yaml.safe_dump(suite.model_dump(mode="json"), sort_keys=False)
    base_tags = {keys.SUITE: suite.name, keys.SUITE_HASH: suite.protocol_hash(), keys.VERSION: clbench.__version__}
    sha = git_sha()
    if sha:
        base_tags[keys.GIT_SHA] = sha
    if suite.reference:  # the published numbers travel with the runs, so the leaderboard can show them
        base_tags[keys.REFERENCE] = json.dumps([r.model_dump(mode="json") for r in suite.reference])
    parent = _parent_run(tracker, sdir, suite, base_tags, progress)
    status = "FINISHED"
    try:
        jobs = [RunJob(suite, source, run.label, seed, list(plugins_dirs), tracker.uri, experiment, parent,
                       base_tags, suite_yaml, str(stores[(run.label, seed)].dir.absolute()),
                       stores[(run.label, seed)].key)
                for seed in seeds for run in planned if not _skip(finished[(run.label, seed)], run, seed, progress)]
        if executor is None:
            ran = run_locally(jobs, tracker=tracker, planned=planned, progress=progress)
        else:
            ran = executor.run(jobs, tracker=tracker, planned=planned, progress=progress)
        by_key = {(r.method, r.seed): r for r in ran}
        records = [finished[(run.label, seed)] or by_key[(run.label, seed)] for seed in seeds for run in planned]
        record_suite(tracker, parent, suite, records, progress)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.end_run(parent, status)
    return records


def _skip(done: RunRecord | None, run: PlannedRun, seed: int, progress: Callable[[str], None]) -> bool:
    if done is not None:
        progress(f"[{run.label} seed {seed}] already finished (MLflow run {done.run_id}); skipped")
    return done is not None


def run_locally(jobs: Sequence[RunJob], *, tracker: Tracker, planned: Sequence[PlannedRun],
                progress: Callable[[str], None]) -> list[RunRecord]:
    """Every job in this process, in order, sharing the driver's tracker and built streams."""
    by_label = {p.label: p for p in planned}
    streams: dict[Any, Any] = {}
    return [execute_job(job, tracker=tracker, planned=by_label[job.label], streams=streams, progress=progress)
            for job in jobs]


def execute_job(job: RunJob, *, tracker: Tracker | None = None, planned: PlannedRun | None = None,
                streams: dict | None = None, progress: Callable[[str], None] = print) -> RunRecord:
    """Train one (method, seed) under its checkpoint lock, resuming from its checkpoint when there is one.

    The unit of work of every executor; callable in any process. ``tracker``, ``planned`` and ``streams`` (a
    cache of built streams, keyed by seed and stream settings) are reused when the caller has them.
    """
    if planned is None:
        registry = discover([d for d in [job.suite.plugins_dir, *job.plugins_dirs] if d])
        [planned] = [p for p in plan_runs(job.suite, job.source, registry, [job.label]) if p.label == job.label]
    if tracker is None:
        tracker = make_tracker(job.experiment, job.tracking_uri)
    store = checkpoint.RunStore(Path(job.store_dir), job.store_key)
    if not distributed.announce(store.lock()):  # under torchrun, the other ranks follow this decision
        progress(f"[{job.label} seed {job.seed}] another clbench process is running it now "
                 f"(lock in {store.dir}); skipped")
        return RunRecord(job.label, job.seed, "", "BUSY")
    try:
        streams = {} if streams is None else streams
        key = (job.seed, json.dumps(job.suite.stream.model_dump(mode="json"), sort_keys=True))
        if key not in streams:
            progress(f"building stream {job.suite.stream.name} ({job.suite.stream.num_tasks} tasks) seed {job.seed}")
            streams[key] = build_stream(job.suite.stream, job.seed)
        return run_one(job.suite, planned, job.seed, streams[key], tracker, job.parent, job.base_tags,
                       job.suite_yaml, progress, store)
    finally:
        store.unlock()


def follow(suite: Suite, planned: list[PlannedRun], seeds: list[int]) -> list[RunRecord]:
    """A torchrun follower rank's ``run_suite``: the runs rank 0 runs, in the same order, with nothing logged or
    checkpointed; returns no records (rank 0 reports)."""
    finished = distributed.broadcast(None)
    if all((run.label, seed) in finished for seed in seeds for run in planned):
        return []
    streams: dict[int, Any] = {}
    for seed in seeds:
        for run in planned:
            if (run.label, seed) in finished or not distributed.broadcast(None):
                continue
            if seed not in streams:
                streams[seed] = build_stream(suite.stream, seed)
            run_one(suite, run, seed, streams[seed], NullTracker(), "", {}, "", lambda s: None, None)
    return []


def _finished_record(key: tuple[str, int], store: checkpoint.RunStore, tracker: Tracker) -> RunRecord | None:
    info = store.done()
    if info is None or tracker.run_status(info["run_id"]) != "FINISHED":
        return None
    R = np.array(info["R"], dtype=float)
    return RunRecord(key[0], key[1], info["run_id"], "FINISHED", info["metrics"], R)


def _parent_run(tracker: Tracker, sdir: Path, suite: Suite, base_tags: dict[str, str], progress) -> str:
    """The parent run of this suite: the interrupted invocation's one when there is one (no duplicate runs)."""
    previous = checkpoint.read_json(sdir / "parent.json") or {}
    run_id = previous.get("run_id")
    if isinstance(run_id, str) and tracker.run_status(run_id) is not None:
        tracker.reopen_run(run_id)
        progress(f"continuing suite run {run_id} ({sdir})")
        return run_id
    parent = tracker.start_run(f"{suite.name}", {**base_tags, keys.ROLE: keys.ROLE_PARENT},
                               {k: v for k, v in suite.model_dump(mode="json").items() if k != "methods"})
    checkpoint.write_json(sdir / "parent.json", {"run_id": parent})
    return parent


def run_one(suite: Suite, run: PlannedRun, seed: int, stream, tracker: Tracker, parent: str,
            base_tags: dict[str, str], suite_yaml: str, progress: Callable[[str], None],
            store: checkpoint.RunStore | None = None) -> RunRecord:
    """Train one (method, seed), continuing from ``store``'s checkpoint when it holds one of this exact run."""
    cfg, rt = suite.train_for(suite.methods[run.entry_index]), suite.runtime
    device = resolve_device(rt.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClbenchError(f"runtime.device: {rt.device} requested but CUDA is not available; use auto or cpu")
    if device.type == "cpu" and rt.cpu_threads:
        # a tiny ViT's per-step kernels are too small to split: two threads wait on each other
        torch.set_num_threads(rt.cpu_threads)
    say = lambda msg: progress(f"[{run.label} seed {seed}] {msg}")  # noqa: E731
    ck = store.load() if store is not None else None
    # The model is built before any MLflow run exists, so missing weights leave no FAILED run behind.
    torch.manual_seed(seed)
    bb = suite.backbone
    model = build_model(bb.name, bb.image_size, bb.pretrained, bb.checkpoint, bb.in_chans, bb.drop_path_rate,
                        normalize=bb.normalize)
    pm = run_manager(run.info.cls(run.params))
    recorder, state = _open_run(suite, run, seed, stream, tracker, parent, base_tags, device, store, ck, say)
    status = "FAILED"  # until the run is through the loop
    try:
        state = run_stream(model, stream, pm, cfg, seed, device, on_task=recorder.on_task, progress=say,
                           state=state, comm=distributed.communicator(), runtime=rt)
        sizes = np.array([len(t.test_y) for t in stream.tasks])
        record = recorder.finish(state, sizes, device, run, seed, suite_yaml, stream)
        say(f"final acc {record.metrics[keys.FINAL_ACC]:.2f} forgetting {record.metrics[keys.FINAL_FORGETTING]:.2f} "
            f"({recorder.totals['train_seconds']:.1f}s training)")
        return record
    except FloatingPointError as exc:
        say(f"FAILED: {exc}; its finished tasks stay logged and checkpointed; the suite's other runs go on")
        tracker.set_tags(recorder.run_id, {keys.ERROR: str(exc)})
        return RunRecord(run.label, seed, recorder.run_id, "FAILED")
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        if isinstance(exc, ClbenchError):
            tracker.set_tags(recorder.run_id, {keys.ERROR: str(exc)[:5000]})
        raise
    finally:
        if not recorder.ended:
            tracker.end_run(recorder.run_id, status)


def _open_run(suite: Suite, run: PlannedRun, seed: int, stream, tracker: Tracker, parent: str,
              base_tags: dict[str, str], device: torch.device, store: checkpoint.RunStore | None,
              ck: dict[str, Any] | None, say: Callable[[str], None]) -> tuple[RunRecorder, LoopState]:
    """The run's recorder and loop state: the checkpoint's MLflow run reopened and its state, or a new child run."""
    if ck is not None and tracker.run_status(ck["run_id"]) is None:
        say(f"the checkpoint's MLflow run {ck['run_id']} is not in {tracker.uri}; starting afresh")
    elif ck is not None:
        tracker.reopen_run(ck["run_id"])
        say(f"resuming MLflow run {ck['run_id']} after task {ck['next_task']}/{len(stream.tasks)}")
        recorder = RunRecorder(tracker, ck["run_id"], run.info.name, store)
        recorder.resume(ck)
        return recorder, LoopState(next_task=int(ck["next_task"]), R=ck["R"].numpy(), R_til=ck["R_til"].numpy(),
                                   method_state=ck["method"], model_state=ck["model"], rng=ck["rng"])
    cfg = suite.train_for(suite.methods[run.entry_index])
    tags = {**base_tags, keys.METHOD: run.label, keys.METHOD_NAME: run.info.name, keys.SEED: str(seed),
            keys.DEVICE: _device_name(device), keys.ROLE: keys.ROLE_CHILD, keys.PLUGIN_SOURCE: run.info.source,
            keys.PRECISION: resolved_precision(cfg.precision, device)}
    # how it ran here (outside the suite hash): tags, shown in the leaderboard's provenance
    tags.update({keys.runtime_tag(k): str(v) for k, v in suite.runtime.model_dump(mode="json").items()})
    tags.update({f"{keys.STREAM_PREFIX}{k}": str(v) for k, v in getattr(stream, "meta", {}).items()})
    params = {"method": {"name": run.info.name, "label": run.label, "params": run.params.model_dump(mode="json")},
              "seed": seed, "stream": suite.stream.model_dump(mode="json"),
              "backbone": suite.backbone.model_dump(mode="json"), "train": cfg.model_dump(mode="json")}
    run_id = tracker.start_run(f"{run.label}-s{seed}", tags, params, parent=parent)
    return RunRecorder(tracker, run_id, run.info.name, store), LoopState()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"
