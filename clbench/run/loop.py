"""The common training loop: one file, read top to bottom, every hook call visible.

Protocol (README.md, docs/ARCHITECTURE.md section 2): class-incremental stream, one linear head per task, cross-entropy on the
current task's logits only, no rehearsal; after every task the model is evaluated on every seen task, both
class-incremental (argmax over all seen classes) and task-incremental (argmax within the true task's head).

Read ``run_stream`` first: it is the outline (configure, restore, then per task: head, ``before_task``,
optimizer, ``train_task``, ``after_task``/``merge_task``, ``evaluate``, report). Every hook call is in this file.

The loop owns all state that is not a method's own: the optimizer, step counters, the accuracy matrices.
It reports each finished task to one callback, ``on_task(result, state, model)`` (the runner's
``clbench.run.recorder.RunRecorder`` checkpoints and logs it); hooks never see the tracker. It reads as
single-process code: what differs under torchrun (sharded batches, gradient all-reduce, summed evaluation
counts, rank 0's state and weights) goes through the ``comm`` object (``clbench.run.distributed``), a no-op by
default. Timers read ``clock`` (``time.perf_counter`` unless a benchmark passes another).

On CUDA it runs bf16 autocast, pinned host memory and non-blocking copies, and in one process reads the loss
back only every ``log_every`` steps (under torchrun the gradient all-reduce synchronises every step).
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from clbench.analysis.metrics import accuracy_after, empty_matrix
from clbench.data.batching import Draw, batches
from clbench.data.streams import Stream
from clbench.errors import ClbenchError
from clbench.methods import rehearsal
from clbench.methods.context import TaskContext
from clbench.methods.hookcheck import CheckedHooks, checked_hooks
from clbench.methods.hookspecs import StepBatch
from clbench.model.backbones import CLModel
from clbench.run.checkpoint import rng_state, set_rng_state
from clbench.run.distributed import SINGLE_PROCESS, Communicator
from clbench.run.progress import TaskDone
from clbench.suite import RuntimeConfig, TrainConfig


@dataclass(kw_only=True)
class TaskResult:
    """What the loop reports after each task (the recorder turns it into MLflow metrics); built by keyword."""

    task: int
    R: np.ndarray  # CIL accuracy matrix so far (rows 0..task filled)
    R_til: np.ndarray
    sizes: np.ndarray  # test-set size of every task
    train_seconds: float
    eval_seconds: float
    images: int
    loss: float | None  # None: the task took no gradient step (takes_gradient_steps)
    loss_terms: dict[str, float]
    updates: dict[str, Any] | None  # task_updates' result (layer -> LowRank)
    trainable_params: int = 0
    hook_seconds: dict[str, float] = field(default_factory=dict)  # the method's task-level hooks (method_seconds)
    buffer_images: int | None = None  # replay_buffer's size (rehearsal methods)
    epoch_lrs: list[float] = field(default_factory=list)  # the adapter group's lr in each epoch (train/lr)


@dataclass
class LoopState:
    """Everything needed to continue a run after task ``next_task - 1`` (for checkpoints).

    After each task the loop fills ``method_state`` (the method's ``method_state`` hook). To resume, pass a
    state with ``next_task > 0`` and ``model_state`` (the model's state dict after that task): the loop calls
    ``configure_model``, rebuilds the finished tasks' heads, calls ``load_method_state`` (which rebuilds the
    method's adapter structure) and loads ``model_state`` strictly, then continues at ``next_task``.
    """

    next_task: int = 0
    R: np.ndarray | None = None
    R_til: np.ndarray | None = None
    method_state: dict[str, Any] | None = None
    model_state: dict[str, Any] | None = None  # only on resume; dropped once loaded
    rng: dict[str, Any] | None = None  # only on resume: RNG states at the checkpoint


def checkpoint_payload(state: LoopState, model: CLModel) -> dict[str, Any]:
    """The loop's part of a checkpoint after a finished task: what :func:`resume_state` turns back into a state
    that continues the run bit-exactly (the runner adds its own bookkeeping; the contract check uses this too)."""
    return {"next_task": state.next_task, "R": torch.from_numpy(state.R.copy()),
            "R_til": torch.from_numpy(state.R_til.copy()),
            # torch.compile wraps the backbone; checkpoints keep the plain names
            "model": {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()},
            "method": state.method_state, "rng": rng_state()}


def resume_state(ck: dict[str, Any]) -> LoopState:
    """The state that continues a run from a loaded checkpoint (see :func:`checkpoint_payload`)."""
    return LoopState(next_task=int(ck["next_task"]), R=ck["R"].numpy(), R_til=ck["R_til"].numpy(),
                     method_state=ck["method"], model_state=ck["model"], rng=ck["rng"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolved_precision(precision: str, device: torch.device) -> str:
    """What ``precision: auto`` means on ``device`` (bf16 autocast on CUDA, fp32 elsewhere)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str) -> Callable[[], Any]:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The suite's optimizer at ``train.lr``; a group carrying its own ``lr`` (the head under ``head_lr``) keeps it."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


OnTask = Callable[[TaskResult, LoopState, CLModel], None]


def _ignore(*args: Any) -> None:
    return None


def forward_with_aux(model: CLModel, x: torch.Tensor, head: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Head ``head``'s logits and the ``aux`` values of ``features`` (``{}`` for a model that overrides
    ``forward`` itself, as CL-LoRA's does)."""
    if type(model).forward is CLModel.forward:
        return model(x, head=head, with_aux=True)
    return model(x, head=head), {}


def check_replacement(model: CLModel, replaced: Any) -> None:
    """``configure_model``'s replacement must be a CLModel around the very backbone object it was given: the
    frozen-weight check and the spectra follow that object's parameters, so a copy would escape them."""
    if not isinstance(replaced, CLModel):
        raise ClbenchError(f"configure_model returned a {type(replaced).__name__}; a replacement model must be a "
                           "clbench.model.backbones.CLModel subclass (override features(x) to change the forward)")
    if replaced.backbone is not model.backbone:
        raise ClbenchError("configure_model returned a model around a different backbone object; a replacement "
                           "must wrap the same backbone (model.backbone), not a copy")


@dataclass(frozen=True, kw_only=True)
class LoopOptions:
    """How ``run_stream`` runs, not what it trains: on which ``device`` (the CPU unless given), ``on_task(result,
    state, model)`` after every task, ``progress`` lines, the ``state`` to resume from, the ``comm`` of a torchrun
    process group, the ``clock`` of the timers and the ``runtime`` settings (log interval, compile, evaluation
    batch). Built by keyword; frozen."""

    device: torch.device = torch.device("cpu")
    on_task: OnTask = _ignore
    progress: Callable[[str], None] = _ignore
    state: LoopState | None = None
    comm: Communicator = SINGLE_PROCESS
    clock: Callable[[], float] = time.perf_counter
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@dataclass
class Loop:
    """One run's training as every phase sees it, built once by ``run_stream``: the model (a replacement from
    ``configure_model`` once configured), the stream, the method's checked hook caller, the protocol, the seed
    and the options; the device (``opts.device``), the class offsets of the tasks (task j's logits start at
    ``offsets[j]``), the test-set sizes and the autocast are derived once."""

    model: CLModel
    stream: Stream
    cfg: TrainConfig
    seed: int
    opts: LoopOptions = field(default_factory=LoopOptions)
    hook: CheckedHooks | None = None
    device: torch.device = field(init=False)
    offsets: np.ndarray = field(init=False)
    sizes: np.ndarray = field(init=False)
    autocast: Callable[[], Any] = field(init=False)

    def __post_init__(self) -> None:
        self.device = self.opts.device
        self.offsets = np.cumsum([0] + [len(s.classes) for s in self.stream.tasks])
        self.sizes = np.array([len(t.test_y) for t in self.stream.tasks])
        self.autocast = autocast_for(self.device, self.cfg.precision)


def run_stream(model: CLModel, stream: Stream, pm, cfg: TrainConfig, seed: int,
               opts: LoopOptions | None = None) -> LoopState:
    """Train ``model`` through ``stream`` with the method registered in ``pm``; return the final state.

    ``cfg`` is the protocol; ``opts`` (:class:`LoopOptions`; default: on the CPU, no callbacks, a fresh run, one
    process) is how it runs here. After every task, ``opts.on_task(result, state, model)``: the task's figures,
    the state to checkpoint (everything needed to continue at ``state.next_task``) and the trained model."""
    opts = opts or LoopOptions()
    # the method's hooks, checked: a hook's failure names the method and the hook (clbench.methods.hookcheck)
    loop = Loop(model, stream, cfg, seed, opts, checked_hooks(pm))
    state = opts.comm.broadcast(opts.state or LoopState())  # every rank starts from rank 0's state (a resumed run)
    if state.R is None:
        state.R, state.R_til = empty_matrix(len(stream.tasks)), empty_matrix(len(stream.tasks))
    configure(loop, state)
    for t in range(state.next_task, len(stream.tasks)):
        run_task(loop, state, t)
    return state


def configure(loop: Loop, state: LoopState) -> None:
    """Phase 0: the method configures the model once (adapters, freezing); a resumed run is restored."""
    torch.manual_seed(loop.seed)
    # Outside the step loop every hook sees the model in eval mode (CONTRIBUTING: the hook author's guide)
    loop.model.eval()
    replaced = loop.hook.configure_model(model=loop.model, ctx=task_context(loop, 0))
    if replaced is not None:
        check_replacement(loop.model, replaced)
        loop.model = replaced
    loop.model.to(loop.device).eval()  # a replacement's new modules are built in train mode
    loop.hook.freeze_backbone(loop.opts.progress)  # unless it declares trains_backbone, never the backbone
    if state.next_task > 0 and state.model_state is not None:
        restore(loop, state, task_context(loop, state.next_task - 1))
    if loop.opts.runtime.compile and loop.device.type == "cuda":
        loop.model.backbone = torch.compile(loop.model.backbone)


def run_task(loop: Loop, state: LoopState, t: int) -> None:
    """Task ``t``, phase by phase, then its report to ``on_task``."""
    model, hook, clock = loop.model, loop.hook, loop.opts.clock
    # -- phase 1: the new task's head (old heads frozen); seeded so resumed runs match --------------------
    seed_task(loop.seed, t)
    head = new_head(model, loop.stream, t, loop.cfg.head_init)
    model.eval()  # the task's prologue hooks: eval mode on every task (the new head too)
    ctx = task_context(loop, t)
    # -- phase 1b (rehearsal): the method may replace the task's training set ------------------------------
    train_set = rehearsal.as_list(hook.training_set(ctx=ctx), "training_set") or None
    if train_set is not None:
        ctx = task_context(loop, t, sum(len(s) for s in train_set))
    # -- phase 2: the method prepares the task (projections, new adapters) -------------------------------
    timings: dict[str, float] = {}  # the method's task-level hooks: its cost/method_seconds
    timed(timings, "before_task", clock, hook.before_task, model=model, ctx=ctx)
    if takes_gradient_steps(hook.instance, ctx):
        # -- phases 3-4: the optimizer over the method's groups plus the current head; train ---------------
        optimizer, scheduler = make_task_optimizer(model, head, hook.param_groups(model=model, ctx=ctx), loop.cfg,
                                                   ctx)
        trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        trained = train_task(loop, ctx, optimizer, scheduler, train_set)
    else:  # a method without gradient steps (closed form): no optimizer, no step; its hooks set the heads
        head.requires_grad_(False)
        trainable, trained = 0, Trained(loss=None, loss_terms={}, images=0, seconds=0.0)
    # -- phase 5: the method closes the task: memories, merging, the task's update -------------------------
    model.eval()
    timed(timings, "after_task", clock, hook.after_task, model=model, ctx=ctx)
    timed(timings, "merge_task", clock, hook.merge_task, model=model, ctx=ctx)
    loop.opts.comm.sync_model(model)  # rank 0's weights on every rank: no drift across tasks
    updates = timed(timings, "task_updates", clock, hook.task_updates, model=model, ctx=ctx)
    kept = timed(timings, "task_updates", clock, hook.replay_buffer, ctx=ctx)  # counted together
    buffer_images = None if kept is None else sum(len(s) for s in rehearsal.as_list(kept, "replay_buffer"))
    # -- phase 6: evaluate every seen task (CIL and TIL), then report --------------------------------------
    tic = clock()
    cil, til = evaluate(loop, t)
    eval_seconds = clock() - tic
    state.R[t, : t + 1], state.R_til[t, : t + 1] = cil, til
    state.next_task = t + 1
    state.method_state = timed(timings, "method_state", clock, hook.method_state, ctx=ctx)
    acc, acc_til = accuracy_after(state.R, t, loop.sizes), accuracy_after(state.R_til, t, loop.sizes)
    loop.opts.progress(TaskDone(task=t, num_tasks=len(loop.stream.tasks), acc=acc, acc_til=acc_til,
                                train_seconds=trained.seconds, method_seconds=sum(timings.values())))
    loop.opts.on_task(TaskResult(task=t, R=state.R.copy(), R_til=state.R_til.copy(), sizes=loop.sizes,
                                 train_seconds=trained.seconds, eval_seconds=eval_seconds, images=trained.images,
                                 loss=trained.loss, loss_terms=trained.loss_terms, updates=updates,
                                 trainable_params=trainable, hook_seconds=timings, buffer_images=buffer_images,
                                 epoch_lrs=trained.epoch_lrs),
                      state, model)


Purpose = Literal["global", "shuffle", "replay", "pass"]


def task_seed(seed: int, task: int, purpose: Purpose, draw: int = 0) -> int:
    """The one table of the loop's seeds for task ``task`` of a run seeded ``seed``: ``global`` (torch, numpy
    and random at the task's start, what a method draws from), ``shuffle`` (the task's batch order and
    augmentation), ``replay`` (rehearsal's added rows' augmentation), ``pass`` (the ``draw``-th augmented pass of
    a hook's ``ctx.loader``). Distinct purposes never share a seed's stream; a resumed run draws the same."""
    base = seed * 1_000_003 + task
    return {"global": seed * 100_003 + task, "shuffle": base, "replay": base + 500_009,
            "pass": base * 31 + draw}[purpose]


def task_rng(seed: int, task: int, purpose: Purpose, draw: int = 0) -> torch.Generator:
    """A generator of its own for ``purpose`` in task ``task`` (see :func:`task_seed`)."""
    return torch.Generator().manual_seed(task_seed(seed, task, purpose, draw))


def timed(timings: dict[str, float], name: str, clock: Callable[[], float], hook: Callable[..., Any],
          **kwargs: Any) -> Any:
    """``hook(**kwargs)``, its seconds added to ``timings[name]`` (``cost/hook_seconds/NAME``)."""
    tic = clock()
    out = hook(**kwargs)
    timings[name] = timings.get(name, 0.0) + clock() - tic
    return out


def takes_gradient_steps(method: Any, ctx: TaskContext) -> bool:
    """Whether task ``ctx.task`` trains by gradient steps: the method's ``gradient_training`` (True when absent;
    a bool, or a callable ``(ctx) -> bool`` deciding per task, e.g. only the first task). False: no optimizer, no
    step loop, no ``param_groups``/step hooks, no head training and no loss logged (``train.epochs`` does not
    apply); the method sets its classifier in ``before_task``/``after_task`` (closed-form methods, prototypes)."""
    flag = getattr(method, "gradient_training", True)
    return bool(flag(ctx) if callable(flag) else flag)


def seed_task(seed: int, t: int) -> None:
    """Seed every global generator a method may draw from at the start of task ``t`` (so a resumed run matches)."""
    s = task_seed(seed, t, "global")
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def task_context(loop: Loop, t: int, train_size: int | None = None) -> TaskContext:
    """The facts handed to every hook of task ``t``; its loader yields the task's data with local labels.
    ``train_size``: the size of a training set that replaces the task's own (rehearsal), for the step count."""
    stream, cfg, seed, device, model = loop.stream, loop.cfg, loop.seed, loop.device, loop.model
    task = stream.tasks[t]
    rounding = math.floor if cfg.drop_last else math.ceil
    steps = rounding((train_size or len(task.train_y)) / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    local_y = task.train_y - int(loop.offsets[t])

    passes = [0]  # augmented passes so far: each draws its own crops (the official loader re-draws each epoch)

    def loader(batch_size: int | None = None, fraction: float = 1.0, shuffle: bool = False,
               generator: torch.Generator | None = None, augmented: bool = False):
        if augmented and stream.augment is not None and generator is None:  # own draws, not the training ones
            passes[0] += 1
            generator = task_rng(seed, t, "pass", passes[0])
        draw = Draw(shuffle=shuffle, generator=generator, fraction=fraction,
                    augment=stream.augment if augmented else None)
        return batches(task.train_x, local_y, batch_size or cfg.batch_size, device, model, draw)

    def samples_of(j: int) -> rehearsal.Samples:
        rows = stream.tasks[j]
        return rehearsal.Samples(rows.train_x, rows.train_y, index=rehearsal.stream_rows(j, len(rows.train_y)))

    return TaskContext(task=t, num_tasks=len(stream.tasks), classes=task.classes,
                       seen_classes=tuple(range(int(loop.offsets[t + 1]))), device=device, seed=seed,
                       loader=loader, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                       steps_per_epoch=steps, autocast=loop.autocast, samples_of=samples_of)


def restore(loop: Loop, state: LoopState, ctx: TaskContext) -> None:
    """Resume: rebuild the finished tasks' heads, let the method rebuild its structure (``load_method_state``),
    load the checkpoint's weights strictly and its RNG states; ``ctx`` is the last finished task's."""
    model, stream = loop.model, loop.stream
    while len(model.heads) < state.next_task:
        model.add_task_head(stream.tasks[len(model.heads)])
    model.eval()
    loop.hook.load_method_state(model=model, state=state.method_state or {}, ctx=ctx)
    try:
        model.load_state_dict(state.model_state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__
        raise ClbenchError(f"checkpoint: the saved model does not match the model rebuilt for task "
                           f"{state.next_task} ({detail[:200]}); the method's load_method_state must rebuild "
                           "its adapters; or run again with --restart") from None
    state.model_state = None
    set_rng_state(state.rng)
    state.rng = None


def new_head(model: CLModel, stream: Stream, t: int, init: str = "torch") -> torch.nn.Module:
    """Task ``t``'s head, trainable; every earlier head frozen. ``init`` (``train.head_init``): ``torch`` keeps
    nn.Linear's default; ``kaiming_zero`` is PILOT's SimpleLinear (Kaiming-uniform weight, zero bias)."""
    for h in model.heads:
        h.requires_grad_(False)
    while len(model.heads) <= t:
        added = model.add_task_head(stream.tasks[len(model.heads)])
        if init == "kaiming_zero":
            init_head_kaiming_zero(added)
    head = model.heads[t]
    head.requires_grad_(True)
    return head


def init_head_kaiming_zero(head: torch.nn.Linear) -> None:
    """PILOT's ``SimpleLinear.reset_parameters``: ``kaiming_uniform_(weight, nonlinearity='linear')``, bias 0."""
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(head.weight, nonlinearity="linear")
        torch.nn.init.zeros_(head.bias)


def make_task_optimizer(model: CLModel, head: torch.nn.Module, groups: list[dict] | None, cfg: TrainConfig,
                        ctx: TaskContext) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer over the method's parameter groups (by default every trainable non-head parameter) plus
    the current head, and the learning-rate schedule (None when constant)."""
    if groups is None:
        head_ids = {id(p) for h in model.heads for p in h.parameters()}
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": params, "name": "adapters"}] if params else []
    head_group: dict[str, Any] = {"params": list(head.parameters()), "name": "head"}
    if cfg.head_lr is not None:
        head_group["lr"] = cfg.head_lr
    optimizer = make_optimizer(cfg, [*groups, head_group])
    return optimizer, make_scheduler(optimizer, cfg, ctx.steps_per_epoch)


def inflora_cosine_factor(epoch: int, epochs: int) -> float:
    """The ``CosineSchedule`` of InfLoRA (``utils/schedulers.py``) and CODA-Prompt (the same file), stepped once
    per epoch as their trainers do, lag included: its constructor calls ``step()`` once (lr * f(0)) and then resets
    ``last_epoch`` to -1, so the first per-epoch step applies f(0) again. Epoch e (0-based) of K trains at
    ``[1, 1, f(1), ..., f(K - 2)][e]`` with ``f(e) = cos(99 pi e / (200 (K - 1)))``; K = 5: [1, 1, .925, .713,
    .394]. One epoch: 1 (the official K = 1 divides by zero)."""
    if epochs <= 1:
        return 1.0
    return math.cos(99 * math.pi * max(epoch - 1, 0) / (200 * (epochs - 1)))


def multistep_factor(epoch: int, milestones: list[int], gamma: float) -> float:
    """``MultiStepLR`` stepped per epoch: ``gamma`` to the number of milestones reached by ``epoch``."""
    return gamma ** sum(1 for m in milestones if epoch >= m)


@dataclass
class Schedule:
    """The learning-rate schedule of one task: ``step()`` after every optimizer step, ``epoch_end()`` after every
    epoch; every group's lr is its initial lr times the factor (head and adapters alike, as the official
    schedulers do)."""

    optimizer: torch.optim.Optimizer
    kind: str
    epochs: int
    total_steps: int
    milestones: list[int]
    gamma: float
    steps: int = 0
    epoch: int = 0

    def __post_init__(self) -> None:
        self.base = [g["lr"] for g in self.optimizer.param_groups]
        self._apply()

    def factor(self) -> float:
        if self.kind == "cosine":  # per step, half cosine to 0 (CosineAnnealingLR's closed form)
            return 0.5 * (1 + math.cos(math.pi * min(self.steps, self.total_steps) / self.total_steps))
        if self.kind == "inflora_cosine":
            return inflora_cosine_factor(self.epoch, self.epochs)
        if self.kind == "cosine_epoch":  # CosineAnnealingLR(T_max=epochs, eta_min=0) stepped after every epoch
            return 0.5 * (1 + math.cos(math.pi * self.epoch / self.epochs))
        if self.kind == "multistep":
            return multistep_factor(self.epoch, self.milestones, self.gamma)
        return 1.0

    def _apply(self) -> None:
        f = self.factor()
        for g, base in zip(self.optimizer.param_groups, self.base, strict=True):
            g["lr"] = base * f

    def step(self) -> None:
        self.steps += 1
        if self.kind == "cosine":
            self._apply()

    def epoch_end(self) -> None:
        self.epoch += 1
        if self.kind in ("inflora_cosine", "cosine_epoch", "multistep"):
            self._apply()


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Schedule | None:
    """The task's schedule (None when constant: nothing to step)."""
    if cfg.schedule == "constant":
        return None
    return Schedule(optimizer, cfg.schedule, cfg.epochs, max(1, steps_per_epoch * cfg.epochs), list(cfg.milestones),
                    cfg.gamma)


@dataclass(kw_only=True)
class Trained:
    """What ``train_task`` measured: mean losses over the steps, images seen, training seconds (loss None: no
    gradient step was taken)."""

    loss: float | None
    loss_terms: dict[str, float]
    images: int
    seconds: float
    epoch_lrs: list[float] = field(default_factory=list)


def training_rows(stream: Stream, ctx: TaskContext, train_set: list[rehearsal.Samples] | None
                  ) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """What task ``ctx.task`` trains on: images, labels (within the task; with a replaced training set, rows of
    (label, scope code), labels of seen classes only) and the stream index of every row (the step hooks' ``rows``)."""
    if train_set is None:
        task = stream.tasks[ctx.task]
        return task.train_x, task.train_y - ctx.class_offset, rehearsal.stream_rows(ctx.task, len(task.train_y))
    train_x, train_y = rehearsal.concat(train_set)
    rehearsal.check_labels(train_y[:, 0], len(ctx.seen_classes), "training_set")
    return train_x, train_y, rehearsal.stream_index(train_set)


def train_task(loop: Loop, ctx: TaskContext, optimizer: torch.optim.Optimizer, scheduler: Schedule | None,
               train_set: list[rehearsal.Samples] | None = None) -> Trained:
    """``cfg.epochs`` epochs over task ``ctx.task``: cross-entropy on its head plus the method's loss terms.

    Rehearsal: ``train_set`` (``training_set``'s samples) replaces the task's own data, ``replay_batch`` adds
    rows to each step; steps with such rows score every row per its scope (``clbench.methods.rehearsal.Step``)."""
    model, stream, hook, cfg, comm, clock = loop.model, loop.stream, loop.hook, loop.cfg, loop.opts.comm, loop.opts.clock
    t, device = ctx.task, ctx.device
    train_x, train_y, index = training_rows(stream, ctx, train_set)
    offsets = torch.as_tensor(loop.offsets, device=device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    draw = Draw(shuffle=True, generator=task_rng(ctx.seed, t, "shuffle"), limit=cfg.max_steps_per_epoch,
                augment=stream.augment, shard=comm.shard, drop_last=cfg.drop_last, positions=True)
    replay_draw = Draw(generator=task_rng(ctx.seed, t, "replay"), augment=stream.augment, shard=comm.shard)
    step, images = 0, 0
    loss_sum = torch.zeros((), device=device)
    term_sums: dict[str, torch.Tensor] = {}
    tic = clock()
    epoch_lrs = []
    for epoch in range(cfg.epochs):
        epoch_lrs.append(float(optimizer.param_groups[0]["lr"]))  # the method's first group: the adapters
        window_t, window_n = clock(), 0
        for xb, yb, pos in batches(train_x, train_y, cfg.batch_size, device, model, draw):
            optimizer.zero_grad(set_to_none=True)
            loss, rows = None, index[pos]  # rows: which stored training rows this step holds (task, row)
            data = rehearsal.Step.of(xb, yb, train_set is not None)
            data.add(rehearsal.as_list(hook.replay_batch(model=model, batch=data.own, rows=rows, ctx=ctx),
                                       "replay_batch"), len(ctx.seen_classes), model, device, replay_draw)
            if len(data):  # under torchrun a rank's share of a short last batch may be empty
                if data.extra is None and model.generative:  # a language model's own loss (O-LoRA's)
                    with ctx.autocast():
                        loss, logits, aux = model.train_loss(xb, yb, t)
                    replayed = None
                elif data.extra is None:  # the protocol's step: cross-entropy on the current head
                    with ctx.autocast():
                        logits, aux = forward_with_aux(model, xb, t)
                    loss, replayed = F.cross_entropy(logits.float(), yb), None
                else:  # rehearsal: one pass over own and added rows, every seen head, each row's loss per scope
                    if model.generative:
                        raise ClbenchError("rehearsal (training_set / replay_batch) is not defined for a language "
                                           "model: its loss is the label word's, not a head's; use an adapter method")
                    logits, loss, replayed = data.forward(model, ctx, offsets)
                    aux = {}
                total, names = loss, []
                step_batch = StepBatch(batch=data.own, logits=logits, replayed=replayed, aux=aux, rows=rows)
                for terms in hook.loss_terms(model=model, ctx=ctx, step=step_batch):
                    for name, value in (terms or {}).items():
                        total = total + value
                        names.append(name)
                        term_sums[name] = term_sums.get(name, 0) + value.detach().float()
                hook.backward(total, names)  # a graph kept from an earlier step fails here, naming the method
            # the whole batch's gradient and mean loss on every rank; in one process, as they are
            n_seen, loss = comm.reduce_gradients(params, len(data), loss)
            hook.before_optimizer_step(model=model, ctx=ctx, rows=rows)
            optimizer.step()
            hook.after_optimizer_step(model=model, ctx=ctx, rows=rows)
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.detach()
            step += 1
            images += n_seen
            window_n += n_seen
            if step % loop.opts.runtime.log_every == 0:  # in one process the step loop's only host synchronisation
                rate = window_n / max(1e-9, clock() - window_t)
                loop.opts.progress(f"task {t + 1}/{ctx.num_tasks} epoch {epoch + 1}/{cfg.epochs} step {step} "
                                   f"loss {loss.item():.4f} {rate:.0f} img/s")
                window_t, window_n = clock(), 0
        if scheduler is not None:
            scheduler.epoch_end()
    mean_loss = float(loss_sum.item() / max(1, step))
    term_means = {k: float(v.item() / max(1, step)) for k, v in term_sums.items()}
    bad = [k for k, v in {"cross-entropy": mean_loss, **term_means}.items() if not math.isfinite(v)]
    if bad:  # a diverged run: its finished tasks are kept, this one is not
        raise FloatingPointError(f"non-finite training loss on task {t} ({', '.join(bad)}); lower train.lr "
                                 "or check the method's loss terms")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Trained(loss=mean_loss, loss_terms=term_means, images=images, seconds=clock() - tic, epoch_lrs=epoch_lrs)


@torch.inference_mode()
def evaluate(loop: Loop, upto: int) -> tuple[np.ndarray, np.ndarray]:
    """CIL and TIL accuracy (percent) on the test sets of tasks 0..upto (each rank counts its shard)."""
    model, stream, device, comm = loop.model, loop.stream, loop.device, loop.opts.comm
    model.eval()
    n_seen = int(loop.offsets[upto + 1])
    cil, til = np.zeros(upto + 1), np.zeros(upto + 1)
    for j in range(upto + 1):
        task = stream.tasks[j]
        lo, hi = int(loop.offsets[j]), int(loop.offsets[j + 1])
        correct = torch.zeros(2, dtype=torch.long, device=device)
        for xb, yb in batches(task.test_x, task.test_y, loop.opts.runtime.eval_batch_size, device, model,
                              Draw(shard=comm.shard, augment=stream.test_transform)):
            if len(yb) == 0:
                continue
            with loop.autocast():
                cil_pred, til_pred = model.predict(xb, n_seen, lo, hi)
            correct[0] += (cil_pred == yb).sum()
            correct[1] += (til_pred == yb).sum()
        c = comm.all_reduce_sum(correct).cpu().numpy()
        cil[j], til[j] = 100.0 * c[0] / len(task.test_y), 100.0 * c[1] / len(task.test_y)
    return cil, til
