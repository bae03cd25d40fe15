"""What clbench costs on top of plain PyTorch, and what each method costs on top of naive LoRA (issue 11, item 1).

Measured in one process, baselines interleaved with the measured runs (the order alternates every repeat),
medians over ``--repeats``; the machine's load average is printed first because shared CPUs are noisy.

(a) ``overhead_ratio``: the clbench training loop (``clbench.run.loop.run_stream`` with the ``lora`` plugin through
    its pluggy manager: phase 4's ``train_seconds``) against a bare PyTorch loop over the same model, the same
    LoRA adapters, the same optimizer and the same uint8 batches (gather, device copy, preprocess, forward,
    cross-entropy, backward, Adam step). Target <= 1.03. ``overhead_ratio`` is the median of the per-repeat
    ratios; ``overhead_ratio_of_medians`` divides the two medians.
(b) ``eval_ratio``: ``clbench.run.loop.evaluate`` (CIL + TIL over every seen task) on a model whose LoRA branches
    are merged, against a bare loop over an unwrapped copy of the backbone with the same heads and batches.
    Target <= 1.03. ``eval_ratio_unmerged`` is the same with the branches still live (what SeqLoRA evaluates,
    since it never merges).
(c) ``step_cost/<method>``: seconds per training step of each registered method (default params) on tasks
    1.. of a stream, divided by naive LoRA's in the same repeat (median over repeats).
(d) ``hook_share/<method>``: the method's task-level bookkeeping (``TaskResult.hook_seconds``: before_task,
    after_task, merge_task: covariances, subspace updates, gradient SVDs) as a share of its training time
    over all tasks; ``spectra_share/<method>``: the runner's spectra of the task updates
    (``SpectraTracker.add_task``, logged as ``cost/spectra_seconds``) as a share of the same training time.
    Per-step hook work (loss terms, gradient projection, retraction) is inside the training time: see (c).
(e) ``dispatch_ratio``: the cost of calling a method's four step hooks (``replay_batch``, ``loss_terms``,
    ``before_optimizer_step``, ``after_optimizer_step``) once, through the run's pluggy manager and the loop's
    ``CheckedHooks`` (what the loop does), divided by the same calls through a prototype typed ``Method`` base
    (no-op defaults, the method's overrides bound once) behind one adapter that wraps errors and checks
    ``loss_terms``' result the same way. Two methods: ``lora`` (no step hook of its own) and one with a
    ``loss_terms`` term. ``dispatch_us/<path>/<method>`` is microseconds per step; ``dispatch_share/<path>`` that
    time as a share of one real training step (the bare loop of (a), same model and batch).

Timing on the CPU device defaults to one torch thread and process CPU time (``--clock cpu``): on a shared,
oversubscribed machine two OpenMP threads stall each other at random and wall time mostly measures the
neighbours; CPU time of one thread measures the work. On CUDA the clock is wall time with synchronisation.

Default setting = the quickstart's: ``vit_tiny_clbench`` at 16 px, one channel, batch 64, 1,000 training
images per task, 4 epochs (64 steps per task) for (c)/(d); (a) times ``--steps`` steps of one task.

Usage: python benchmarks/overhead.py [--backbone vit_tiny_clbench] [--image-size 16] [--batch-size 64]
       [--steps 40] [--repeats 7] [--tasks 3] [--epochs 4] [--train-per-task 1000] [--device cpu]
       [--threads 1] [--clock auto|cpu|wall] [--only a,b,c,d,e] [--methods lora,inflora,...]
Not part of the test suite: timings only, printed as ``name=value`` lines at the end.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clbench.data.streams import Stream, TaskData
from clbench.methods.registry import discover, run_manager
from clbench.model.backbones import CLModel, build_model
from clbench.model.lora import inject, merge_all
from clbench.model.spectra import SpectraTracker
from clbench.run.loop import Loop, LoopOptions, TaskResult, autocast_for, evaluate, run_stream
from clbench.suite import RuntimeConfig, TrainConfig

# -- shared building blocks (also imported by gpu_check.py) -----------------------------------------------------

now: Callable[[], float] = time.perf_counter


def use_clock(kind: str) -> None:
    """``wall`` (perf_counter) or ``cpu`` (this process's CPU time, for the loop's own timers too).

    On a shared CPU, other processes' work inflates wall time at random; CPU time counts only the work this
    process does (with one torch thread it is the step's work), so ratios of CPU times are far steadier.
    Meaningless for CUDA, where the host waits for the device."""
    global now
    now = time.process_time if kind == "cpu" else time.perf_counter  # passed to run_stream as its clock

def synthetic_stream(num_tasks: int, classes_per_task: int, train_per_task: int | list[int], test_per_task: int,
                     chans: int, size: int, seed: int = 0) -> Stream:
    """Random uint8 images with balanced labels, built directly (no Avalanche): timing needs shapes, not content.
    Images are drawn from a pool of 256 random ones, so large streams (224 px) are built at memcpy speed."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 256, (256, chans, size, size), dtype=torch.uint8, generator=g)
    sizes = train_per_task if isinstance(train_per_task, list) else [train_per_task] * num_tasks
    tasks = []
    for t in range(num_tasks):
        classes = tuple(range(t * classes_per_task, (t + 1) * classes_per_task))

        def part(n: int, first: int = classes[0]) -> tuple[torch.Tensor, torch.Tensor]:
            x = pool[torch.randint(0, len(pool), (n,), generator=g)]
            y = torch.arange(n) % classes_per_task + first
            return x, y

        (trx, trY), (tex, teY) = part(sizes[t]), part(test_per_task)
        tasks.append(TaskData(classes, trx, trY, tex, teY))
    return Stream("bench", tasks, list(range(num_tasks * classes_per_task)))


def make_cfg(batch_size: int, device: torch.device, epochs: int = 1, steps: int | None = None, **kw: Any) -> TrainConfig:
    """The protocol of a benchmark run (its runtime, ``RUNTIME``, reads the loss back never)."""
    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, optimizer="adam", max_steps_per_epoch=steps,
                       **kw)


