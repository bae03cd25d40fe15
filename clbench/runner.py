"""Execution: run a suite's planned (method, seed) runs, each resumed from its checkpoint or started afresh.

``run_suite`` plans (``clbench.plan``), skips finished runs, opens the parent MLflow run, hands the rest to an
executor (``clbench.executors``; by default here, one after the other) and records the suite's figures
(``clbench.recorder.record_suite``). ``execute_job`` is the unit of work of every executor: one (method, seed)
under its checkpoint lock. ``run_one`` builds the model and method, runs the loop (``clbench.loop``) with a
``RunRecorder`` as its callback, and ends the MLflow run. MLflow layout: one parent run per invocation, one
child per (method, seed).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import clbench
from clbench import checkpoint, distributed, keys
from clbench.backbones import build_model, fetch_hub_weights
from clbench.errors import ClbenchError
from clbench.hookcheck import MethodHookError
from clbench.loop import LoopState, resolve_device, resolved_precision, resume_state, run_stream
from clbench.plan import PlannedRun, RunJob, RunRecord, plan_runs, run_key
from clbench.preflight import method_problems
from clbench.recorder import RunRecorder, git_sha, naming_disk_full, on_disk_full, record_suite
from clbench.registry import discover, plugin_dirs, run_manager
from clbench.streams import load_avalanche
from clbench.suite import Suite
from clbench.tracking import NullTracker, Tracker, absolute_uri, make_tracker, read_only_run_status, store_uri
from clbench.validation import build_run_stream, stream_cache_key
from clbench.weights import weights_line

__all__ = ["PlannedRun", "RunJob", "RunRecord", "execute_job", "plan_runs", "run_key", "run_one", "run_suite"]


def run_suite(suite: Suite, source: str, *, methods: list[str] | None = None, seeds: list[int] | None = None,
              plugins_dirs: list[str] = (), tracker: Tracker | None = None, progress: Callable[[str], None] = print,
              dry_run: bool = False, restart: bool = False, checkpoint_dir: str | None = None,
              executor=None, trust_suite_plugins: bool = False, tags: dict[str, str] | None = None,
              label_tags: dict[str, dict[str, str]] | None = None) -> list[RunRecord]:
    """Run every planned (method, seed); resume unfinished ones from their checkpoints, skip finished ones
    (``restart=True`` forgets both and starts fresh runs).

    ``executor`` (clbench.executors) runs the unfinished ones: the default trains them here, one after the
    other; ``RayExecutor`` submits each as a task to a Ray cluster. Under torchrun, ranks above 0 follow rank 0
    (clbench.distributed): the same runs, nothing logged or checkpointed. The suite's ``plugins_dir`` is loaded
    only with ``trust_suite_plugins`` or when ``plugins_dirs`` names it (``clbench.registry.plugin_dirs``).
    ``tags`` go on the parent and every run, ``label_tags[label]`` on that method entry's runs (clbench.sweep)."""
    plugins_dirs = plugin_dirs(suite.plugins_dir, plugins_dirs, trust_suite_plugins, source)
    registry = discover(plugins_dirs)
    planned = plan_runs(suite, source, registry, methods)
    method_problems(suite, planned, source)  # params that do not fit the backbone: refused before any run exists
    seeds = seeds or suite.seeds
    if dry_run:
        for line in dry_run_lines(suite, planned, seeds, checkpoint_dir, restart):
            progress(line)
        return []
    experiment = suite.experiment
    b = suite.backbone
    fetch_hub_weights(b.name, b.pretrained, b.checkpoint)  # the hash covers the checksum of the file runs load
    if distributed.active():
        load_avalanche()  # before the process group exists (clbench.streams.load_avalanche says why)
    if distributed.is_follower():  # torchrun rank > 0: rank 0 decides, logs and checkpoints
        return follow(suite, planned, seeds)
    tracker = naming_disk_full(tracker or make_tracker(experiment, suite.tracking.uri))  # a full disk names it
    sdir = checkpoint.suite_dir(checkpoint_dir, suite.protocol_hash(), suite.name, experiment, tracker.uri)
    stores = {(run.label, seed): _store(sdir, suite, run, seed) for seed in seeds for run in planned}
    _check_folders(sdir, stores.values(), checkpoint_dir)  # before any MLflow run exists
    if restart:
        _restart(sdir, stores, tracker, progress)
    finished = {k: _finished_record(k, st, tracker) for k, st in stores.items()}
    distributed.announce({k for k, v in finished.items() if v is not None})
    base_tags = {keys.SUITE: suite.name, keys.SUITE_HASH: suite.protocol_hash(), keys.VERSION: clbench.__version__,
                 keys.WEIGHTS: suite.weights_identity()}
    sha = git_sha()
    if sha:
        base_tags[keys.GIT_SHA] = sha
    if suite.reference:  # the published numbers travel with the runs, so the leaderboard can show them
        base_tags[keys.REFERENCE] = json.dumps([r.model_dump(mode="json") for r in suite.reference])
    if suite.split == keys.SPLIT_VALIDATION:
        base_tags[keys.SPLIT] = keys.SPLIT_VALIDATION
    base_tags.update(tags or {})
    label_tags = label_tags or {}
    # a full disk (checkpoints, artifacts, the tracking database): one line naming it (clbench.recorder)
    with _stop_signals(), on_disk_full(None, tracking_uri=tracker.uri):
        if all(finished.values()):
            records = [r for r in finished.values() if r is not None]
            if not _finish_owed_parent(tracker, sdir, suite, records, progress):
                progress(f"every selected run of {suite.name} is already finished (checkpoints in {sdir}); "
                         "use --restart to run them again")
            return records
        suite_yaml = yaml.safe_dump(suite.model_dump(mode="json"), sort_keys=False)
        parent = _parent_run(tracker, sdir, suite, base_tags, progress)
        with _ending(tracker, parent):
            jobs = [RunJob(suite, source, run.label, seed, list(plugins_dirs), tracker.uri, experiment, parent,
                           {**base_tags, **label_tags.get(run.label, {})}, suite_yaml, str(stores[(run.label, seed)].dir.absolute()),
                           stores[(run.label, seed)].key)
                    for seed in seeds for run in planned
                    if not _skip(finished[(run.label, seed)], run, seed, progress)]
            if executor is None:
                ran = run_locally(jobs, tracker=tracker, planned=planned, progress=progress)
            else:
                ran = executor.run(jobs, tracker=tracker, planned=planned, progress=progress)
            by_key = {(r.method, r.seed): r for r in ran}
            records = [finished[(run.label, seed)] or by_key[(run.label, seed)] for seed in seeds for run in planned]
            record_suite(tracker, parent, suite, records, progress)
    return records


