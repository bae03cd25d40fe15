"""Runs a suite: for every seed and method, build the stream, model and method, run the loop, log to MLflow.

This is the glue between the pieces of DESIGN.md section 1; it owns the MLflow layout (one parent run per
invocation, one child per (method, seed)) and the artifacts of every run.
"""

from __future__ import annotations

import json
import math
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

import clbench
from clbench import checkpoint
from clbench.errors import ClbenchError
from clbench.suite import Suite, format_validation_error

PACKAGES = ("torch", "torchvision", "timm", "avalanche-lib", "mlflow", "pluggy", "pydantic", "numpy")


@dataclass
class RunRecord:
    method: str
    seed: int
    run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    R: np.ndarray | None = None


@dataclass
class PlannedRun:
    label: str
    info: Any  # registry.MethodInfo
    params: Any  # validated Params instance
    entry_index: int


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(clbench.__file__).parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "clbench": clbench.__version__}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def plan_runs(suite: Suite, source: str, registry, methods: list[str] | None) -> list[PlannedRun]:
    """Resolve every method entry against the registry and validate its params (one clear line on error)."""
    planned = []
    labels = {e.display for e in suite.methods}
    for i, entry in enumerate(suite.methods):
        # `--method X` picks the entry labelled X; a method name that is no label picks all its entries
        if methods and entry.display not in methods and not (entry.name in methods and entry.name not in labels):
            continue
        try:
            info = registry.get(entry.name)
        except ClbenchError as exc:
            raise ClbenchError(f"{source}: methods.{i}.name: {exc}") from None
        try:
            params = info.cls.Params(**entry.params)
        except ValidationError as err:
            raise ClbenchError(format_validation_error(source, err, prefix=f"methods.{i}.params.")) from None
        planned.append(PlannedRun(entry.display, info, params, i))
    if methods:
        known = {p.label for p in planned} | {suite.methods[p.entry_index].name for p in planned}
        missing = [m for m in methods if m not in known]
        if missing:
            raise ClbenchError(f"--method {missing[0]}: not in the suite {source}; suite methods: "
                               f"{', '.join(m.display for m in suite.methods)}")
    return planned