RUNTIME = RuntimeConfig(log_every=10**9)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clbench_run(template: CLModel, stream: Stream, method: Any, cfg: TrainConfig,
                device: torch.device) -> tuple[list[TaskResult], list[float], CLModel]:
    """One run of ``method`` through the real loop on a fresh copy of ``template``; also times the runner's
    spectra step per task (as ``clbench.run.recorder`` does after each task)."""
    model = copy.deepcopy(template)
    results: list[TaskResult] = []
    spectra, spectra_s = SpectraTracker(), []
    captured: dict[str, CLModel] = {}

    def on_task(res: TaskResult, state, trained: CLModel) -> None:
        results.append(res)
        captured["model"] = trained
        if res.updates:
            tic = now()
            spectra.add_task(res.updates)
            spectra_s.append(now() - tic)

    pm = run_manager(method)
    run_stream(model, stream, pm, cfg, 0,
               LoopOptions(device=device, on_task=on_task, clock=now, runtime=RUNTIME))
    return results, spectra_s, captured.get("model", model)


def bare_train(model: CLModel, x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int,
               device: torch.device, autocast: Callable[[], Any], seed: int = 0) -> tuple[float, int]:
    """The plainest loop over the same model and batches: what the clbench loop is compared with.
    Adapters must already be on ``model``; trains its trainable parameters plus a new head."""
    model.to(device)
    head = model.add_head(int(y.max()) + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=gen)
    pin = device.type == "cuda"
    n = 0
    sync(device)
    tic = now()
    for b in range(steps):
        sel = idx[b * batch_size:(b + 1) * batch_size]
        xb, yb = x[sel], y[sel]
        if pin:
            xb, yb = xb.pin_memory(), yb.pin_memory()
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        with torch.no_grad():
            xb = model.preprocess(xb)
        with autocast():
            logits = head(model.backbone(xb))
        loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(yb)
    loss.item()  # the clbench loop reads the mean loss back once at the end of a task, so does this one
    sync(device)
    return now() - tic, n