def dry_run_lines(suite: Suite, planned: Sequence[PlannedRun], seeds: Sequence[int], checkpoint_dir: str | None,
                  restart: bool = False) -> list[str]:
    """What ``clbench run --dry-run`` prints: the suite hash and the checkpoint folder, each named for what it is,
    one short line per (method, seed) saying what the real run would do with it (``skip (finished)`` by the same
    rule the real run skips: a done checkpoint whose MLflow run is FINISHED in the suite's experiment; ``resume``
    from a checkpoint; ``run``), and a summary. Reads the store, never writes it (no store yet: nothing finished)."""
    experiment = suite.tracking.experiment or suite.name
    uri = absolute_uri(store_uri(suite.tracking.uri))
    sdir = checkpoint.suite_dir(checkpoint_dir, suite.protocol_hash(), suite.name, experiment, uri)
    status = read_only_run_status(uri, experiment)
    lines = [f"suite {suite.name}: suite hash {suite.protocol_hash()} · weights {weights_line(suite.weights_identity())} "
             f"(the protocol, the weights' checksum included; MLflow tag {keys.SUITE_HASH})",
             f"checkpoint folder {sdir}",
             f"  (its id {sdir.name.rpartition('-')[2]} digests suite hash, name, experiment and store: not the suite "
             "hash)"]
    counts: dict[str, int] = {}
    width = max(len(run.label) for run in planned) if planned else 0
    for seed in seeds:
        for run in planned:
            store = _store(sdir, suite, run, seed)
            done = None if restart else store.done()
            if done is not None and status(done["run_id"]) == "FINISHED":
                action, why = "skip (finished)", f"MLflow run {done['run_id']}"
            elif not restart and store.path.exists():
                action, why = "resume", "from its last finished task"
            else:
                action, why = "run", "restart" if restart else ""
            counts[action] = counts.get(action, 0) + 1
            params = _short_params(run)
            lines.append(f"  {action:<15} {run.label:<{width}} seed {seed}" + (f"  {why}" if why else "")
                         + (f"  [{params}]" if params else ""))
    summary = ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
    lines.append(f"{sum(counts.values())} runs: {summary}; --dry-run trains nothing and writes nothing")
    return lines


