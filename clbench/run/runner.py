"""Execution: run a suite's planned (method, seed) runs, each resumed from its checkpoint or started afresh.

``run_suite`` reads as its steps: plan (``clbench.run.plan``), skip finished runs, open the parent MLflow run, then
for each run (an executor's job; by default here, one after the other): open, train, record, close; finally the
suite's figures (``clbench.run.summary.record_suite``). A :class:`Run` is one (method, seed) from plan to close: its
spec (the picklable ``RunJob``), planned entry, tracker, checkpoint store, MLflow run id and status.
``execute_job`` is the unit of work of every executor: one (method, seed) under its checkpoint lock.
``run_one`` builds the model and method, runs the loop (``clbench.run.loop``) with a ``RunRecorder`` as its
callback. Every MLflow run, parent or child, lives inside :func:`mlflow_run`, the one place that ends it
(FINISHED, FAILED with the error tagged, KILLED). MLflow layout: one parent run per invocation, one child per
(method, seed).
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import clbench
from clbench import keys
from clbench.data.streams import Stream, load_avalanche
from clbench.data.validation import build_run_stream, stream_cache_key
from clbench.errors import ClbenchError
from clbench.methods.hookcheck import MethodHookError, ProcessExit, exit_text, no_process_exit
from clbench.methods.registry import discover, plugin_dirs, run_manager
from clbench.model.backbones import fetch_hub_weights
from clbench.model.lm import model_for
from clbench.run import checkpoint, distributed
from clbench.run.loop import (
    LoopOptions,
    LoopState,
    resolve_device,
    resolved_precision,
    resume_state,
    run_stream,
)
from clbench.run.plan import PlannedRun, RunJob, RunRecord, plan_runs, run_identity, run_key
from clbench.run.preflight import method_problems
from clbench.run.progress import Progress, RunStarted, within
from clbench.run.recorder import RunRecorder, git_sha
from clbench.run.summary import record_suite
from clbench.store.diskfull import naming_disk_full, on_disk_full
from clbench.store.tracking import (
    NullTracker,
    Tracker,
    absolute_uri,
    fast_http,
    make_tracker,
    read_only_run_status,
    results_store,
    where_results_go,
)
from clbench.suite import Suite
from clbench.weights import weights_line

__all__ = ["PlannedRun", "Run", "RunJob", "RunOptions", "RunRecord", "execute_job", "mlflow_run", "plan_runs",
           "run_key", "run_one", "run_suite"]


def _quiet(msg: str) -> None:
    return None


@dataclass(kw_only=True)
class RunOptions:
    """How ``run_suite`` runs a suite: which ``methods`` (labels or names) and ``seeds`` (default: all), the
    plugin folders allowed (``plugins_dirs``; the suite's own ``plugins_dir`` only with ``trust_suite_plugins``,
    ``clbench.methods.registry.plugin_dirs``), the ``tracker`` (default: the suite's MLflow store), the ``progress``
    reporter (``clbench.run.progress``), ``dry_run``, ``restart`` (forget checkpoints and finished runs), the
    ``checkpoint_dir``, the ``executor`` (``clbench.run.executors``; default: here, one after the other), ``tags`` for
    the parent and every run and ``label_tags[label]`` for one method entry's runs (``clbench.run.sweep``)."""

    methods: list[str] | None = None
    seeds: list[int] | None = None
    plugins_dirs: list[str] = field(default_factory=list)
    tracker: Tracker | None = None
    progress: Progress = print
    dry_run: bool = False
    restart: bool = False
    checkpoint_dir: str | None = None
    executor: Any = None
    trust_suite_plugins: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    label_tags: dict[str, dict[str, str]] = field(default_factory=dict)
    tracking_uri: str | None = None  # --tracking-uri (clbench.tracking.results_store's precedence)


@dataclass
class SuitePlan:
    """What one invocation runs: the suite, its planned method entries, the seeds, and once the stores are
    prepared, the tracker, the suite's checkpoint folder and each run's store."""

    suite: Suite
    source: str
    opts: RunOptions
    plugins_dirs: list[str]
    planned: list[PlannedRun]
    seeds: list[int]
    tracker: Tracker | None = None
    sdir: Path | None = None
    stores: dict[tuple[str, int], checkpoint.RunStore] = field(default_factory=dict)
    suite_yaml: str = ""  # the suite as run: every run's artifact

    def __post_init__(self) -> None:
        self.suite_yaml = yaml.safe_dump(self.suite.model_dump(mode="json"), sort_keys=False)

    def keys(self) -> list[tuple[PlannedRun, int]]:
        """Every (planned entry, seed), seed-major: the order runs are executed and reported in."""
        return [(run, seed) for seed in self.seeds for run in self.planned]


def run_suite(suite: Suite, source: str, opts: RunOptions | None = None) -> list[RunRecord]:
    """Run every planned (method, seed) as ``opts`` (:class:`RunOptions`; default: all of them, the suite's store)
    says; resume unfinished ones from their checkpoints, skip finished ones (``opts.restart`` forgets both and
    starts fresh runs).

    Under torchrun, ranks above 0 follow rank 0 (clbench.run.distributed): the same runs, nothing logged or
    checkpointed."""
    plan = plan_suite(suite, source, opts or RunOptions())
    if plan.opts.dry_run:
        _dry_run(plan)
        return []
    b = suite.backbone
    fetch_hub_weights(b.name, b.pretrained, b.checkpoint)  # the hash covers the checksum of the file runs load
    if distributed.active():
        load_avalanche()  # before the process group exists (clbench.data.streams.load_avalanche says why)
    if distributed.is_follower():  # torchrun rank > 0: rank 0 decides, logs and checkpoints
        return follow(plan)
    finished = _prepare_stores(plan)
    tracker, progress = plan.tracker, plan.opts.progress
    # a full disk (checkpoints, artifacts, the tracking database): one line naming it (clbench.store.diskfull)
    with _stop_signals(), on_disk_full(None, tracking_uri=tracker.uri):
        if all(finished.values()):
            records = [r for r in finished.values() if r is not None]
            if not _finish_owed_parent(plan, records):
                progress(f"every selected run of {suite.name} is already finished (checkpoints in {plan.sdir}); "
                         "use --restart to run them again")
            return records
        base_tags = _base_tags(suite, plan.opts.tags)
        if getattr(tracker, "where", None):
            progress(tracker.where)
        parent, fresh = _parent_run(plan, base_tags)
        with mlflow_run(tracker, parent) as life:
            if fresh:
                _record_parent(plan.sdir, parent)
            jobs = [_job(plan, run, seed, parent, base_tags) for run, seed in plan.keys()
                    if not _skip(finished[(run.label, seed)], run, seed, progress)]
            ran = (plan.opts.executor or LOCAL).run(jobs, tracker=tracker, planned=plan.planned, progress=progress)
            by_key = {(r.method, r.seed): r for r in ran}
            records = [finished[(run.label, seed)] or by_key[(run.label, seed)] for run, seed in plan.keys()]
            busy = sum(r.status == "BUSY" for r in records)
            if busy:  # the suite is not done: its figures and its end wait for a rerun after the other process
                life.ended = True  # left RUNNING, not ended here
                progress(f"suite run {parent} stays RUNNING: {busy} of its runs are being trained by another clbench "
                         "process now; run the same command again after it ends to finish the suite run")
            else:
                record_suite(tracker, parent, suite, records, progress)
    return records


def open_results_store(suite: Suite, experiment: str, flag: str | None) -> Tracker:
    """The tracker of the store the suite's results go to (``results_store``'s precedence); its ``where`` line
    says which and why, printed by ``run_suite`` right before the first run is created."""
    uri, origin = results_store(suite, flag)
    tracker = make_tracker(experiment, uri)
    tracker.where = where_results_go(suite, experiment, tracker.uri, origin)
    return tracker


def plan_suite(suite: Suite, source: str, opts: RunOptions) -> SuitePlan:
    """Resolve the allowed plugin folders, discover the methods, plan the entries; params that do not fit the
    backbone are refused here, before any run exists."""
    dirs = plugin_dirs(suite.plugins_dir, opts.plugins_dirs, opts.trust_suite_plugins, source)
    planned = plan_runs(suite, source, discover(dirs), opts.methods)
    method_problems(suite, planned, source)
    return SuitePlan(suite, source, opts, list(dirs), planned, opts.seeds or suite.seeds)


def _dry_run(plan: SuitePlan) -> None:
    for line in dry_run_lines(plan.suite, plan.planned, plan.seeds, plan.opts.checkpoint_dir, plan.opts.restart,
                              plan.opts.tracking_uri):
        plan.opts.progress(line)


def _prepare_stores(plan: SuitePlan) -> dict[tuple[str, int], RunRecord | None]:
    """The tracker, the checkpoint folders (checked writable before any MLflow run exists), ``--restart``'s
    clearing; returns each run's finished record (None when it still has to run)."""
    suite, opts = plan.suite, plan.opts
    plan.tracker = naming_disk_full(opts.tracker or open_results_store(suite, suite.experiment, opts.tracking_uri))
    plan.sdir = checkpoint.suite_dir(opts.checkpoint_dir, suite.protocol_hash(), suite.name, suite.experiment,
                                     plan.tracker.uri)
    plan.stores = {(run.label, seed): _store(plan.sdir, suite, run, seed) for run, seed in plan.keys()}
    _check_folders(plan.sdir, plan.stores.values(), opts.checkpoint_dir)
    if opts.restart:
        _restart(plan)
    finished = {k: _finished_record(k, st, plan.tracker) for k, st in plan.stores.items()}
    distributed.announce({k for k, v in finished.items() if v is not None})
    return finished


def _base_tags(suite: Suite, extra: dict[str, str]) -> dict[str, str]:
    """The tags of the parent and of every run: suite, protocol hash, version, git commit, reference, split."""
    tags = {keys.SUITE: suite.name, keys.SUITE_HASH: suite.protocol_hash(), keys.VERSION: clbench.__version__,
            keys.WEIGHTS: suite.weights_identity()}
    sha = git_sha()
    if sha:
        tags[keys.GIT_SHA] = sha
    if suite.reference:  # the published numbers travel with the runs, so the leaderboard can show them
        tags[keys.REFERENCE] = json.dumps([r.model_dump(mode="json") for r in suite.reference])
    if suite.split == keys.SPLIT_VALIDATION:
        tags[keys.SPLIT] = keys.SPLIT_VALIDATION
    return {**tags, **extra}


def _job(plan: SuitePlan, run: PlannedRun, seed: int, parent: str, base_tags: dict[str, str]) -> RunJob:
    store = plan.stores[(run.label, seed)]
    return RunJob(suite=plan.suite, source=plan.source, label=run.label, seed=seed, plugins_dirs=plan.plugins_dirs,
                  tracking_uri=plan.tracker.uri, experiment=plan.suite.experiment, parent=parent,
                  base_tags={**base_tags, **plan.opts.label_tags.get(run.label, {})},
                  suite_yaml=plan.suite_yaml,
                  store_dir=str(store.dir.absolute()), store_key=store.key, store_identity=store.identity or {})
def dry_run_lines(suite: Suite, planned: Sequence[PlannedRun], seeds: Sequence[int], checkpoint_dir: str | None,
                  restart: bool = False, tracking_uri: str | None = None) -> list[str]:
    """What ``clbench run --dry-run`` prints: the suite hash and the checkpoint folder, each named for what it is,
    one short line per (method, seed) saying what the real run would do with it (``skip (finished)`` by the same
    rule the real run skips: a done checkpoint whose MLflow run is FINISHED in the suite's experiment; ``resume``
    from a checkpoint; ``run``), and a summary. Reads the store, never writes it (no store yet: nothing finished)."""
    experiment = suite.experiment
    uri = absolute_uri(results_store(suite, tracking_uri)[0])
    sdir = checkpoint.suite_dir(checkpoint_dir, suite.protocol_hash(), suite.name, experiment, uri)
    status = read_only_run_status(uri, experiment)
    lines = [f"suite {suite.name}: suite hash {suite.protocol_hash()} (the protocol; MLflow tag {keys.SUITE_HASH}) · "
             f"weights {weights_line(suite.weights_identity())} (in the hash)",
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
    return checkpoint.RunStore(checkpoint.run_folder(sdir, run.label, key, seed), key, run_identity(run))


def error_text(exc: BaseException) -> str:
    """What the ``clbench.error`` tag of a failed run says."""
    return (str(exc) or type(exc).__name__)[:5000]


@dataclass
class RunLife:
    """An open MLflow run as :func:`mlflow_run` ends it: ``status`` when the block ends normally (``fail`` makes
    it FAILED with the error tagged), ``ended`` once someone else ended it (the recorder, FINISHED)."""

    tracker: Tracker
    run_id: str
    status: str = "FINISHED"
    ended: bool = False

    def fail(self, error: str) -> None:
        """This run failed but the suite goes on: tag the error; the run ends FAILED when the block ends."""
        self.status = "FAILED"
        self.tracker.set_tags(self.run_id, {keys.ERROR: error})


@contextlib.contextmanager
def mlflow_run(tracker: Tracker, run_id: str) -> Iterator[RunLife]:
    """The life of MLflow run ``run_id`` (a suite's parent or one (method, seed)): when the block ends, the run is
    ended FINISHED (or as ``RunLife.fail`` said), KILLED on Ctrl-C or SIGTERM, FAILED with the error tagged on any
    other error. While an error propagates, a store that cannot end the run (a full disk) must not replace that
    error: the run stays RUNNING and the rerun continues it. The one place an MLflow run is ended on error."""
    life, failing = RunLife(tracker, run_id), True
    try:
        yield life
        failing = False
    except KeyboardInterrupt:
        life.status = "KILLED"
        raise
    except BaseException as exc:
        life.status = "FAILED"
        with contextlib.suppress(Exception):  # the original error matters more than a failed tag
            tracker.set_tags(run_id, {keys.ERROR: error_text(exc)})
        raise
    finally:
        if not life.ended:
            if failing:
                with contextlib.suppress(Exception), fast_http():  # after Ctrl-C: seconds, not a dead server's
                    tracker.end_run(run_id, life.status)
            else:
                tracker.end_run(run_id, life.status)


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


def _restart(plan: SuitePlan) -> None:
    """``--restart``: forget the selected runs. Each run's lock is taken first (a run another process trains
    now is never deleted under it); a run left RUNNING by a kill is marked KILLED, not abandoned RUNNING."""
    locked: list[checkpoint.RunStore] = []
    try:
        for (label, seed), store in plan.stores.items():
            if not store.lock():
                raise ClbenchError(f"--restart: {label} seed {seed} is being trained by another clbench process now "
                                   f"(lock in {store.dir}); wait for it to end or stop it, then restart")
            locked.append(store)
        for store in locked:
            old = store.recorded_run()
            if old and plan.tracker.run_status(old) == "RUNNING":
                plan.tracker.end_run(old, "KILLED")
                plan.opts.progress(f"--restart: MLflow run {old} marked KILLED")
            store.clear()
    finally:
        for store in locked:
            store.unlock()
    (plan.sdir / "parent.json").unlink(missing_ok=True)


def _finish_owed_parent(plan: SuitePlan, records: list[RunRecord]) -> bool:
    """Every run is finished but the suite's parent run is not (killed in its last seconds): record its figures
    and end it. True when there was such a parent."""
    tracker, progress = plan.tracker, plan.opts.progress
    parent = (checkpoint.read_json(plan.sdir / "parent.json") or {}).get("run_id")
    if not isinstance(parent, str) or tracker.run_status(parent) in (None, "FINISHED"):
        return False
    progress(f"every selected run of {plan.suite.name} is finished; finishing suite run {parent}")
    tracker.reopen_run(parent)
    with mlflow_run(tracker, parent):
        record_suite(tracker, parent, plan.suite, records, progress)
    return True


def _skip(done: RunRecord | None, run: PlannedRun, seed: int, progress: Progress) -> bool:
    if done is not None:
        progress(f"[{run.label} seed {seed}] already finished (MLflow run {done.run_id}); skipped")
    return done is not None


def run_locally(jobs: Sequence[RunJob], *, tracker: Tracker, planned: Sequence[PlannedRun],
                progress: Progress) -> list[RunRecord]:
    """Every job in this process, in order, sharing the driver's tracker and built streams; each announced by a
    :class:`clbench.run.progress.RunStarted` event (``run I of N: LABEL seed S``; the CLI draws it as a rule)."""
    by_label = {p.label: p for p in planned}
    streams: dict[Any, Any] = {}
    records = []
    for i, job in enumerate(jobs, 1):
        progress(RunStarted(i, len(jobs), job.label, job.seed))
        records.append(execute_job(job, tracker=tracker, planned=by_label[job.label], streams=streams,
                                   progress=progress))
    return records


class LocalExecutor:
    """Every job in this process, in order, sharing the driver's tracker and built streams."""

    def run(self, jobs: Sequence[RunJob], *, tracker: Tracker, planned: Sequence[PlannedRun],
            progress: Progress) -> list[RunRecord]:
        return run_locally(jobs, tracker=tracker, planned=planned, progress=progress)


LOCAL = LocalExecutor()


@dataclass
class Run:
    """One (method, seed) from plan to close: its spec (``job``: the suite, the entry's label, the seed, the
    parent run, the tags), the planned entry (method class and params), the tracker, the checkpoint store (None:
    a torchrun follower keeps none), the progress reporter; ``run_id`` once its MLflow run is open, ``status``
    once it is closed."""

    job: RunJob
    planned: PlannedRun
    tracker: Tracker
    store: checkpoint.RunStore | None = None
    progress: Progress = print
    run_id: str = ""
    status: str = "PLANNED"

    def say(self, msg: str) -> None:
        """A progress line of this run, prefixed ``[LABEL seed S]`` (its event type kept)."""
        self.progress(within(msg, f"[{self.job.label} seed {self.job.seed}] "))

    def record(self, status: str) -> RunRecord:
        self.status = status
        return RunRecord(self.job.label, self.job.seed, self.run_id, status)


def execute_job(job: RunJob, *, tracker: Tracker | None = None, planned: PlannedRun | None = None,
                streams: dict | None = None, progress: Progress = print) -> RunRecord:
    """Train one (method, seed) under its checkpoint lock, resuming from its checkpoint when there is one.

    The unit of work of every executor; callable in any process. ``tracker``, ``planned`` and ``streams`` (a
    cache of built streams, keyed by seed and stream settings) are reused when the caller has them.
    """
    if planned is None:
        registry = discover(job.plugins_dirs)  # the driver's allowed folders (run_suite resolved the trust)
        [planned] = [p for p in plan_runs(job.suite, job.source, registry, [job.label]) if p.label == job.label]
    run = Run(job, planned, tracker or make_tracker(job.experiment, job.tracking_uri),
              checkpoint.RunStore(Path(job.store_dir), job.store_key, job.store_identity or None), progress)
    if not distributed.announce(run.store.lock()):  # under torchrun, the other ranks follow this decision
        run.say(f"another clbench process is running it now (lock in {run.store.dir}); skipped")
        return run.record("BUSY")
    try:
        streams = {} if streams is None else streams
        key = stream_cache_key(job.suite, job.seed)
        if key not in streams:
            split = " (validation split)" if job.suite.split == keys.SPLIT_VALIDATION else ""
            progress(f"building stream {job.suite.stream.name} ({job.suite.stream.num_tasks} tasks) seed {job.seed}"
                     + split)
            streams[key] = build_run_stream(job.suite, job.seed)
        return run_one(run, streams[key])
    finally:
        run.store.unlock()


def follow(plan: SuitePlan) -> list[RunRecord]:
    """A torchrun follower rank's ``run_suite``: the runs rank 0 runs, in the same order, with nothing logged or
    checkpointed; returns no records (rank 0 reports)."""
    finished = distributed.broadcast(None)
    if all((run.label, seed) in finished for run, seed in plan.keys()):
        return []
    streams: dict[int, Any] = {}
    for run, seed in plan.keys():
        if (run.label, seed) in finished or not distributed.broadcast(None):
            continue
        if seed not in streams:
            streams[seed] = build_run_stream(plan.suite, seed)
        job = RunJob(suite=plan.suite, source=plan.source, label=run.label, seed=seed)
        run_one(Run(job, run, NullTracker(), progress=_quiet), streams[seed])
    return []


def _finished_record(key: tuple[str, int], store: checkpoint.RunStore, tracker: Tracker) -> RunRecord | None:
    info = store.done()
    if info is None or tracker.run_status(info["run_id"]) != "FINISHED":
        return None
    R = np.array(info["R"], dtype=float)
    return RunRecord(key[0], key[1], info["run_id"], "FINISHED", info["metrics"], R)


def _parent_run(plan: SuitePlan, base_tags: dict[str, str]) -> tuple[str, bool]:
    """The parent run of this suite: the interrupted invocation's one when there is one (no duplicate runs), or a
    new one (then ``True``: its id is still to be recorded, inside its :func:`mlflow_run`)."""
    tracker, suite = plan.tracker, plan.suite
    previous = checkpoint.read_json(plan.sdir / "parent.json") or {}
    run_id = previous.get("run_id")
    if isinstance(run_id, str) and tracker.run_status(run_id) is not None:
        tracker.reopen_run(run_id)
        tracker.set_tags(run_id, base_tags)  # this invocation's (a widened sweep's search space, the version)
        plan.opts.progress(f"continuing suite run {run_id} ({plan.sdir})")
        return run_id, False
    return tracker.start_run(f"{suite.name}", {**base_tags, keys.ROLE: keys.ROLE_PARENT},
                             {k: v for k, v in suite.model_dump(mode="json").items() if k != "methods"}), True


def deterministic_algorithms(on: bool) -> None:
    """``runtime.deterministic``: deterministic kernels only (torch raises on an op that has none), cuBLAS with a
    fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts a handle; a value the user set is kept) and
    no cuDNN autotuning. Off: torch's defaults, so one run's setting never leaks into the next in this process."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False if on else torch.backends.cudnn.benchmark


def _record_parent(sdir: Path, parent: str) -> None:
    """The parent's id in the checkpoint folder (a parent whose id cannot be recorded ends FAILED, not RUNNING)."""
    with on_disk_full(f"{sdir / 'parent.json'} (the suite's record in the checkpoint folder)",
                      "nothing was trained yet"):
        checkpoint.write_json(sdir / "parent.json", {"run_id": parent})


def _construct(run: PlannedRun) -> Any:
    """The run's method instance; its constructor ending the process is a one-line error, not a silent exit."""
    try:
        with no_process_exit():
            return run.info.cls(run.params)
    except (SystemExit, ProcessExit) as exc:
        raise MethodHookError(f"plugin {run.info.source}: constructing method '{run.info.name}' called "
                              f"{exit_text(exc)}; a method must never end the process") from None


def _check_checkpoint(ck: dict[str, Any], store: checkpoint.RunStore, tasks: int) -> None:
    """A checkpoint continues only the MLflow run this run recorded before training (``run.json``: never the
    suite's parent nor another run's), from a task the stream has."""
    nxt, recorded = ck.get("next_task"), store.recorded_run()
    if not isinstance(nxt, int) or isinstance(nxt, bool) or not 1 <= nxt <= tasks:
        raise ClbenchError(f"checkpoint {store.path}: next_task {nxt!r} is not a task of this run's stream (1..{tasks} "
                           "after a finished task); it is damaged: delete it or run again with --restart")
    if ck.get("run_id") != recorded:
        raise ClbenchError(f"checkpoint {store.path}: continues MLflow run {ck.get('run_id')!r}, but this run's "
                           f"record ({store.run_path.name}) names {recorded!r}; it belongs elsewhere: delete it or "
                           "run again with --restart")


def run_one(run: Run, stream) -> RunRecord:
    """Train one (method, seed): open its MLflow run (continuing the one of ``run.store``'s checkpoint when it
    holds one of this exact run), train, record, close."""
    suite, seed, entry = run.job.suite, run.job.seed, run.planned
    cfg, rt = suite.train_for(suite.methods[entry.entry_index]), suite.runtime
    device = _device(rt)
    deterministic_algorithms(rt.deterministic)
    ck = run.store.load() if run.store is not None else None
    if ck is not None:
        _check_checkpoint(ck, run.store, len(stream.tasks))
    # The model is built before any MLflow run exists, so missing weights leave no FAILED run behind.
    torch.manual_seed(seed)
    model = model_for(suite.backbone)  # an image or a language model (clbench.model.lm)
    if getattr(model, "generative", False) and not isinstance(stream, Stream):  # text: the model tokenizes it
        stream = model.encode(stream)
    pm = run_manager(_construct(entry))
    recorder, state, fresh = _open_run(run, stream, device, ck)
    with mlflow_run(run.tracker, run.run_id) as life:
        if fresh:
            _record_run(run)
        try:
            opts = LoopOptions(device=device, on_task=recorder.on_task, progress=run.say, state=state,
                               comm=distributed.communicator(), runtime=rt)
            state = run_stream(model, stream, pm, cfg, seed, opts)
            record = recorder.finish(state, stream, device)
        except (FloatingPointError, MethodHookError) as exc:  # this run's failure, not the suite's
            life.ended = recorder.ended
            if isinstance(exc, MethodHookError):
                exc = MethodHookError(f"plugin {entry.info.source}: {exc}")
            run.say(f"FAILED: {exc}; its finished tasks stay logged and checkpointed; the suite's other runs go on")
            life.fail(str(exc))
            return run.record("FAILED")
        life.ended = recorder.ended
    run.status = record.status
    acc, fgt = (record.metrics[keys.for_split(k, suite.split)] for k in (keys.FINAL_ACC, keys.FINAL_FORGETTING))
    on = " on the validation split" if suite.split == keys.SPLIT_VALIDATION else ""
    run.say(f"final acc {acc:.2f} forgetting {fgt:.2f}{on} ({recorder.totals['train_seconds']:.1f}s training, "
            f"{recorder.totals['hooks']:.1f}s method)")
    return record


def _device(rt) -> torch.device:
    device = resolve_device(rt.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClbenchError(f"runtime.device: {rt.device} requested but CUDA is not available; use auto or cpu")
    if device.type == "cpu" and rt.cpu_threads:
        # a tiny ViT's per-step kernels are too small to split: two threads wait on each other
        torch.set_num_threads(rt.cpu_threads)
    return device


def _recorder(run: Run) -> RunRecorder:
    return RunRecorder(tracker=run.tracker, run_id=run.run_id, run=run.planned, seed=run.job.seed, store=run.store,
                       suite_yaml=run.job.suite_yaml, split=run.job.suite.split)


def _open_run(run: Run, stream, device: torch.device,
              ck: dict[str, Any] | None) -> tuple[RunRecorder, LoopState, bool]:
    """The run's recorder and loop state: the checkpoint's MLflow run reopened and its state, or a new child run
    (then ``True``: its id is still to be recorded in the checkpoint folder, inside its :func:`mlflow_run`)."""
    tracker, store = run.tracker, run.store
    if ck is not None and tracker.run_status(ck["run_id"]) is None:
        run.say(f"the checkpoint's MLflow run {ck['run_id']} is not in {tracker.uri}; starting afresh")
    elif ck is not None:
        tracker.reopen_run(ck["run_id"])
        run.say(f"resuming MLflow run {ck['run_id']} after task {ck['next_task']}/{len(stream.tasks)}")
        run.run_id = ck["run_id"]
        recorder = _recorder(run)
        recorder.resume(ck)
        return recorder, resume_state(ck), False
    recorded = store.recorded_run() if store is not None and ck is None else None
    if recorded is not None and tracker.run_status(recorded) not in (None, "FINISHED"):
        # killed before its first checkpoint: the same MLflow run starts over (no task of it was logged)
        tracker.reopen_run(recorded)
        run.say(f"resuming MLflow run {recorded} from its first task (stopped before any task finished)")
        run.run_id = recorded
        return _recorder(run), LoopState(), False
    run.run_id = tracker.start_run(f"{run.job.label}-s{run.job.seed}", _child_tags(run, stream, device),
                                   _child_params(run), parent=run.job.parent)
    return _recorder(run), LoopState(), True


def _child_tags(run: Run, stream, device: torch.device) -> dict[str, str]:
    suite, entry = run.job.suite, run.planned
    cfg = suite.train_for(suite.methods[entry.entry_index])
    tags = {**run.job.base_tags, keys.METHOD: entry.label, keys.METHOD_NAME: entry.info.name,
            keys.SEED: str(run.job.seed), keys.DEVICE: _device_name(device), keys.ROLE: keys.ROLE_CHILD,
            keys.PLUGIN_SOURCE: entry.info.source, keys.CODE_DIGEST: entry.info.code_digest(),
            keys.LOW_RANK_UPDATES: str(getattr(entry.info.cls, "low_rank_updates", True)).lower(),
            keys.PRECISION: resolved_precision(cfg.precision, device)}
    # how it ran here (outside the suite hash): tags, shown in the leaderboard's provenance
    tags.update({keys.runtime_tag(k): str(v) for k, v in suite.runtime.model_dump(mode="json").items()})
    tags.update({f"{keys.STREAM_PREFIX}{k}": str(v) for k, v in getattr(stream, "meta", {}).items()})
    return tags


def _child_params(run: Run) -> dict[str, Any]:
    suite, entry = run.job.suite, run.planned
    cfg = suite.train_for(suite.methods[entry.entry_index])
    return {"method": {"name": entry.info.name, "label": entry.label, "params": entry.params.model_dump(mode="json")},
            "seed": run.job.seed, "stream": suite.stream.model_dump(mode="json"),
            "backbone": suite.backbone.model_dump(mode="json"), "train": cfg.model_dump(mode="json")}


def _record_run(run: Run) -> None:
    """The new MLflow run's id in the checkpoint folder, before training: a rerun after a kill at any instant
    continues this run."""
    if run.store is not None:
        with on_disk_full(f"{run.store.run_path} (the run's record in its checkpoint folder)",
                          "the run starts again from its first task; nothing was trained yet"):
            run.store.record_run(run.run_id)
    where = f" (checkpoints in {run.store.dir})" if run.store is not None else ""
    run.say(f"starting MLflow run {run.run_id}{where}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"