@torch.inference_mode()
def bare_eval(backbone: torch.nn.Module, heads: torch.nn.ModuleList, preprocess: Callable, stream: Stream,
              batch_size: int, device: torch.device, autocast: Callable[[], Any]) -> tuple[float, int]:
    """Evaluation over every task's test set with a plain backbone: forward, concatenated heads, CIL and TIL
    hit counts (the same arithmetic as ``clbench.run.loop.evaluate``, without the harness)."""
    backbone.eval()
    pin = device.type == "cuda"
    offsets = np.cumsum([0] + [len(t.classes) for t in stream.tasks])
    n = 0
    sync(device)
    tic = now()
    for j, task in enumerate(stream.tasks):
        lo, hi = int(offsets[j]), int(offsets[j + 1])
        correct = torch.zeros(2, dtype=torch.long, device=device)
        for start in range(0, len(task.test_y), batch_size):
            xb, yb = task.test_x[start:start + batch_size], task.test_y[start:start + batch_size]
            if pin:
                xb, yb = xb.pin_memory(), yb.pin_memory()
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            xb = preprocess(xb)
            with autocast():
                f = backbone(xb)
                logits = torch.cat([h(f) for h in heads], -1)
            correct[0] += (logits.argmax(1) == yb).sum()
            correct[1] += (logits[:, lo:hi].argmax(1) + lo == yb).sum()
            n += len(yb)
        correct.cpu()
    return now() - tic, n


def load_line() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f},{five:.2f},{fifteen:.2f}"
    except OSError:
        return "n/a"


def method_classes(names: list[str] | None) -> dict[str, type]:
    reg = discover()
    chosen = names or sorted(reg.methods)
    return {n: reg.get(n).cls for n in chosen}


# -- (a) training loop overhead ----------------------------------------------------------------------------------

def measure_overhead(template: CLModel, args, device: torch.device) -> dict[str, float]:
    lora = method_classes(["lora"])["lora"]
    bs, steps = args.batch_size, args.steps
    stream = synthetic_stream(1, 2, bs * steps, 2, template.in_chans, args.image_size)
    task = stream.tasks[0]
    cfg = make_cfg(bs, device, steps=steps)
    autocast = autocast_for(device, cfg.precision)

    def run_clbench() -> float:
        results, _, _ = clbench_run(template, stream, lora(), cfg, device)
        return results[0].train_seconds / results[0].images

    def run_bare() -> float:
        model = copy.deepcopy(template)
        lora().configure_model(model=model, ctx=None)  # the same adapters the plugin builds (q, v; rank 10)
        secs, n = bare_train(model, task.train_x, task.train_y, bs, steps, device, autocast)
        return secs / n

    run_clbench(), run_bare()  # warm-up (allocator, thread pools, cudnn/cuBLAS heuristics)
    cl, bare = [], []
    for r in range(args.repeats):
        pair = (run_bare, run_clbench) if r % 2 == 0 else (run_clbench, run_bare)
        out = {f: f() for f in pair}
        bare.append(out[run_bare])
        cl.append(out[run_clbench])
    ratios = [c / b for c, b in zip(cl, bare)]
    return {"overhead_ratio": statistics.median(ratios),
            "overhead_ratio_of_medians": statistics.median(cl) / statistics.median(bare),
            "overhead_ratio_min": min(ratios), "overhead_ratio_max": max(ratios),
            "train_img_per_s_clbench": 1 / statistics.median(cl), "train_img_per_s_bare": 1 / statistics.median(bare)}


# -- (e) per-step hook dispatch: per-run pluggy manager vs a typed Method base behind one adapter ----------------

STEP_HOOKS = ("replay_batch", "loss_terms", "before_optimizer_step", "after_optimizer_step")


