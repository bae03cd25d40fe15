"""The method contract as reusable checks: what every registered method must satisfy, whoever wrote it.

``tests/test_contract.py`` runs these checks on every method in the registry (as timm tests every registered
model); a plugin package calls :func:`check_method` from its own tests, and ``clbench new-method`` generates a
test that does. Each check raises :class:`ContractError` with a message naming the method and what broke.

The frozen-weights check accounts for merging: a method may fold its adapters into the base weights
(``merge_task``), so base weights legitimately change. What must hold is that the *effective* weight of every
adapted site (base rows + live branches) changes across task t by exactly the dense form of the update the
method reports for task t (``task_updates``), and that every other pre-trained parameter, including the rows
of a fused ``qkv`` weight no site covers, is bit-for-bit unchanged. A method that silently writes into the
base weights, or reports an update that is not what it did, fails. Methods that set ``trains_backbone`` (on
the class, or on the instance when it depends on the params) are exempt from this check only; their
``task_updates`` may also name the backbone's own linear maps (``clbench.model.dense.backbone_maps``).

Resume: a run stopped after task 0 and resumed from its ``method_state`` (through a ``weights_only`` save and
load) into a fresh model and method gives the uninterrupted run's accuracy matrices. This is what a rehearsal
method's buffer needs (it is method state); the loop itself refuses rehearsal samples of unseen classes.

Two more holes are closed for methods that replace the model (``configure_model``): every parameter that
requires grad must be in the method's ``param_groups`` or a head, and no declared parameter may be a copy of a
pre-trained weight (a deep-copied backbone trained beside the frozen one escapes the frozen-weight check); and
the predictions of the same test images in a mixed-task batch and in task-pure batches must agree (a
batch-dependent prediction, such as a test-time batch vote, leaks the task identity). A method that sets
``low_rank_updates = False`` must report no update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from clbench.data.streams import Stream
from clbench.errors import ClbenchError
from clbench.methods.hookcheck import MethodHookError, undeclared_trainable
from clbench.methods.method import NAME_RULE, valid_method_name
from clbench.model.dense import backbone_maps
from clbench.model.lora import LowRank, find_sites


class ContractError(AssertionError):
    """A method breaks the plugin contract (raised as an assertion so pytest reports it as a failure)."""


def _quiet(msg: str) -> None:
    return None


def _fail(cls: type, msg: str) -> None:
    raise ContractError(f"method '{getattr(cls, 'name', cls.__qualname__)}': {msg}")


@dataclass
class ContractRun:
    """A two-task run of one method with what the checks need: per-task results and effective weights."""

    method: Any
    R: np.ndarray
    R_til: np.ndarray
    results: list = field(default_factory=list)  # clbench.run.loop.TaskResult per task
    initial: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> pre-trained value
    params: dict[int, tuple[str, torch.nn.Parameter]] = field(default_factory=dict)  # id -> (name, param)
    effective: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per task: site -> weight
    sites: dict[str, Any] = field(default_factory=dict)  # site name -> LoRASite (after the run)
    maps: dict[str, tuple[int, int]] = field(default_factory=dict)  # backbone map name -> (d_out, d_in)
    model: Any = None  # the (possibly replaced) model after the run
    stream: Any = None
    trainable_faults: list[str] = field(default_factory=list)  # trainable parameters outside groups and heads


def contract_stream(seed: int = 0, num_tasks: int = 2) -> Stream:
    """The synthetic stream of the contract: 2 classes per task, 16 training images per class."""
    from clbench.testing import tiny_stream

    return tiny_stream(num_tasks=num_tasks, num_classes=2 * num_tasks, samples_per_class=16, seed=seed)


def _site_weight(site) -> torch.Tensor:
    """The effective weight of a site: its base rows plus every live branch."""
    w = site.weight.detach().float().clone()
    upd = site.update()
    return w if upd is None else w + upd.dense()


def contract_run(
    cls: type,
    params: BaseModel | dict[str, Any] | None = None,
    stream: Stream | Any | None = None,  # a Stream, or a clbench.testing.TextCase (a tiny language model)
    seed: int = 0,
    max_steps: int = 2,
    progress: Callable[[str], None] | None = None,
) -> ContractRun:
    """Run ``cls`` (default params unless given) through a two-task stream on the tiny ViT, on CPU; ``progress``
    gets the loop's progress lines (each finished task, the contract notices)."""
    from clbench.methods.registry import run_manager
    from clbench.run.loop import LoopOptions, run_stream
    from clbench.testing import model_and_stream, tiny_train

    model, stream = model_and_stream(stream or contract_stream(seed), seed)  # a TextCase: a tiny language model
    # Parameters are tracked by identity: injection wraps the same nn.Linear, so the objects survive it.
    named = dict(model.backbone.named_parameters())
    run = ContractRun(method=cls(params), R=np.empty(0), R_til=np.empty(0), stream=stream)
    run.params = {id(p): (n, p) for n, p in named.items()}
    run.initial = {id(p): p.detach().clone() for p in named.values()}

    def on_task(result, state, m) -> None:
        run.results.append(result)
        run.model = m
        run.sites = find_sites(m.backbone)
        run.maps = {n: (len(range(*rows.indices(w.shape[0]))), w.shape[1])
                    for n, (w, rows) in backbone_maps(m.backbone).items()}
        run.effective.append({n: _site_weight(s) for n, s in run.sites.items()})

    pm = run_manager(run.method)
    pm.add_hookcall_monitoring(lambda *a: None, _TrainableProbe(run))
    try:
        state = run_stream(
            model,
            stream,
            pm,
            tiny_train(max_steps_per_epoch=max_steps),
            seed, LoopOptions(on_task=on_task, progress=progress or _quiet),
        )
    except MethodHookError as exc:  # a hook outside its contract, as the loop checks it in every run
        raise ContractError(str(exc)) from None
    run.R, run.R_til = state.R, state.R_til
    return run


