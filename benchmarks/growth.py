"""Cost as the stream grows (issue 37): per-task figures of every method over a long stream, and their slopes.

Every registered method (default params) runs once through the real loop (``clbench.run.loop.run_stream``, the
method's pluggy manager) over a T-task stream, and after every task the script records, against the task index:

* ``train_step``: the task's training time (``TaskResult.train_seconds``: the loop's phase 4, with the per-step
  hooks: loss terms, gradient projection, retraction, replay) divided by its optimizer steps; NaN for a task
  without a gradient step (simplecil and ranpac, closed-form: their step slopes print ``nan``);
* ``train_step_median``: the median of the task's step-to-step CPU times (``StepClock``: from one optimizer
  step to the next, so the task's first step is left out), robust to load spikes over a few steps;
* ``eval``: the task's evaluation time (``TaskResult.eval_seconds``: CIL + TIL over every task seen so far,
  so it grows with t by the protocol's definition) and ``eval_image``: the same per evaluated test image;
* ``hook``: the task-level hooks (``TaskResult.hook_seconds``: before_task, after_task, merge_task);
* ``state_mb``: the method's own checkpointed state (``method_state``'s result as ``torch.save`` writes it);
* ``checkpoint_mb``: the loop's checkpoint payload (``clbench.run.loop.checkpoint_payload``: model state dict,
  method state, accuracy matrices, RNG states) as ``torch.save`` writes it; the runner adds only small
  bookkeeping (spectra so far, metrics) to it.

The slope of a figure is its mean over the last fifth of the tasks divided by its mean over the first fifth,
where the first fifth starts at task 1 (0-based): task 0 has no earlier task, so the issue's "task 2" is the
first comparable one. For T = 20: tasks 16-19 over tasks 1-4. A slope near 1 is flat; a method whose step runs
one branch per finished task shows its growth here. The slope of a time is taken of the time divided by a
fixed reference workload timed around the same task (``Reference``: forward and backward passes of an untouched
backbone copy on one batch), because the CPU time of the same work drifts with the machine's load (measured: on
this shared machine naive LoRA's step CPU time rose 1.4x over 20 tasks while the load average went from 3 to
12); ``<figure>_raw_slope`` is the slope without that correction and ``reference_slope`` the drift itself.

Data: a synthetic stream (random uint8 images, balanced labels) sized as the quickstart's (``mnist5k``: one
channel, 16 px, 800 training and 200 test images per task of 2 classes), ``vit_tiny_clbench`` with random
weights, batch 64, one epoch capped at ``--steps`` steps per task (few steps: the figures are per step, so the
cap changes their noise, not their value). ``--data small`` (512 training and 64 test images per task) keeps a
13-method run of 20 tasks within minutes of CPU time; ``--data tiny`` shrinks everything further for a smoke run.

Timing: one torch thread and process CPU time (this process's work only; the machine is shared, and a ratio
within one process is robust to the neighbours, absolute numbers are not). The load average before and after is
printed and stored. Results: ``name=value`` lines (``<method>.<figure>_slope``) and a JSON file under
``benchmarks/results/`` with the command, commit, machine, date, load and every per-task figure.

Usage: python benchmarks/growth.py [--tasks 20] [--methods lora,sdlora,...] [--steps 12]
       [--data quickstart|small|tiny] [--out benchmarks/results/growth-T20.json] [--no-save] [--verbose]
       [--sdlora-unfolded] [--olora-merged]   # baselines: SD-LoRA's official forward, O-LoRA's merged option
       [--ranpac-M 500]   # RanPAC at a small M: its state crosses from features to G and Q within the stream
       python benchmarks/growth.py --table benchmarks/results/growth-T20.json   # the PERFORMANCE.md table
Not part of the test suite: timings only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import RUNTIME, load_line, make_cfg, method_classes, synthetic_stream  # noqa: E402
from record import cpu_model  # noqa: E402  (one machine description for every results file)

from clbench.methods.hookspecs import hookimpl  # noqa: E402
from clbench.methods.registry import run_manager  # noqa: E402
from clbench.model.backbones import Arch, build_model  # noqa: E402
from clbench.run.loop import LoopOptions, checkpoint_payload, run_stream  # noqa: E402

FIGURES = ("train_step", "train_step_median", "eval", "eval_image", "hook", "state_mb", "checkpoint_mb")
TIMES = ("train_step", "train_step_median", "eval", "eval_image", "hook")
DATA = {  # (channels, image size, training images per task, test images per task, classes per task)
    "quickstart": (1, 16, 800, 200, 2),
    "small": (1, 16, 512, 64, 2),
    "tiny": (1, 16, 128, 32, 2),
}


def saved_mb(obj: Any) -> float:
    """Size of ``obj`` as ``torch.save`` writes it, in MB (10^6 bytes)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell() / 1e6


