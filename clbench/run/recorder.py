"""Recording one run: what a (method, seed) run leaves behind after every task and at its end (MLflow metrics,
checkpoints, artifacts, provenance).

``RunRecorder`` is the loop's single callback (``on_task(result, state, model)``): per task it turns the
loop's ``TaskResult`` into metrics (``clbench.keys``), adds the task's update to the spectra, writes the
checkpoint (atomically, with the task's metrics as "pending") and only then logs the metrics, so a crash at any
moment loses nothing and logs nothing twice. ``finish`` logs the final metrics and the artifacts and marks the
run done. A full disk while writing any of it is one line (``clbench.store.diskfull``); the suite's figures on the
parent run are ``clbench.run.summary``'s.
"""

from __future__ import annotations

import json
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

import clbench
from clbench import keys
from clbench.analysis import plots
from clbench.analysis.metrics import accuracy_after, per_task_forgetting, summary
from clbench.model.backbones import CLModel
from clbench.model.spectra import SpectraTracker
from clbench.run import checkpoint
from clbench.run.loop import LoopState, TaskResult, checkpoint_payload, peak_memory_mb
from clbench.run.plan import PlannedRun, RunRecord
from clbench.store.diskfull import on_disk_full
from clbench.store.tracking import Tracker

PACKAGES = ("torch", "torchvision", "timm", "avalanche-lib", "mlflow", "pluggy", "pydantic", "numpy")


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


def epoch_lrs(res: TaskResult) -> dict[int, float]:
    """``train/lr`` of task ``res.task``: step (task * epochs + epoch) -> the adapter group's lr in that epoch."""
    E = len(res.epoch_lrs)
    return {res.task * E + e: lr for e, lr in enumerate(res.epoch_lrs)}


def log_lrs(tracker: Tracker, run_id: str, lrs: dict[int, float]) -> None:
    for step, lr in lrs.items():
        tracker.log_metrics(run_id, {keys.TRAIN_LR: float(lr)}, step=int(step))