def _short_params(run: PlannedRun, limit: int = 80) -> str:
    """A method entry's params that differ from their defaults, as ``k=v``, cut at ``limit`` characters."""
    items = run.params.model_dump(exclude_defaults=True, mode="json")
    text = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in items.items())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _store(sdir: Path, suite: Suite, run: PlannedRun, seed: int) -> checkpoint.RunStore:
    key = run_key(suite, run, seed)
    return checkpoint.RunStore(checkpoint.run_folder(sdir, run.label, key, seed), key)


def error_text(exc: BaseException) -> str:
    """What the ``clbench.error`` tag of a failed run says."""
    return (str(exc) or type(exc).__name__)[:5000]


@contextlib.contextmanager
def _ending(tracker: Tracker, run_id: str) -> Iterator[None]:
    """End ``run_id`` when the block ends: FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED with the error tagged."""
    status, failing = "FINISHED", True
    try:
        yield
        failing = False
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        status = "FAILED"
        with contextlib.suppress(Exception):  # the original error matters more than a failed tag
            tracker.set_tags(run_id, {keys.ERROR: error_text(exc)})
        raise
    finally:
        _end_run(tracker, run_id, status, failing)


def _end_run(tracker: Tracker, run_id: str, status: str, failing: bool) -> None:
    """End ``run_id``; while an error propagates, a store that cannot end it (a full disk) must not replace that
    error: the run stays RUNNING and the rerun continues it."""
    if not failing:
        tracker.end_run(run_id, status)
        return
    with contextlib.suppress(Exception):
        tracker.end_run(run_id, status)


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGTERM stops a suite like Ctrl-C (its runs end KILLED and resume later); a second Ctrl-C or SIGTERM while
    the runs are being ended only says so (no traceback, no run left RUNNING half-way through its ending)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if stopping:
            print("clbench: still ending the runs as KILLED; one moment", file=sys.stderr, flush=True)
            return
        stopping.append(signum)
        raise KeyboardInterrupt

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def _check_folders(sdir: Path, stores: Iterable[checkpoint.RunStore], checkpoint_dir: str | None) -> None:
    """Every checkpoint folder can be created and written, checked before any MLflow run exists."""
    for folder in [sdir, *(st.dir for st in stores)]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as exc:
            flag = f"--checkpoint-dir {checkpoint_dir}" if checkpoint_dir else "the checkpoint folder (--checkpoint-dir)"
            raise ClbenchError(f"{flag}: cannot write {folder} ({exc.strerror or exc}); choose a writable folder "
                               "with --checkpoint-dir") from None


def _restart(sdir: Path, stores: dict[tuple[str, int], checkpoint.RunStore], tracker: Tracker,
             progress: Callable[[str], None]) -> None:
    """``--restart``: forget the selected runs. Each run's lock is taken first (a run another process trains
    now is never deleted under it); a run left RUNNING by a kill is marked KILLED, not abandoned RUNNING."""
    locked: list[checkpoint.RunStore] = []
    try:
        for (label, seed), store in stores.items():
            if not store.lock():
                raise ClbenchError(f"--restart: {label} seed {seed} is being trained by another clbench process now "
                                   f"(lock in {store.dir}); wait for it to end or stop it, then restart")
            locked.append(store)
        for store in locked:
            old = store.recorded_run()
            if old and tracker.run_status(old) == "RUNNING":
                tracker.end_run(old, "KILLED")
                progress(f"--restart: MLflow run {old} marked KILLED")
            store.clear()
    finally:
        for store in locked:
            store.unlock()
    (sdir / "parent.json").unlink(missing_ok=True)


def _finish_owed_parent(tracker: Tracker, sdir: Path, suite: Suite, records: list[RunRecord],
                        progress: Callable[[str], None]) -> bool:
    """Every run is finished but the suite's parent run is not (killed in its last seconds): record its figures
    and end it. True when there was such a parent."""
    parent = (checkpoint.read_json(sdir / "parent.json") or {}).get("run_id")
    if not isinstance(parent, str) or tracker.run_status(parent) in (None, "FINISHED"):
        return False
    progress(f"every selected run of {suite.name} is finished; finishing suite run {parent}")
    tracker.reopen_run(parent)
    with _ending(tracker, parent):
        record_suite(tracker, parent, suite, records, progress)
    return True