class _TrainableProbe:
    """Watches ``param_groups`` (through pluggy's hook-call monitoring, so the loop is untouched) and records
    trainable parameters that the method did not declare, and declared ones that are copies of pre-trained
    weights (a deep-copied backbone trained beside the frozen one)."""

    def __init__(self, run: ContractRun) -> None:
        self.run = run

    def __call__(self, outcome, hook_name: str, hook_impls, kwargs) -> None:
        if hook_name != "param_groups":
            return
        model, groups = kwargs["model"], outcome.get_result()
        names = {id(p): n for n, p in model.named_parameters()}
        heads = {id(p) for h in model.heads for p in h.parameters()}
        if groups is None:  # the loop trains every requires_grad parameter outside the heads
            declared = {pid for n, p in model.named_parameters() if p.requires_grad for pid in [id(p)]}
        else:
            declared = {id(p) for g in groups for p in g["params"]}
        faults = self.run.trainable_faults
        faults += [f"'{n}' requires grad but is in no parameter group of the method and is no head"
                   for n in undeclared_trainable(model, groups)]  # the loop's own check (clbench.methods.hookcheck)
        pretrained = [v for v in self.run.initial.values() if v.ndim >= 2 and v.float().std() > 0]
        for pid in declared - heads:
            if pid in self.run.initial:
                continue  # a pre-trained parameter itself: the frozen-weight check follows it
            p = next(q for q in model.parameters() if id(q) == pid)
            if any(v.shape == p.shape and torch.equal(v, p.detach()) for v in pretrained):
                faults.append(f"'{names.get(pid, '?')}' is a trained copy of a pre-trained weight")


def check_registration(cls: type) -> None:
    """Name, params and hooks: what the registry and ``clbench methods NAME --params`` rely on."""
    from clbench.methods.registry import validate_hooks

    name = getattr(cls, "name", "")
    if not valid_method_name(name):
        _fail(cls, f"name must be {NAME_RULE}; got {name!r}")
    try:
        validate_hooks(cls, f"method '{name}'")
    except ClbenchError as exc:
        raise ContractError(str(exc)) from None
    P = cls.Params
    try:
        defaults = P()
    except ValidationError as exc:
        _fail(cls, f"Params() must construct from defaults (the paper's settings): {exc.errors()[0]['msg']}")
    undocumented = [f for f, info in P.model_fields.items() if not (info.description or "").strip()]
    if undocumented:
        _fail(cls, f"Params fields without a description (shown by `clbench methods {name}`): {undocumented}")
    try:
        P(**{**defaults.model_dump(), "no_such_param_xyz": 1})
    except ValidationError:
        pass
    else:
        _fail(
            cls,
            "Params accepts unknown keys; set model_config = ConfigDict(extra='forbid') so a typo in "
            "a suite fails",
        )
    cls(defaults)  # the constructor the runner uses