def slope(values: list[float]) -> float:
    """Mean over the last fifth of the tasks over the mean over the first fifth counted from task 1 (T = 20:
    tasks 16-19 over tasks 1-4)."""
    k = max(1, len(values) // 5)
    usable = values[1:] if len(values) > k + 1 else values
    first, last = statistics.fmean(usable[:k]), statistics.fmean(usable[-k:])
    return last / first if first > 0 else float("nan")


class Reference:
    """A fixed workload timed next to every task: ``repeats`` forward and backward passes of an untouched copy
    of the backbone on one fixed batch (no optimizer step, so it never changes). On a shared machine the CPU
    time of the same work drifts with the neighbours (caches, memory bandwidth, a busy sibling hyperthread);
    dividing a task's times by the reference measured around that task cancels the drift, so the slopes compare
    work, not load."""

    def __init__(self, template, batch: torch.Tensor, repeats: int = 3) -> None:
        import copy

        self.model, self.batch, self.repeats = copy.deepcopy(template), batch, repeats
        if not len(self.model.heads):
            self.model.add_head(2)
        self.y = torch.arange(len(batch)) % 2

    def seconds(self) -> float:
        """Median CPU seconds of one forward and backward pass."""
        times = []
        for _ in range(self.repeats):
            tic = time.process_time()
            loss = torch.nn.functional.cross_entropy(self.model(self.model.preprocess(self.batch), head=0), self.y)
            loss.backward()
            times.append(time.process_time() - tic)
        self.model.zero_grad(set_to_none=True)
        return statistics.median(times)


class StepClock:
    """A read-only probe: the process CPU time at every ``after_optimizer_step``. The differences between a
    task's consecutive steps are whole steps (batch, forward, backward, per-step hooks, optimizer step); their
    median ignores the load spikes that inflate a mean over a few steps."""

    def __init__(self) -> None:
        self.times: list[float] = []

    @hookimpl
    def after_optimizer_step(self, ctx) -> None:
        self.times.append(time.process_time())

    def take(self) -> float | None:
        """The median step of the task just finished (None with fewer than 2 steps); starts the next task."""
        diffs = [b - a for a, b in zip(self.times, self.times[1:])]
        self.times = []
        return statistics.median(diffs) if diffs else None


def run_method(name: str, cls: type, args, template, stream, device, ref: Reference) -> dict[str, list[float]]:
    """One run of ``name`` over ``stream``; per-task figures (see the module docstring)."""
    import copy

    model = copy.deepcopy(template)
    cfg = make_cfg(args.batch_size, device, epochs=1, steps=args.steps)
    rows: dict[str, list[float]] = {f: [] for f in (*FIGURES, "reference")}
    seen_test, before = 0, [ref.seconds()]

    def on_task(res, state, trained) -> None:
        nonlocal seen_test
        after = ref.seconds()
        rows["reference"].append((before[0] + after) / 2)
        before[0] = after
        steps = min(args.steps, -(-len(stream.tasks[res.task].train_y) // args.batch_size))
        seen_test += len(stream.tasks[res.task].test_y)
        median = clock.take()
        if res.loss is None:  # no gradient step on this task (simplecil, ranpac): no per-step figure
            rows["train_step"].append(float("nan"))
            rows["train_step_median"].append(float("nan"))
        else:
            rows["train_step"].append(res.train_seconds / steps)
            rows["train_step_median"].append(rows["train_step"][-1] if median is None else median)
        rows["eval"].append(res.eval_seconds)
        rows["eval_image"].append(res.eval_seconds / seen_test)
        rows["hook"].append(sum(res.hook_seconds.values()))
        rows["state_mb"].append(saved_mb(state.method_state))
        rows["checkpoint_mb"].append(saved_mb(checkpoint_payload(state, trained)))
        if args.verbose:
            print(f"# {name} task {res.task}: step {1000 * rows['train_step'][-1]:.2f} ms, eval "
                  f"{rows['eval'][-1]:.3f} s, hook {rows['hook'][-1]:.3f} s, checkpoint "
                  f"{rows['checkpoint_mb'][-1]:.3f} MB, reference {1000 * rows['reference'][-1]:.2f} ms",
                  flush=True)

    clock = StepClock()
    run_stream(model, stream, run_manager(cls(), probes=[clock]), cfg, 0,
               LoopOptions(device=device, on_task=on_task, clock=time.process_time, runtime=RUNTIME))
    return rows


def slopes_of(rows: dict[str, list[float]]) -> dict[str, float]:
    """Every figure's slope; a time's slope divided by the reference's over the same tasks (load drift out),
    and its raw slope kept as ``<figure>_raw``."""
    out: dict[str, float] = {}
    for f in FIGURES:
        if f not in rows:
            continue
        if f in TIMES:
            out[f] = slope([v / r for v, r in zip(rows[f], rows["reference"])])
            out[f + "_raw"] = slope(rows[f])
        else:
            out[f] = slope(rows[f])
    out["reference"] = slope(rows["reference"])
    return out


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def table(path: str) -> None:
    """A results file as the markdown table of docs/PERFORMANCE.md."""
    data = json.loads(Path(path).read_text())
    print(f"<!-- {data['command']}; commit {data['commit'][:12]}; {data['date']}; load {data['load_before']} / "
          f"{data['load_after']} -->")
    print("| method | train step | ms/step (task 1) | eval | eval per image | task hooks | state MB (last) | "
          "checkpoint MB (first / last) | checkpoint |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in data["methods"].items():
        if "error" in m:
            print(f"| {name} | failed: {m['error'][:80]} |||||||")
            continue
        rows = m["per_task"]
        s = slopes_of(rows)  # from the per-task figures, so the table follows this file's definition
        step = "no steps" if s["train_step"] != s["train_step"] else f"{s['train_step']:.2f}"
        first = "-" if rows["train_step"][1] != rows["train_step"][1] else f"{1000 * rows['train_step'][1]:.1f}"
        print(f"| {name} | {step} | {first} | {s['eval']:.2f} | "
              f"{s['eval_image']:.2f} | {s['hook']:.2f} | {rows['state_mb'][-1]:.3f} | "
              f"{rows['checkpoint_mb'][0]:.3f} / {rows['checkpoint_mb'][-1]:.3f} | {s['checkpoint_mb']:.2f} |")


def unfolded(sdlora: type) -> type:
    """SD-LoRA with one branch per finished task, as the official forward (``LoRASite.combine`` left unset):
    the baseline of the folded pairs, same params, same arithmetic up to float rounding."""

    class Unfolded(sdlora):
        name = "sdlora_unfolded"

        def configure_model(self, model, ctx):
            super().configure_model(model, ctx)
            for site in self.sites.values():
                site.combine = site.fold_weight = None

    Unfolded.configure_model = hookimpl(Unfolded.configure_model)
    return Unfolded


def olora_merged(olora: type) -> type:
    """O-LoRA with ``merge_frozen: true``: each finished task's branch folded into the base weights (its A's kept
    for the orthogonality term), against the default that keeps them as one concatenated frozen branch."""

    class Merged(olora):
        name = "olora_merged"

        def __init__(self, params=None) -> None:
            super().__init__({"merge_frozen": True} if params is None else params)

    return Merged


def ranpac_with(ranpac: type, M: int) -> type:
    """RanPAC with projection dimension ``M``: a small M puts the break-even, where G and Q (M (M + 1) / 2 + M C
    float64) become smaller than the stored features (N d float32) and replace them, inside a short stream."""

    class WithM(ranpac):
        name = f"ranpac_M{M}"

        def __init__(self, params=None) -> None:
            super().__init__({"M": M} if params is None else params)

    return WithM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--methods", default=None, help="comma list (default: every registered method)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per task (one epoch, capped)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data", choices=sorted(DATA), default="quickstart")
    ap.add_argument("--backbone", default="vit_tiny_clbench")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/growth-T<tasks>.json)")
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--verbose", action="store_true", help="a line per task")
    ap.add_argument("--sdlora-unfolded", action="store_true",
                    help="also run SD-LoRA with one branch per finished task (the official forward) as a baseline")
    ap.add_argument("--olora-merged", action="store_true",
                    help="also run O-LoRA with merge_frozen: true (finished branches folded into the weights)")
    ap.add_argument("--ranpac-M", type=int, default=None, metavar="M",
                    help="run RanPAC with this projection dimension instead of the official 10000 (reported as "
                         "ranpac_M<M>): a small M shows its state stop growing past the break-even")
    ap.add_argument("--table", metavar="JSON", help="print a results file as a markdown table and exit")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return
    torch.set_num_threads(1)
    device = torch.device("cpu")
    chans, size, n_train, n_test, per_task = DATA[args.data]
    classes = method_classes(args.methods.split(",") if args.methods else None)
    if args.sdlora_unfolded:
        classes["sdlora_unfolded"] = unfolded(method_classes(["sdlora"])["sdlora"])
    if args.olora_merged:
        classes["olora_merged"] = olora_merged(method_classes(["olora"])["olora"])
    if args.ranpac_M is not None and "ranpac" in classes:
        classes[f"ranpac_M{args.ranpac_M}"] = ranpac_with(classes.pop("ranpac"), args.ranpac_M)
    torch.manual_seed(0)
    template = build_model(args.backbone, size, pretrained=False, checkpoint=None, arch=Arch(in_chans=chans))
    stream = synthetic_stream(args.tasks, per_task, n_train, n_test, chans, size)
    ref = Reference(template, stream.tasks[0].train_x[:args.batch_size])
    load_before, tic, commit = load_line(), time.perf_counter(), git_commit()  # the code measured, not later edits
    per_method: dict[str, dict[str, Any]] = {}
    for name, cls in classes.items():
        cpu = time.process_time()
        try:
            rows = run_method(name, cls, args, template, stream, device, ref)
        except Exception as exc:  # noqa: BLE001 - one failing plugin must not hide the others' figures
            print(f"# {name} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            per_method[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        slopes = slopes_of(rows)
        per_method[name] = {"per_task": rows, "slopes": slopes, "cpu_seconds": time.process_time() - cpu}
        for f, v in slopes.items():
            print(f"{name}.{f}_slope={v:.4f}", flush=True)
        print(f"{name}.train_step_ms_first={1000 * rows['train_step'][1]:.3f}", flush=True)
        print(f"{name}.checkpoint_mb_last={rows['checkpoint_mb'][-1]:.4f}", flush=True)
        print(f"{name}.cpu_seconds={per_method[name]['cpu_seconds']:.1f}", flush=True)
    meta = {"command": "python benchmarks/growth.py " + " ".join(sys.argv[1:]), "commit": commit,
            "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "torch": torch.__version__, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "load_before": load_before, "load_after": load_line(), "threads": torch.get_num_threads(),
            "clock": "process CPU time", "data": args.data, "tasks": args.tasks, "steps_per_task": args.steps,
            "batch_size": args.batch_size, "backbone": args.backbone, "image_size": size, "channels": chans,
            "train_per_task": n_train, "test_per_task": n_test, "wall_seconds": time.perf_counter() - tic}
    print(f"load_before={meta['load_before']}\nload_after={meta['load_after']}")
    print(f"wall_seconds={meta['wall_seconds']:.1f}")
    if not args.no_save:
        out = Path(args.out or Path(__file__).resolve().parent / "results" / f"growth-T{args.tasks}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**meta, "methods": per_method}, indent=1) + "\n")
        print(f"results={out}")


if __name__ == "__main__":
    main()