def run_suite(suite: Suite, source: str, *, methods: list[str] | None = None, seeds: list[int] | None = None,
              plugins_dirs: list[str] = (), tracker=None, progress: Callable[[str], None] = print,
              dry_run: bool = False, restart: bool = False, checkpoint_dir: str | None = None,
              executor=None) -> list[RunRecord]:
    """Run every planned (method, seed); resume unfinished ones from their checkpoints, skip finished ones
    (``restart=True`` forgets both and starts fresh runs).

    ``executor`` (clbench.executors) runs the unfinished ones: the default trains them here, one after the
    other; ``RayExecutor`` submits each as a task to a Ray cluster. Under torchrun, ranks above 0 follow rank 0
    (clbench.distributed): the same runs, nothing logged or checkpointed."""
    from clbench import distributed
    from clbench.executors import LocalExecutor
    from clbench.registry import discover
    from clbench.tracking import make_tracker

    registry = discover([d for d in [suite.plugins_dir, *plugins_dirs] if d])
    planned = plan_runs(suite, source, registry, methods)
    seeds = seeds or suite.seeds
    if dry_run:
        for run in planned:
            for seed in seeds:
                progress(f"would run {run.label} ({run.info.source}) seed {seed}: {run.params.model_dump()}")
        return []
    experiment = suite.tracking.experiment or suite.name
    if distributed.is_follower():  # torchrun rank > 0: rank 0 decides, logs and checkpoints
        return distributed.follow(suite, source, planned, seeds, registry)
    tracker = tracker or make_tracker(experiment, suite.tracking.uri)
    sdir = checkpoint.suite_dir(checkpoint_dir, suite.protocol_hash(), suite.name, experiment, tracker.uri)
    stores = {(run.label, seed): checkpoint.RunStore(sdir / f"{_safe(run.label)}-s{seed}", run_key(suite, run, seed))
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
    base_tags = {"clbench.suite": suite.name, "clbench.suite_hash": suite.protocol_hash(),
                 "clbench.version": clbench.__version__}
    sha = git_sha()
    if sha:
        base_tags["clbench.git_sha"] = sha
    parent = _parent_run(tracker, sdir, suite, base_tags, progress)
    records: list[RunRecord] = []
    status = "FINISHED"
    try:
        jobs: list[RunJob] = []
        for seed in seeds:
            for run in planned:
                done = finished[(run.label, seed)]
                if done is not None:
                    progress(f"[{run.label} seed {seed}] already finished (MLflow run {done.run_id}); skipped")
                    continue
                jobs.append(RunJob(suite, source, run.label, seed, list(plugins_dirs), tracker.uri, experiment,
                                   parent, base_tags, suite_yaml, str(stores[(run.label, seed)].dir.absolute()),
                                   stores[(run.label, seed)].key))
        ran = (executor or LocalExecutor()).run(jobs, tracker=tracker, planned=planned, progress=progress)
        by_key = {(r.method, r.seed): r for r in ran}
        records = [finished[(run.label, seed)] or by_key[(run.label, seed)] for seed in seeds for run in planned]
        _suite_evidence(tracker, parent, records)
        _leaderboard_report(tracker, parent, suite, progress)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.end_run(parent, status)
    return records


@dataclass
class RunJob:
    """One (method, seed) as plain picklable data: everything another process (a Ray worker on another
    machine) needs to train it and log it into the driver's parent MLflow run, rebuilding registry, stream,
    model and tracker itself. Paths in it are absolute."""

    suite: Suite
    source: str
    label: str
    seed: int
    plugins_dirs: list[str]
    tracking_uri: str
    experiment: str
    parent: str
    base_tags: dict[str, str]
    suite_yaml: str
    store_dir: str
    store_key: str


def execute_job(job: RunJob, *, tracker=None, planned: PlannedRun | None = None, streams: dict | None = None,
                progress: Callable[[str], None] = print) -> RunRecord:
    """Train one (method, seed) under its checkpoint lock, resuming from its checkpoint when there is one.

    The unit of work of every executor; callable in any process. ``tracker``, ``planned`` and ``streams`` (a
    cache of built streams, keyed by seed and stream settings) are reused when the caller has them.
    """
    from clbench.streams import build_stream

    if planned is None:
        from clbench.registry import discover

        registry = discover([d for d in [job.suite.plugins_dir, *job.plugins_dirs] if d])
        [planned] = [p for p in plan_runs(job.suite, job.source, registry, [job.label]) if p.label == job.label]
    if tracker is None:
        from clbench.tracking import make_tracker

        tracker = make_tracker(job.experiment, job.tracking_uri)
    from clbench import distributed

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


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", label)


def run_key(suite: Suite, run: PlannedRun, seed: int) -> str:
    """What must be equal for a checkpoint to continue a run: method, params, training settings, seed, data."""
    cfg = suite.train_for(suite.methods[run.entry_index])
    return checkpoint.digest({"method": run.info.name, "params": run.params.model_dump(mode="json"),
                              "train": cfg.model_dump(mode="json"), "seed": seed, "protocol": suite.protocol_hash()})


def _finished_record(key: tuple[str, int], store: checkpoint.RunStore, tracker) -> RunRecord | None:
    info = store.done()
    if info is None or tracker.run_status(info["run_id"]) != "FINISHED":
        return None
    R = np.array(info["R"], dtype=float)
    return RunRecord(key[0], key[1], info["run_id"], "FINISHED", info["metrics"], R)


def _parent_run(tracker, sdir: Path, suite: Suite, base_tags: dict[str, str], progress) -> str:
    """The parent run of this suite: the interrupted invocation's one when there is one (no duplicate runs)."""
    previous = checkpoint.read_json(sdir / "parent.json") or {}
    run_id = previous.get("run_id")
    if isinstance(run_id, str) and tracker.run_status(run_id) is not None:
        tracker.reopen_run(run_id)
        progress(f"continuing suite run {run_id} ({sdir})")
        return run_id
    parent = tracker.start_run(f"{suite.name}", {**base_tags, "clbench.role": "parent"},
                               {k: v for k, v in suite.model_dump(mode="json").items() if k != "methods"})
    checkpoint.write_json(sdir / "parent.json", {"run_id": parent})
    return parent


def run_one(suite: Suite, run: PlannedRun, seed: int, stream, tracker, parent: str, base_tags: dict[str, str],
            suite_yaml: str, progress: Callable[[str], None], store: checkpoint.RunStore | None = None) -> RunRecord:
    """Train one (method, seed), continuing from ``store``'s checkpoint when it holds one of this exact run.

    Per task: the loop finishes the task, the checkpoint is written (atomically), then the task's metrics are
    logged; a resumed run logs the checkpoint's last task's metrics only if MLflow does not have them yet.
    """
    import torch

    from clbench.backbones import build_model
    from clbench.loop import LoopState, TaskResult, peak_memory_mb, resolve_device, run_stream
    from clbench.metrics import summary
    from clbench.registry import run_manager
    from clbench.spectra import SpectraTracker

    cfg = suite.train_for(suite.methods[run.entry_index])
    device = resolve_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClbenchError(f"train.device: {cfg.device} requested but CUDA is not available; use auto or cpu")
    if device.type == "cpu" and cfg.cpu_threads:
        # a tiny ViT's per-step kernels are too small to split: two threads wait on each other
        torch.set_num_threads(cfg.cpu_threads)
    tags = {**base_tags, "clbench.method": run.label, "clbench.method_name": run.info.name,
            "clbench.seed": str(seed), "clbench.device": _device_name(device), "clbench.role": "child",
            "clbench.plugin_source": run.info.source}
    tags.update({f"clbench.stream.{k}": str(v) for k, v in getattr(stream, "meta", {}).items()})  # split_sha256, ...
    params = {"method": {"name": run.info.name, "label": run.label, "params": run.params.model_dump(mode="json")},
              "seed": seed, "stream": suite.stream.model_dump(mode="json"),
              "backbone": suite.backbone.model_dump(mode="json"), "train": cfg.model_dump(mode="json")}
    say = lambda msg: progress(f"[{run.label} seed {seed}] {msg}")  # noqa: E731
    T = len(stream.tasks)
    ck = store.load() if store is not None else None
    # The model is built before any MLflow run exists, so missing weights leave no FAILED run behind.
    torch.manual_seed(seed)
    model = build_model(suite.backbone.name, suite.backbone.image_size, suite.backbone.pretrained,
                        suite.backbone.checkpoint, suite.backbone.in_chans, suite.backbone.drop_path_rate)
    method = run.info.cls(run.params)
    pm = run_manager(method)
    spectra = SpectraTracker()
    totals = {"train_seconds": 0.0, "images": 0, "trainable": 0, "hooks": 0.0}
    spectra_rows: list[dict[str, float]] = []
    state = LoopState()
    run_id = None
    if ck is not None:
        if tracker.run_status(ck["run_id"]) is None:
            say(f"the checkpoint's MLflow run {ck['run_id']} is not in {tracker.uri}; starting afresh")
        else:
            run_id = ck["run_id"]
            tracker.reopen_run(run_id)
            say(f"resuming MLflow run {run_id} after task {ck['next_task']}/{T}")
            state = LoopState(next_task=int(ck["next_task"]), R=ck["R"].numpy(), R_til=ck["R_til"].numpy(),
                              method_state=ck["method"], model_state=ck["model"], rng=ck["rng"])
            checkpoint.load_spectra_state(spectra, ck["spectra"])
            spectra_rows = [dict(r) for r in ck["spectra_rows"]]
            totals.update(ck["totals"])
            pending = ck.get("pending")
            if pending:  # killed between the checkpoint and MLflow: log that task now, unless it got there
                _log_task_once(tracker, run_id, pending["metrics"], int(pending["task"]))
    if run_id is None:
        run_id = tracker.start_run(f"{run.label}-s{seed}", tags, params, parent=parent)
    last: dict[str, Any] = {}

    def on_task(res: TaskResult) -> None:
        t = res.task
        m = {"eval/acc": float(np.average(res.R[t, : t + 1], weights=res.sizes[: t + 1])),
             "eval/acc_til": float(np.average(res.R_til[t, : t + 1], weights=res.sizes[: t + 1])),
             "train/loss": res.loss, "cost/task_train_seconds": res.train_seconds,
             "cost/task_eval_seconds": res.eval_seconds}
        m.update({f"eval/acc/task_{j:02d}": float(res.R[t, j]) for j in range(t + 1)})
        m.update({f"train/{k}": v for k, v in res.loss_terms.items()})
        for hook_name, secs in res.hook_seconds.items():
            m[f"cost/hook_seconds/{hook_name}"] = secs
        if res.updates:
            tic = time.perf_counter()
            row = spectra.add_task(res.updates)
            row_time = time.perf_counter() - tic
            m.update(row)
            m["cost/spectra_seconds"] = row_time
            spectra_rows.append(row)
        totals["train_seconds"] += res.train_seconds
        totals["images"] += res.images
        totals["trainable"] = max(totals["trainable"], res.trainable_params)
        totals["hooks"] += sum(res.hook_seconds.values())
        last["pending"] = {"task": t, "metrics": m}

    def after_report(t: int, trained, st: LoopState) -> None:
        pending = last.pop("pending")
        if store is not None:
            checkpoint.check_loadable(st.method_state, f"method '{run.info.name}': method_state()")
            store.save({"next_task": st.next_task, "R": torch.from_numpy(st.R.copy()),
                        "R_til": torch.from_numpy(st.R_til.copy()),
                        # torch.compile wraps the backbone; checkpoints keep the plain names
                        "model": {k.replace("_orig_mod.", ""): v for k, v in trained.state_dict().items()},
                        "method": st.method_state, "rng": checkpoint.rng_state(), "run_id": run_id,
                        "spectra": checkpoint.spectra_state(spectra), "spectra_rows": spectra_rows,
                        "totals": dict(totals), "pending": pending}, t)
        tracker.log_metrics(run_id, pending["metrics"], step=t)
        tracker.flush(run_id)
        checkpoint.kill_point("log", t)

    status, record, ended = "FINISHED", None, False
    try:
        state = run_stream(model, stream, pm, cfg, seed, device, on_task=on_task, progress=say, state=state,
                           after_report=after_report)
        R, R_til = state.R, state.R_til
        sizes = np.array([len(t.test_y) for t in stream.tasks])
        final = summary(R, R_til, sizes)
        final.update({"cost/train_seconds": totals["train_seconds"],
                      "cost/img_per_s": totals["images"] / max(1e-9, totals["train_seconds"]),
                      "cost/peak_mem_mb": peak_memory_mb(device),
                      "cost/trainable_params": float(totals["trainable"]),
                      "cost/hook_share": totals["hooks"] / max(1e-9, totals["train_seconds"])})
        if spectra_rows:
            t1 = [r["spectra/top1_share"] for r in spectra_rows if "spectra/top1_share" in r]
            if t1:
                final["spectra/mean_top1_share"] = float(np.mean(t1))
        if T - 1 not in tracker.logged_steps(run_id, "final/acc"):
            tracker.log_metrics(run_id, final, step=T - 1)
        _write_artifacts(tracker, run_id, run, seed, R, R_til, spectra, suite_yaml, stream)
        say(f"final acc {final['final/acc']:.2f} forgetting {final['final/forgetting']:.2f} "
            f"({totals['train_seconds']:.1f}s training)")
        record = RunRecord(run.label, seed, run_id, status, final, R)
        tracker.end_run(run_id, status)
        ended = True
        if store is not None:
            store.mark_done(run_id, final, R)
    except FloatingPointError as exc:
        status = "FAILED"
        say(f"FAILED: {exc}; its finished tasks stay logged and checkpointed; the suite's other runs go on")
        tracker.set_tags(run_id, {"clbench.error": str(exc)})
        record = RunRecord(run.label, seed, run_id, status)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        status = "FAILED"
        if isinstance(exc, ClbenchError):
            tracker.set_tags(run_id, {"clbench.error": str(exc)[:5000]})
        raise
    finally:
        if not ended:
            tracker.end_run(run_id, status)
    return record


def _log_task_once(tracker, run_id: str, metrics: dict[str, float], task: int) -> None:
    """Log a task's metrics unless MLflow already has them (one task's metrics go in one ``log_batch``,
    which the store writes all or nothing, so ``eval/acc`` at that step stands for the whole batch)."""
    if task not in tracker.logged_steps(run_id, "eval/acc"):
        tracker.log_metrics(run_id, metrics, step=task)
        tracker.flush(run_id)


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _write_artifacts(tracker, run_id: str, run: PlannedRun, seed: int, R, R_til, spectra, suite_yaml: str,
                     stream) -> None:
    from clbench import plots
    from clbench.metrics import per_task_forgetting

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "suite.yaml").write_text(suite_yaml)
        np.savetxt(d / "acc_matrix.csv", R, delimiter=",", fmt="%.4f")
        np.savetxt(d / "acc_matrix_til.csv", R_til, delimiter=",", fmt="%.4f")
        plots.accuracy_heatmap(R, d / "acc_matrix.png", f"{run.label} seed {seed}: CIL accuracy R[i, j]")
        (d / "provenance.json").write_text(json.dumps(
            {"method": run.info.name, "label": run.label, "source": run.info.source, **run.info.provenance,
             "class_order": stream.class_order}, indent=2))
        (d / "packages.json").write_text(json.dumps(package_versions(), indent=2))
        if spectra.task_values:
            arrays = spectra.arrays()
            np.savez_compressed(d / "spectra.npz", **arrays)
            plots.spectrum_heatmap(arrays["task_sv"], list(arrays["layers"]), d / "spectra.png",
                                   f"{run.label} seed {seed}")
            T = R.shape[0]
            if T > 1:
                f = per_task_forgetting(R)
                later = [float(np.nanmean([np.nanmean(arrays["layer_metrics"][i, :, 0]) for i in range(j + 1, T)]))
                         for j in range(T - 1)]
                plots.scatter(later, f, [f"task {j}" for j in range(T - 1)], d / "forgetting_vs_imbalance.png",
                              "mean top1_share of later tasks' updates", "forgetting of task j (points)",
                              f"{run.label} seed {seed}")
        tracker.log_artifacts(run_id, d)