def _skip(done: RunRecord | None, run: PlannedRun, seed: int, progress: Callable[[str], None]) -> bool:
    if done is not None:
        progress(f"[{run.label} seed {seed}] already finished (MLflow run {done.run_id}); skipped")
    return done is not None


def run_locally(jobs: Sequence[RunJob], *, tracker: Tracker, planned: Sequence[PlannedRun],
                progress: Callable[[str], None]) -> list[RunRecord]:
    """Every job in this process, in order, sharing the driver's tracker and built streams; each announced as
    ``run I of N: LABEL seed S`` (the CLI draws that line as a rule)."""
    by_label = {p.label: p for p in planned}
    streams: dict[Any, Any] = {}
    records = []
    for i, job in enumerate(jobs, 1):
        progress(run_banner(i, len(jobs), job))
        records.append(execute_job(job, tracker=tracker, planned=by_label[job.label], streams=streams,
                                   progress=progress))
    return records


def run_banner(i: int, n: int, job: RunJob) -> str:
    """The line that opens run ``i`` of ``n`` (the overall progress counter across a suite's runs)."""
    return f"run {i} of {n}: {job.label} seed {job.seed}"


def execute_job(job: RunJob, *, tracker: Tracker | None = None, planned: PlannedRun | None = None,
                streams: dict | None = None, progress: Callable[[str], None] = print) -> RunRecord:
    """Train one (method, seed) under its checkpoint lock, resuming from its checkpoint when there is one.

    The unit of work of every executor; callable in any process. ``tracker``, ``planned`` and ``streams`` (a
    cache of built streams, keyed by seed and stream settings) are reused when the caller has them.
    """
    if planned is None:
        registry = discover(job.plugins_dirs)  # the driver's allowed folders (run_suite resolved the trust)
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
        key = stream_cache_key(job.suite, job.seed)
        if key not in streams:
            split = " (validation split)" if job.suite.split == keys.SPLIT_VALIDATION else ""
            progress(f"building stream {job.suite.stream.name} ({job.suite.stream.num_tasks} tasks) seed {job.seed}"
                     + split)
            streams[key] = build_run_stream(job.suite, job.seed)
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
                streams[seed] = build_run_stream(suite, seed)
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
    try:
        with on_disk_full(f"{sdir / 'parent.json'} (the suite's record in the checkpoint folder)",
                          "nothing was trained yet"):
            checkpoint.write_json(sdir / "parent.json", {"run_id": parent})
    except BaseException as exc:  # a parent whose id cannot be recorded ends FAILED, not RUNNING
        tracker.set_tags(parent, {keys.ERROR: error_text(exc)})
        tracker.end_run(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    return parent


def deterministic_algorithms(on: bool) -> None:
    """``runtime.deterministic``: deterministic kernels only (torch raises on an op that has none), cuBLAS with a
    fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts a handle; a value the user set is kept) and
    no cuDNN autotuning. Off: torch's defaults, so one run's setting never leaks into the next in this process."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False if on else torch.backends.cudnn.benchmark


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
    deterministic_algorithms(rt.deterministic)
    say = lambda msg: progress(f"[{run.label} seed {seed}] {msg}")  # noqa: E731
    ck = store.load() if store is not None else None
    # The model is built before any MLflow run exists, so missing weights leave no FAILED run behind.
    torch.manual_seed(seed)
    bb = suite.backbone
    model = build_model(bb.name, bb.image_size, bb.pretrained, bb.checkpoint, bb.in_chans, bb.drop_path_rate,
                        normalize=bb.normalize)
    pm = run_manager(run.info.cls(run.params))
    recorder, state = _open_run(suite, run, seed, stream, tracker, parent, base_tags, device, store, ck, say)
    status, failing = "FAILED", False  # FAILED until the run is through the loop; failing: an error propagates
    try:
        state = run_stream(model, stream, pm, cfg, seed, device, on_task=recorder.on_task, progress=say,
                           state=state, comm=distributed.communicator(), runtime=rt)
        sizes = np.array([len(t.test_y) for t in stream.tasks])
        record = recorder.finish(state, sizes, device, run, seed, suite_yaml, stream)
        acc, fgt = (record.metrics[keys.for_split(k, suite.split)] for k in (keys.FINAL_ACC, keys.FINAL_FORGETTING))
        on = " on the validation split" if suite.split == keys.SPLIT_VALIDATION else ""
        say(f"final acc {acc:.2f} forgetting {fgt:.2f}{on} ({recorder.totals['train_seconds']:.1f}s training, "
            f"{recorder.totals['hooks']:.1f}s method)")
        return record
    except (FloatingPointError, MethodHookError) as exc:  # this run's failure, not the suite's
        if isinstance(exc, MethodHookError):
            exc = MethodHookError(f"plugin {run.info.source}: {exc}")
        say(f"FAILED: {exc}; its finished tasks stay logged and checkpointed; the suite's other runs go on")
        tracker.set_tags(recorder.run_id, {keys.ERROR: str(exc)})
        return RunRecord(run.label, seed, recorder.run_id, "FAILED")
    except KeyboardInterrupt:
        status, failing = "KILLED", True
        raise
    except BaseException as exc:
        failing = True
        with contextlib.suppress(Exception):  # the original error matters more than a failed tag
            tracker.set_tags(recorder.run_id, {keys.ERROR: error_text(exc)})
        raise
    finally:
        if not recorder.ended:
            _end_run(tracker, recorder.run_id, status, failing)


def _open_run(suite: Suite, run: PlannedRun, seed: int, stream, tracker: Tracker, parent: str,
              base_tags: dict[str, str], device: torch.device, store: checkpoint.RunStore | None,
              ck: dict[str, Any] | None, say: Callable[[str], None]) -> tuple[RunRecorder, LoopState]:
    """The run's recorder and loop state: the checkpoint's MLflow run reopened and its state, or a new child run."""
    if ck is not None and tracker.run_status(ck["run_id"]) is None:
        say(f"the checkpoint's MLflow run {ck['run_id']} is not in {tracker.uri}; starting afresh")
    elif ck is not None:
        tracker.reopen_run(ck["run_id"])
        say(f"resuming MLflow run {ck['run_id']} after task {ck['next_task']}/{len(stream.tasks)}")
        recorder = RunRecorder(tracker, ck["run_id"], run.info.name, store, split=suite.split)
        recorder.resume(ck)
        return recorder, resume_state(ck)
    recorded = store.recorded_run() if store is not None and ck is None else None
    if recorded is not None and tracker.run_status(recorded) not in (None, "FINISHED"):
        # killed before its first checkpoint: the same MLflow run starts over (no task of it was logged)
        tracker.reopen_run(recorded)
        say(f"resuming MLflow run {recorded} from its first task (stopped before any task finished)")
        return RunRecorder(tracker, recorded, run.info.name, store, split=suite.split), LoopState()
    cfg = suite.train_for(suite.methods[run.entry_index])
    tags = {**base_tags, keys.METHOD: run.label, keys.METHOD_NAME: run.info.name, keys.SEED: str(seed),
            keys.DEVICE: _device_name(device), keys.ROLE: keys.ROLE_CHILD, keys.PLUGIN_SOURCE: run.info.source,
            keys.LOW_RANK_UPDATES: str(getattr(run.info.cls, "low_rank_updates", True)).lower(),
            keys.PRECISION: resolved_precision(cfg.precision, device)}
    # how it ran here (outside the suite hash): tags, shown in the leaderboard's provenance
    tags.update({keys.runtime_tag(k): str(v) for k, v in suite.runtime.model_dump(mode="json").items()})
    tags.update({f"{keys.STREAM_PREFIX}{k}": str(v) for k, v in getattr(stream, "meta", {}).items()})
    params = {"method": {"name": run.info.name, "label": run.label, "params": run.params.model_dump(mode="json")},
              "seed": seed, "stream": suite.stream.model_dump(mode="json"),
              "backbone": suite.backbone.model_dump(mode="json"), "train": cfg.model_dump(mode="json")}
    run_id = tracker.start_run(f"{run.label}-s{seed}", tags, params, parent=parent)
    recorder = RunRecorder(tracker, run_id, run.info.name, store, split=suite.split)
    if store is not None:
        try:
            with on_disk_full(f"{store.run_path} (the run's record in its checkpoint folder)",
                              "the run starts again from its first task; nothing was trained yet"):
                store.record_run(run_id)  # before training: a rerun after a kill at any instant continues this run
        except BaseException as exc:
            tracker.set_tags(run_id, {keys.ERROR: error_text(exc)})
            tracker.end_run(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
    say(f"starting MLflow run {run_id}" + (f" (checkpoints in {store.dir})" if store is not None else ""))
    return recorder, LoopState()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"