class TypedMethod:
    """The prototype typed base: every step hook a no-op method a subclass overrides (no pluggy)."""

    def replay_batch(self, model, batch, ctx, rows):
        return None

    def loss_terms(self, model, ctx, step):
        return None

    def before_optimizer_step(self, model, ctx, rows):
        return None

    def after_optimizer_step(self, model, ctx, rows):
        return None


class TypedAdapter:
    """The one adapter the loop would call: binds the method's step hooks once, turns an exception into one line
    naming the method and the hook, and checks ``loss_terms``' result as ``CheckedHooks`` does (a list, as
    pluggy returns it)."""

    def __init__(self, method: TypedMethod) -> None:
        from clbench.methods.hookcheck import _check_terms

        self.name, self._check = type(method).__name__, _check_terms
        self._hooks = {h: getattr(method, h) for h in STEP_HOOKS}

    def _call(self, hook: str, **kwargs: Any) -> Any:
        try:
            return self._hooks[hook](**kwargs)
        except Exception as exc:  # noqa: BLE001 - as CheckedHooks: any plugin error is one line
            raise RuntimeError(f"method '{self.name}': hook {hook} raised {type(exc).__name__}: {exc}") from None

    def replay_batch(self, **kwargs: Any) -> list[Any]:
        out = self._call("replay_batch", **kwargs)
        return [] if out is None else [out]

    def loss_terms(self, **kwargs: Any) -> list[Any]:
        out = self._call("loss_terms", **kwargs)
        problem = self._check(out)
        if problem:
            raise RuntimeError(f"method '{self.name}': hook loss_terms {problem}")
        return [] if out is None else [out]

    def before_optimizer_step(self, **kwargs: Any) -> None:
        self._call("before_optimizer_step", **kwargs)

    def after_optimizer_step(self, **kwargs: Any) -> None:
        self._call("after_optimizer_step", **kwargs)


def _step_hook_methods() -> dict[str, tuple[Any, TypedMethod]]:
    """(plugin instance for the pluggy path, typed instance) per measured method."""
    from clbench_plugins.lora import NaiveLoRA

    from clbench import StepBatch, hookimpl

    weight = torch.tensor(0.5)

    class OneTerm(NaiveLoRA):
        name = "one_term"

        @hookimpl
        def loss_terms(self, model, ctx, step: StepBatch):
            return {"l2": weight}

    class TypedOneTerm(TypedMethod):
        def loss_terms(self, model, ctx, step):
            return {"l2": weight}

    return {"lora": (NaiveLoRA(), TypedMethod()), "one_term": (OneTerm(), TypedOneTerm())}