def check_run(run: ContractRun) -> None:
    """Finite losses, well-formed evaluation and task updates, frozen weights (see the module docstring)."""
    cls = type(run.method)
    T = len(run.results)
    if T < 2:
        _fail(cls, f"expected 2 finished tasks, got {T}")
    for res in run.results:
        if res.loss is not None and not math.isfinite(res.loss):
            _fail(cls, f"non-finite training loss on task {res.task}: {res.loss}")
        bad = {k: v for k, v in res.loss_terms.items() if not math.isfinite(v)}
        if bad:
            _fail(cls, f"non-finite loss terms on task {res.task}: {bad}")
    _check_matrices(cls, run.R, run.R_til)
    trains_backbone = bool(getattr(run.method, "trains_backbone", False))
    for res in run.results:
        if not getattr(cls, "low_rank_updates", True) and res.updates:
            _fail(cls, f"low_rank_updates = False, but task {res.task} reported updates of {sorted(res.updates)[:3]}; "
                       "a method without a low-rank update must report none (task_updates None or {})")
        _check_updates(cls, res.task, res.updates, run.sites, run.maps if trains_backbone else {})
    if not trains_backbone:
        if run.trainable_faults:
            _fail(cls, f"trainable parameters outside the method's groups and the heads: {run.trainable_faults[0]} "
                       f"({len(run.trainable_faults)} in all); declare them in param_groups, freeze them, or set "
                       "trains_backbone = True")
        _check_frozen(cls, run)
    if run.model is not None:
        _check_batch_independent(cls, run)


def _check_batch_independent(cls: type, run: ContractRun) -> None:
    """The predictions of the same test images in one mixed-task batch and in task-pure batches must agree:
    a prediction that depends on the rest of its batch (a test-time batch vote) leaks the task identity, since
    the protocol evaluates each task in its own batches."""
    model = run.model
    tasks = run.stream.tasks
    n = min(8, *(len(t.test_y) for t in tasks))
    from clbench.data.batching import batches

    pure = [next(batches(t.test_x, t.test_y, n, torch.device("cpu"), model))[0] for t in tasks]
    order = torch.arange(n * len(tasks)).view(len(tasks), n).T.reshape(-1)  # interleave the tasks
    with torch.inference_mode():
        model.eval()
        alone = torch.cat([model(x) for x in pure])
        mixed = torch.empty_like(alone)
        mixed[order] = model(torch.cat(pure)[order])
    err = float((alone - mixed).abs().max())
    if err > 1e-4 * max(1.0, float(alone.abs().max())):
        _fail(cls, f"predictions depend on the rest of the batch: the same test images give logits differing by "
                   f"{err:.3g} in a mixed-task batch and in task-pure batches; each image's prediction must depend "
                   "on that image only (no test-time batch statistics or votes, which leak the task identity)")


def _check_matrices(cls: type, R: np.ndarray, R_til: np.ndarray) -> None:
    T = R.shape[0]
    for label, M in (("R", R), ("R_til", R_til)):
        if M.shape != (T, T):
            _fail(cls, f"{label} has shape {M.shape}, expected {(T, T)}")
        lower = M[np.tril_indices(T)]
        if not np.all(np.isfinite(lower)) or lower.min() < 0 or lower.max() > 100:
            _fail(cls, f"{label} must hold percentages in [0, 100] on and below the diagonal: {M.tolist()}")
        if not np.all(np.isnan(M[np.triu_indices(T, 1)])):
            _fail(
                cls,
                f"{label} must be NaN above the diagonal (task j not yet seen after task i): {M.tolist()}",
            )
    # A correct class-incremental argmax is also correct within the true task's head.
    if np.any(R_til[np.tril_indices(T)] < R[np.tril_indices(T)]):
        _fail(
            cls,
            f"task-incremental accuracy below class-incremental accuracy: R={R.tolist()} "
            f"R_til={R_til.tolist()}",
        )


def _check_updates(cls: type, task: int, updates: Any, sites: dict[str, Any],
                   maps: dict[str, tuple[int, int]]) -> None:
    if updates is None:
        return  # a method without low-rank updates (no spectra for it)
    if not isinstance(updates, dict):
        _fail(
            cls, f"task_updates on task {task} must return dict[str, LowRank], got {type(updates).__name__}"
        )
    for key, lr in updates.items():
        if key not in sites and key not in maps:
            where = "an adapted site or a backbone map" if maps else "an adapted site"
            _fail(
                cls,
                f"task_updates on task {task}: '{key}' is not {where}; sites: {sorted(sites or maps)[:6]}",
            )
        if not isinstance(lr, LowRank):
            _fail(
                cls, f"task_updates on task {task}: '{key}' is {type(lr).__name__}, not clbench.model.lora.LowRank"
            )
        d_out, d_in = (sites[key].d_out, sites[key].d_in) if key in sites else maps[key]
        r = lr.A.shape[0]
        if lr.A.ndim != 2 or lr.B.ndim != 2 or lr.B.shape[1] != r or lr.shape != (d_out, d_in):
            _fail(
                cls,
                f"task_updates on task {task}: '{key}' has B {tuple(lr.B.shape)}, A {tuple(lr.A.shape)}; "
                f"expected B (d_out={d_out}, r) and A (r, d_in={d_in})",
            )
        if not (torch.isfinite(lr.A).all() and torch.isfinite(lr.B).all()):
            _fail(cls, f"task_updates on task {task}: '{key}' has non-finite factors")