def _leaderboard_report(tracker, parent: str, suite: Suite, progress: Callable[[str], None]) -> None:
    """This protocol's leaderboard in the suite's experiment as ``leaderboard.html`` on the parent run; guarded,
    because a failing report must never fail or lose the runs already logged."""
    if not hasattr(tracker, "client"):  # a null or test tracker stores nothing to read back
        return
    try:
        from clbench.report import log_report

        log_report(tracker, parent, suite.tracking.experiment or suite.name, suite.protocol_hash(),
                   title=f"clbench leaderboard: {suite.name}")
    except Exception as exc:  # noqa: BLE001
        progress(f"leaderboard report not written ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")


def _suite_evidence(tracker, parent: str, records: list[RunRecord]) -> None:
    """Spearman correlation between spectral imbalance and forgetting across the suite's finished runs."""
    from clbench import plots

    done = [r for r in records if r.status == "FINISHED" and "spectra/mean_top1_share" in r.metrics]
    tracker.log_metrics(parent, {"suite/runs_finished": float(len([r for r in records if r.status == "FINISHED"])),
                                 "suite/runs_failed": float(len([r for r in records if r.status != "FINISHED"]))})
    if len(done) < 3:
        tracker.flush(parent)
        return
    from scipy.stats import spearmanr

    x = [r.metrics["spectra/mean_top1_share"] for r in done]
    y = [r.metrics["final/forgetting"] for r in done]
    rho = spearmanr(x, y).statistic
    if rho is not None and not math.isnan(rho):
        tracker.log_metrics(parent, {"suite/spearman_imbalance_forgetting": float(rho)})
    tracker.flush(parent)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "imbalance_vs_forgetting.png"
        plots.scatter(x, y, [f"{r.method}/s{r.seed}" for r in done], path, "mean top1_share of task updates",
                      "final/forgetting", f"Spearman rho = {rho:.3f} over {len(done)} runs")
        tracker.log_artifacts(parent, path.parent)