def _dispatch_seconds(hooks: Any, calls: int) -> float:
    from clbench import StepBatch

    batch = (torch.zeros(8, 1, 16, 16, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    logits, rows = torch.zeros(8, 2), torch.zeros(8, 2, dtype=torch.long)
    tic = now()
    for _ in range(calls):
        hooks.replay_batch(model=None, batch=batch, rows=rows, ctx=None)
        step = StepBatch(batch=batch, logits=logits, replayed=None, aux={}, rows=rows)
        for _terms in hooks.loss_terms(model=None, ctx=None, step=step):
            pass
        hooks.before_optimizer_step(model=None, ctx=None, rows=rows)
        hooks.after_optimizer_step(model=None, ctx=None, rows=rows)
    return (now() - tic) / calls


def measure_dispatch(template: CLModel, args, device: torch.device) -> dict[str, float]:
    from clbench.methods.hookcheck import checked_hooks

    calls, out = 20_000, {}
    for name, (plugin, typed) in _step_hook_methods().items():
        pluggy_path, typed_path = checked_hooks(run_manager(plugin)), TypedAdapter(typed)
        _dispatch_seconds(pluggy_path, 1000), _dispatch_seconds(typed_path, 1000)  # warm-up
        per: dict[str, list[float]] = {"pluggy": [], "typed": []}
        for r in range(args.repeats):
            order = (("pluggy", pluggy_path), ("typed", typed_path))
            for path, hooks in order if r % 2 == 0 else order[::-1]:
                per[path].append(_dispatch_seconds(hooks, calls))
        for path, times in per.items():
            out[f"dispatch_us/{path}/{name}"] = 1e6 * statistics.median(times)
        out[f"dispatch_ratio/{name}"] = statistics.median([p / t for p, t in zip(per["pluggy"], per["typed"])])
    bs, steps = args.batch_size, max(args.steps, 10)
    task = synthetic_stream(1, 2, bs * steps, 2, template.in_chans, args.image_size).tasks[0]
    model = copy.deepcopy(template)
    method_classes(["lora"])["lora"]().configure_model(model=model, ctx=None)
    autocast = autocast_for(device, make_cfg(bs, device).precision)
    bare_train(copy.deepcopy(model), task.train_x, task.train_y, bs, 2, device, autocast)  # warm-up
    secs, _ = bare_train(model, task.train_x, task.train_y, bs, steps, device, autocast)
    out["step_us_bare"] = 1e6 * secs / steps
    for path in ("pluggy", "typed"):
        out[f"dispatch_share/{path}"] = out[f"dispatch_us/{path}/one_term"] / out["step_us_bare"]
    return out


# -- (b) evaluation overhead -------------------------------------------------------------------------------------

def measure_eval(template: CLModel, args, device: torch.device) -> dict[str, float]:
    T = args.tasks
    stream = synthetic_stream(T, 2, 2, args.test_per_task, template.in_chans, args.image_size)
    cfg = make_cfg(args.batch_size, device)
    autocast = autocast_for(device, cfg.precision)
    runtime = RuntimeConfig(eval_batch_size=args.eval_batch_size)
    bare = copy.deepcopy(template).to(device)  # never wrapped: the plain timm backbone
    for t in stream.tasks:
        bare.add_head(len(t.classes))
    live = copy.deepcopy(bare)
    sites = inject(live.backbone, ["q", "v"])
    for s in sites.values():
        b = s.add_branch(10)
        torch.nn.init.normal_(b.B, std=0.01)
    merged = copy.deepcopy(live)
    merge_all(merged.backbone)
    n_imgs = sum(len(t.test_y) for t in stream.tasks)

    def run_cl(model: CLModel) -> Callable[[], float]:
        def f() -> float:
            sync(device)
            tic = now()
            evaluate(Loop(model, stream, cfg, 0, LoopOptions(device=device, runtime=runtime)), T - 1)
            sync(device)
            return (now() - tic) / n_imgs
        return f

    def run_bare() -> float:
        secs, n = bare_eval(bare.backbone, bare.heads, bare.preprocess, stream, args.eval_batch_size, device, autocast)
        return secs / n

    fns = {"bare": run_bare, "merged": run_cl(merged), "live": run_cl(live)}
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for k in order:
            times[k].append(fns[k]())
    med = {k: statistics.median(v) for k, v in times.items()}
    per = lambda k: statistics.median([a / b for a, b in zip(times[k], times["bare"])])  # noqa: E731
    return {"eval_ratio": per("merged"), "eval_ratio_of_medians": med["merged"] / med["bare"],
            "eval_ratio_unmerged": per("live"), "eval_img_per_s_bare": 1 / med["bare"],
            "eval_img_per_s_merged": 1 / med["merged"]}


# -- (c) and (d): every method through the real loop -------------------------------------------------------------

def measure_methods(template: CLModel, args, device: torch.device) -> dict[str, float]:
    classes = method_classes(args.methods)
    if "lora" not in classes:
        classes = {"lora": method_classes(["lora"])["lora"], **classes}
    stream = synthetic_stream(args.tasks, 2, args.train_per_task, args.test_per_task, template.in_chans,
                              args.image_size)
    cfg = make_cfg(args.batch_size, device, epochs=args.epochs)
    step_s: dict[str, list[float]] = {k: [] for k in classes}
    hook_sh: dict[str, list[float]] = {k: [] for k in classes}
    spec_sh: dict[str, list[float]] = {k: [] for k in classes}
    by_hook: dict[str, dict[str, list[float]]] = {k: {} for k in classes}
    errors: dict[str, str] = {}
    steps_per_task = -(-args.train_per_task // args.batch_size) * args.epochs
    for r in range(args.methods_repeats):
        order = list(classes) if r % 2 == 0 else list(reversed(classes))
        for name in order:
            if name in errors:
                continue
            try:
                results, spectra_s, _ = clbench_run(template, stream, classes[name](), cfg, device)
            except Exception as exc:  # noqa: BLE001 - one failing plugin must not hide the others' figures
                errors[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
                continue
            later = results[1:] or results
            step_s[name].append(sum(x.train_seconds for x in later) / (len(later) * steps_per_task))
            train = sum(x.train_seconds for x in results)
            hook_sh[name].append(sum(sum(x.hook_seconds.values()) for x in results) / train)
            spec_sh[name].append(sum(spectra_s) / train)
            for x in results:
                for k, v in x.hook_seconds.items():
                    by_hook[name].setdefault(k, []).append(v / train)
    out: dict[str, float] = {}
    base = step_s["lora"]
    for name in classes:
        if name in errors:
            print(f"# {name} failed: {errors[name]}")
            continue
        rel = [s / b for s, b in zip(step_s[name], base)]
        out[f"step_cost/{name}"] = statistics.median(rel)
        out[f"step_ms/{name}"] = 1000 * statistics.median(step_s[name])
        out[f"hook_share/{name}"] = statistics.median(hook_sh[name])
        out[f"spectra_share/{name}"] = statistics.median(spec_sh[name])
        for k, v in sorted(by_hook[name].items()):  # summed over tasks: divide the per-task shares' sum by repeats
            out[f"hook_share/{name}/{k}"] = sum(v) / len(step_s[name])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vit_tiny_clbench")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40, help="(a): training steps per timed run")
    ap.add_argument("--repeats", type=int, default=7, help="(a), (b): interleaved repeats")
    ap.add_argument("--tasks", type=int, default=3, help="(b), (c), (d): tasks in the stream")
    ap.add_argument("--epochs", type=int, default=4, help="(c), (d)")
    ap.add_argument("--train-per-task", type=int, default=1000, help="(c), (d)")
    ap.add_argument("--test-per-task", type=int, default=400)
    ap.add_argument("--methods-repeats", type=int, default=3, help="(c), (d): interleaved repeats")
    ap.add_argument("--methods", default=None, help="comma list (default: every registered method)")
    ap.add_argument("--only", default="a,b,c,d")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default on CPU: 1, see --clock)")
    ap.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                    help="auto: process CPU time on the CPU device, wall time on CUDA")
    args = ap.parse_args()
    args.methods = args.methods.split(",") if args.methods else None
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(0)
    template = build_model(args.backbone, args.image_size, pretrained=False, checkpoint=None)
    parts = set(args.only.split(","))
    load_before = load_line()
    use_clock(args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" else "wall"))
    tic = time.perf_counter()
    out: dict[str, Any] = {}
    if "a" in parts:
        out.update(measure_overhead(template, args, device))
    if "b" in parts:
        out.update(measure_eval(template, args, device))
    if "c" in parts or "d" in parts:
        out.update(measure_methods(template, args, device))
    if "e" in parts:
        out.update(measure_dispatch(template, args, device))
    out.update({"backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
                "device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "loadavg_before": load_before, "loadavg_after": load_line(),
                "clock": "cpu" if now is time.process_time else "wall",
                "bench_seconds": time.perf_counter() - tic})
    for k, v in out.items():
        print(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}")


if __name__ == "__main__":
    main()