def _check_frozen(cls: type, run: ContractRun) -> None:
    covered: dict[int, list] = {}  # id(base weight) -> sites over its rows
    for site in run.sites.values():
        if id(site.base_weight) not in run.initial:
            _fail(cls, f"site '{site.name}': its base weight is no longer the pre-trained parameter "
                       "(replaced rather than updated in place), so its frozen rows cannot be checked")
        covered.setdefault(id(site.base_weight), []).append(site)
    for pid, (pname, p) in run.params.items():
        before, after = run.initial[pid], p.detach()
        if pid not in covered:
            if not torch.equal(before, after):
                _fail(
                    cls,
                    f"pre-trained parameter '{pname}' changed although the method does not train the "
                    "backbone (set trains_backbone = True if it should)",
                )
            continue
        mask = torch.ones(before.shape[0], dtype=torch.bool)
        for site in covered[pid]:
            mask[site.rows] = False
        if not torch.equal(before[mask], after[mask]):
            _fail(cls, f"rows of '{pname}' outside every adapted site changed")
    # Adapted sites: effective weight change across each task == that task's reported update.
    for t, res in enumerate(run.results):
        for name, site in run.sites.items():
            prev = run.effective[t - 1].get(name) if t else None
            if prev is None:
                prev = run.initial[id(site.base_weight)][site.rows].float()
            delta = run.effective[t][name] - prev
            upd = (res.updates or {}).get(name)
            reported = upd.dense() if upd is not None else torch.zeros_like(delta)
            # float32 rounding of w + B A is ~1e-7 of the weight's magnitude; anything real is far larger.
            scale = max(1.0, float(run.effective[t][name].abs().max()))
            err = float((delta - reported).abs().max())
            if err > 1e-5 * scale:
                _fail(
                    cls,
                    f"task {t}, site '{name}': the effective weight changed by something other than the "
                    f"reported task update (max abs difference {err:.3g}); task_updates must return what "
                    "the task changed, and base weights may change only by merging that update",
                )