def state_megabytes(state: Any) -> float:
    """MiB held by the tensors (and numpy arrays) in a ``method_state`` result, nested dicts/lists included."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() / 2**20
    if isinstance(state, np.ndarray):
        return state.nbytes / 2**20
    if isinstance(state, dict):
        return sum(state_megabytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_megabytes(v) for v in state)
    return 0.0


def task_metrics(res: TaskResult) -> dict[str, float]:
    """The MLflow metrics of one finished task (logged at step = task index)."""
    t = res.task
    m = {keys.EVAL_ACC: accuracy_after(res.R, t, res.sizes), keys.EVAL_ACC_TIL: accuracy_after(res.R_til, t, res.sizes),
         keys.TASK_TRAIN_SECONDS: res.train_seconds, keys.TASK_EVAL_SECONDS: res.eval_seconds}
    if res.loss is not None:  # None: no gradient step on this task, no loss to log
        m[keys.TRAIN_LOSS] = res.loss
    m.update({keys.eval_acc_task(j): float(res.R[t, j]) for j in range(t + 1)})
    m.update({keys.train_term(k): v for k, v in res.loss_terms.items()})
    m.update({keys.hook_seconds(h): secs for h, secs in res.hook_seconds.items()})
    if res.buffer_images is not None:
        m[keys.COST_BUFFER_IMAGES] = float(res.buffer_images)
    return m


@dataclass(kw_only=True)
class RunRecorder:
    """Checkpoints and logs one (method, seed) run, task by task; see the module docstring. Built by keyword."""

    tracker: Tracker
    run_id: str
    run: PlannedRun
    seed: int
    store: checkpoint.RunStore | None = None
    suite_yaml: str = ""  # the suite as run (an artifact)
    spectra: SpectraTracker = field(default_factory=SpectraTracker)
    spectra_rows: list[dict[str, float]] = field(default_factory=list)
    totals: dict[str, float] = field(
        default_factory=lambda: {"train_seconds": 0.0, "images": 0, "trainable": 0, "hooks": 0.0})
    ended: bool = False  # the MLflow run was ended FINISHED (nothing left for the caller to end)
    split: str = keys.SPLIT_TEST  # validation: eval/* and final/* are logged under val/ (keys.for_split)

    def _keyed(self, metrics: dict[str, float]) -> dict[str, float]:
        return {keys.for_split(k, self.split): v for k, v in metrics.items()}

    def resume(self, ck: dict[str, Any]) -> None:
        """Continue from checkpoint ``ck``; log its last task's metrics now if the crash came before MLflow had
        them (one task's metrics are one ``log_batch``, all or nothing, so ``eval/acc`` stands for the batch)."""
        checkpoint.load_spectra_state(self.spectra, ck["spectra"])
        self.spectra_rows = [dict(r) for r in ck["spectra_rows"]]
        self.totals.update(ck["totals"])
        pending = ck.get("pending")
        eval_acc = keys.for_split(keys.EVAL_ACC, self.split)
        if pending and int(pending["task"]) not in self.tracker.logged_steps(self.run_id, eval_acc):
            log_lrs(self.tracker, self.run_id, pending.get("lr", {}))
            self.tracker.log_metrics(self.run_id, pending["metrics"], step=int(pending["task"]))
            self.tracker.flush(self.run_id)

    def on_task(self, res: TaskResult, state: LoopState, model: CLModel) -> None:
        """The loop's callback: metrics, spectra, checkpoint, then MLflow."""
        m = self._keyed(task_metrics(res))
        if res.updates:
            tic = time.perf_counter()
            row = self.spectra.add_task(res.updates)
            m.update(row)
            m[keys.SPECTRA_SECONDS] = time.perf_counter() - tic
            self.spectra_rows.append(row)
        self.totals["train_seconds"] += res.train_seconds
        self.totals["images"] += res.images
        self.totals["trainable"] = max(self.totals["trainable"], res.trainable_params)
        self.totals["hooks"] += sum(res.hook_seconds.values())
        if res.buffer_images is not None:
            self.totals["buffer_images"] = float(res.buffer_images)
        m[keys.COST_STATE_MB] = self.totals["state_mb"] = state_megabytes(state.method_state)
        lrs = epoch_lrs(res)
        if self.store is not None:
            self._checkpoint(res.task, state, model, m, lrs)
            m[keys.COST_CHECKPOINT_MB] = self.totals["checkpoint_mb"] = self.store.path.stat().st_size / 2**20
        log_lrs(self.tracker, self.run_id, lrs)
        self.tracker.log_metrics(self.run_id, m, step=res.task)
        self.tracker.flush(self.run_id)

    def _checkpoint(self, t: int, state: LoopState, model: CLModel, metrics: dict[str, float],
                    lrs: dict[int, float]) -> None:
        checkpoint.check_loadable(state.method_state, f"method '{self.run.info.name}': method_state()")
        last = f"after task {t}" if t else "from its first task"  # tasks are counted from 1 in the output
        with on_disk_full(f"the checkpoint {self.store.path} after task {t + 1}",
                          f"the run resumes {last} (the previous checkpoint is intact; the metrics of task "
                          f"{t + 1} were not logged yet)"):
            self.store.save({**checkpoint_payload(state, model), "run_id": self.run_id,
                             "spectra": checkpoint.spectra_state(self.spectra), "spectra_rows": self.spectra_rows,
                             "totals": dict(self.totals), "pending": {"task": t, "metrics": metrics, "lr": lrs}})

    def final_metrics(self, state: LoopState, sizes: np.ndarray, device: torch.device) -> dict[str, float]:
        """``final/*`` (clbench.analysis.metrics), cost totals and the spectra's means over tasks."""
        final = summary(state.R, state.R_til, sizes)
        secs, method = self.totals["train_seconds"], self.totals["hooks"]
        final.update({keys.COST_TRAIN_SECONDS: secs, keys.COST_METHOD_SECONDS: method,
                      keys.COST_TOTAL_SECONDS: secs + method,
                      keys.COST_PEAK_MEM_MB: peak_memory_mb(device),
                      keys.COST_TRAINABLE_PARAMS: float(self.totals["trainable"])})
        if self.totals["images"]:  # a method without gradient steps trains no image: no rate, no share of it
            final.update({keys.COST_IMG_PER_S: self.totals["images"] / max(1e-9, secs),
                          keys.COST_HOOK_SHARE: method / max(1e-9, secs)})
        for total, key in (("buffer_images", keys.COST_BUFFER_IMAGES), ("state_mb", keys.COST_STATE_MB),
                           ("checkpoint_mb", keys.COST_CHECKPOINT_MB)):
            if total in self.totals:
                final[key] = self.totals[total]
        for per_task, mean_key in ((keys.SPECTRA_TOP1, keys.SPECTRA_MEAN_TOP1),
                                   (keys.SPECTRA_OVERLAP, keys.SPECTRA_MEAN_OVERLAP)):
            vals = [r[per_task] for r in self.spectra_rows if per_task in r]
            if vals:
                final[mean_key] = float(np.mean(vals))
        return final

    def finish(self, state: LoopState, stream, device: torch.device) -> RunRecord:
        """Log the final metrics (once) and the artifacts, end the MLflow run, mark the checkpoint done."""
        sizes = np.array([len(t.test_y) for t in stream.tasks])
        final = self._keyed(self.final_metrics(state, sizes, device))
        last = state.R.shape[0] - 1
        # final/avg_acc, not final/acc: under val/ the latter is the last task's val/acc, logged already
        if last not in self.tracker.logged_steps(self.run_id, keys.for_split(keys.FINAL_AVG_ACC, self.split)):
            per_task = {keys.for_split(k, self.split) for k in (keys.EVAL_ACC, keys.EVAL_ACC_TIL)}  # logged above
            self.tracker.log_metrics(self.run_id, {k: v for k, v in final.items() if k not in per_task}, step=last)
        trained = "every task is trained and checkpointed; the rerun only writes the artifacts and ends the run"
        with on_disk_full(f"the artifacts of MLflow run {self.run_id} ({self.run.label} seed {self.seed}) to the "
                          f"artifact store of {self.tracker.uri}", trained):
            self.write_artifacts(state, stream)
        self.tracker.end_run(self.run_id, "FINISHED")
        self.ended = True
        if self.store is not None:
            with on_disk_full(f"{self.store.done_path} (the run's finished marker)", "the finished MLflow run is "
                              "found and marked done again; nothing is trained again"):
                self.store.mark_done(self.run_id, final, state.R)
        return RunRecord(self.run.label, self.seed, self.run_id, "FINISHED", final, state.R)

    def write_artifacts(self, state: LoopState, stream) -> None:
        """The run's files: suite, accuracy matrices (CSV and heatmap), provenance, package versions, spectra."""
        run, title, R = self.run, f"{self.run.label} seed {self.seed}", state.R
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "suite.yaml").write_text(self.suite_yaml)
            np.savetxt(d / "acc_matrix.csv", R, delimiter=",", fmt="%.4f")
            np.savetxt(d / "acc_matrix_til.csv", state.R_til, delimiter=",", fmt="%.4f")
            plots.accuracy_heatmap(R, d / "acc_matrix.png", f"{title}: CIL accuracy R[i, j]")
            (d / "provenance.json").write_text(json.dumps(
                {"method": run.info.name, "label": run.label, "source": run.info.source, **run.info.full_provenance(),
                 "class_order": stream.class_order}, indent=2))
            (d / "packages.json").write_text(json.dumps(package_versions(), indent=2))
            if self.spectra.task_values:
                spectra_files(self.spectra.arrays(), R, d, title)
            self.tracker.log_artifacts(self.run_id, d)


def spectra_files(arrays: dict[str, np.ndarray], R: np.ndarray, d: Path, title: str) -> None:
    """spectra.npz, its heatmap and the run's forgetting against the later tasks' imbalance, into folder ``d``."""
    np.savez_compressed(d / "spectra.npz", **arrays)
    plots.spectrum_heatmap(arrays["task_sv"], list(arrays["layers"]), d / "spectra.png", title)
    T = R.shape[0]
    if T > 1:
        f = per_task_forgetting(R)
        later = [float(np.nanmean([np.nanmean(arrays["layer_metrics"][i, :, 0]) for i in range(j + 1, T)]))
                 for j in range(T - 1)]
        plots.scatter(later, f, [f"task {j}" for j in range(T - 1)], d / "forgetting_vs_imbalance.png",
                      ("mean top1_share of later tasks' updates", "forgetting of task j (points)", title))