def check_determinism(
    cls: type,
    first: ContractRun,
    params: BaseModel | dict[str, Any] | None = None,
    stream: Stream | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> None:
    """A second run with the same seed gives identical accuracy matrices (CPU)."""
    second = contract_run(cls, params, stream=stream, seed=seed, progress=progress)
    for label, a, b in (("R", first.R, second.R), ("R_til", first.R_til, second.R_til)):
        if not np.array_equal(a, b, equal_nan=True):
            _fail(
                cls,
                f"two CPU runs with seed {seed} give different {label}: {a.tolist()} vs {b.tolist()}; "
                "derive all randomness from torch's seeded RNG",
            )


def check_resume(
    cls: type,
    params: BaseModel | dict[str, Any] | None = None,
    *,
    seed: int = 0,
    max_steps: int = 2,
    num_tasks: int = 3,
    after: int = 1,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Interrupt a run after ``after`` of ``num_tasks`` tasks, resume it in a fresh method instance on a fresh model,
    and require what an uninterrupted run gives: the same accuracy matrices, per-task losses and loss terms, and
    final weights, bit for bit on CPU (:func:`clbench.testing.compare_resume`, which plugin tests call too).

    The checkpoint goes through the runner's own path: the loop's payload (:func:`clbench.run.loop.checkpoint_payload`),
    saved by :class:`clbench.run.checkpoint.RunStore` and loaded back with ``torch.load(weights_only=True)``.
    The check makes its own uninterrupted ``num_tasks``-task run to compare with. Everything after ``params`` is
    keyword-only, so params passed by position cannot land in a wrong argument and be silently dropped.
    """
    from clbench.testing import compare_resume

    def state_has_a_home(ck: dict[str, Any]) -> None:
        saved = ck["method"]
        if saved and getattr(cls, "load_method_state", None) is None:
            keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            _fail(cls, f"method_state returns state ({keys}) but the class has no load_method_state hook to "
                       "restore it: a resumed run would continue without it; implement load_method_state")

    try:
        comparison = compare_resume(cls, params, after=after, num_tasks=num_tasks, seed=seed,
                                    inspect=state_has_a_home, progress=progress or _quiet,
                                    max_steps_per_epoch=max_steps)
    except MethodHookError:  # a hook failing in a plain run: already one line naming the method
        raise
    except ClbenchError as exc:  # unloadable method_state, or the resume itself failed
        _fail(cls, str(exc))
    problem = comparison.mismatch()
    if problem:
        _fail(cls, f"{problem}; load_method_state must restore everything method_state saved (and rebuild the "
                   "adapters), and no state may live outside method_state and the model's parameters")


def check_method(cls: type, params: BaseModel | dict[str, Any] | None = None, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> ContractRun:
    """The whole contract for one method class; returns the first run for further, method-specific checks.

    ``params``: the method's params (a ``Params`` instance or a dict of fields; default: ``Params()``, the
    paper's settings), used by every check. ``seed``: the seed of the synthetic stream, the model's
    initialisation and the runs (the determinism check reruns with the same seed). ``progress``: gets the loop's
    progress lines while the checks run."""
    run = None
    for _, check in method_checks(cls, params, seed, progress):
        out = check()
        run = out if isinstance(out, ContractRun) else run
    return run


def method_checks(cls: type, params: BaseModel | dict[str, Any] | None = None,
                  seed: int = 0, progress: Callable[[str], None] | None = None) -> list[tuple[str, Any]]:
    """The contract as named steps (``clbench check`` prints one line per step); run them in order, each raises
    :class:`ContractError` on failure and the run step returns the :class:`ContractRun` the later steps use."""
    stream = contract_stream(seed)
    holder: dict[str, ContractRun] = {}

    def run() -> ContractRun:
        holder["run"] = contract_run(cls, params, stream=stream, seed=seed, progress=progress)
        check_run(holder["run"])
        return holder["run"]

    return [
        ("registration (name, params, hooks)", lambda: check_registration(cls)),
        ("two tasks on the tiny ViT (losses, accuracy matrices, task updates, frozen weights)", run),
        ("deterministic on CPU", lambda: check_determinism(cls, holder["run"], params, stream=stream, seed=seed,
                                                           progress=progress)),
        ("resume after task 1 of 3 is bit-exact", lambda: check_resume(cls, params=params, seed=seed,
                                                                        progress=progress)),
    ]


def language_checks(cls: type, params: BaseModel | dict[str, Any] | None = None, seed: int = 0,
                    backbone: str = "t5_tiny_clbench") -> list[tuple[str, Any]]:
    """The contract's run, determinism and resume steps on a tiny language model (``clbench.model.lm``:
    ``t5_tiny_clbench`` or ``llama_tiny_clbench``) and the synthetic text tasks, as :func:`method_checks` runs them
    on the tiny ViT: the same method code, LoRA sites on the attention projections. Needs the language-model
    extra (transformers)."""
    from clbench.testing import compare_resume, tiny_text_case

    case = tiny_text_case(2, backbone, seed=seed)
    holder: dict[str, ContractRun] = {}

    def run() -> ContractRun:
        holder["run"] = contract_run(cls, params, stream=case, seed=seed)
        check_run(holder["run"])
        return holder["run"]

    def resume() -> None:
        comparison = compare_resume(cls, params, after=1, stream=tiny_text_case(3, backbone, seed=seed), seed=seed,
                                    max_steps_per_epoch=2)
        problem = comparison.mismatch()
        if problem:
            _fail(cls, f"on {backbone}: {problem}")

    return [
        (f"two tasks on {backbone} (losses, accuracy matrices, task updates, frozen weights)", run),
        (f"deterministic on CPU ({backbone})", lambda: check_determinism(cls, holder["run"], params, stream=case,
                                                                         seed=seed)),
        (f"resume after task 1 of 3 is bit-exact ({backbone})", resume),
    ]


def method_params(cls: type, assignments: list[str]) -> BaseModel:
    """``cls``'s params from ``--set KEY=VALUE`` assignments (``clbench check``): each KEY a field of its
    ``Params`` (a leading ``params.`` is allowed, dotted keys reach nested fields), each VALUE parsed as YAML,
    as ``clbench run --set`` does; the rest are the defaults. A bad key or value is one ``ClbenchError`` line
    naming the flag."""
    from clbench.suite import apply_override, format_validation_error

    data: dict[str, Any] = {}
    for assignment in assignments:
        apply_override(data, assignment.removeprefix("params."), "--set")
    try:
        return cls.Params(**data)
    except ValidationError as err:
        raise ClbenchError(format_validation_error(f"--set {' '.join(assignments)}", err)) from None


def load_plugin_file(path: str | Path):
    """A registry holding only the methods of one plugin file (validated as ``--plugins-dir`` would)."""
    from clbench.methods.registry import Registry

    reg = Registry()
    reg.add_file(Path(path).resolve())
    return reg
