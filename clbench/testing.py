"""Small, fast building blocks for tests, benchmarks and plugin authors: a synthetic stream, a micro ViT,
a one-call run of a method through the real loop (no MLflow), the resume comparison (an interrupted run
continued from its checkpoint against an uninterrupted one) that the contract's resume check is built on, and a
tiny suite file with a reader of the MLflow runs it makes, and a folder plugin written for a test."""

from __future__ import annotations

import importlib
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clbench.data.streams import Stream, build_stream
from clbench.errors import ClbenchError
from clbench.methods.registry import run_manager
from clbench.model.backbones import CLModel, build_model
from clbench.run import checkpoint
from clbench.run.loop import LoopOptions, LoopState, TaskResult, checkpoint_payload, resume_state, run_stream
from clbench.store import tracking
from clbench.suite import StreamConfig, TrainConfig

TINY_SUITE_YAML = """\
name: {name}
seeds: [0]
stream: {{name: synthetic, num_tasks: 3, num_classes: 6, samples_per_class: 16}}
backbone: {{name: vit_micro_clbench, image_size: 16, pretrained: false}}
train: {{epochs: 1, batch_size: 16, lr: 5.0e-3, max_steps_per_epoch: 2}}
runtime: {{device: cpu, log_every: 1000}}
methods:
  - {{name: lora, params: {{rank: 2}}}}
  - {{name: lora, label: inclora, params: {{rank: 2, fresh_per_task: true}}}}
tracking: {{experiment: {experiment}}}
"""

_SECOND_METHOD = "  - {{name: lora, label: inclora, params: {{rank: 2, fresh_per_task: true}}}}\n"


def tiny_suite_yaml(name: str, experiment: str | None = None, one_method: bool = False) -> str:
    """A 3-task, 2-method suite on the synthetic stream that a `clbench run` process finishes in seconds;
    ``one_method`` keeps only the first method (lora): one run, for tests that need a run but not two."""
    template = TINY_SUITE_YAML.replace(_SECOND_METHOD, "") if one_method else TINY_SUITE_YAML
    return template.format(name=name, experiment=experiment or name)


def tiny_suite(folder: str | Path, name: str, experiment: str | None = None, one_method: bool = False) -> Path:
    """Write :func:`tiny_suite_yaml` to ``folder/name.yaml`` (the folder made if missing) and return its path."""
    path = Path(folder) / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tiny_suite_yaml(name, experiment, one_method))
    return path


def mlflow_runs(uri: str, experiment: str, role: str | None = None) -> list[Any]:
    """The MLflow runs of ``experiment`` in the store at ``uri`` (none when the experiment does not exist), only
    those whose ``clbench.role`` tag is ``role`` ("parent" or "child") when it is given."""
    return tracking.search_runs(uri, experiment, role)


def write_plugin(folder: str | Path, module: str, source: str) -> Path:
    """Write ``folder/module.py`` (``source`` dedented; the folder made if missing) and make it importable at once
    (import caches invalidated: a file written after an import of its folder is found)."""
    path = Path(folder) / f"{module}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    importlib.invalidate_caches()
    return path


def lora_plugin(name: str, paper: str = "a folder plugin for tests") -> str:
    """The source of a plugin module that registers method ``name``: the built-in naive LoRA under another name,
    without its aliases, e.g. for ``write_plugin(folder, name, lora_plugin(name))`` and ``--plugins-dir folder``."""
    return f'''
from clbench_plugins.lora import NaiveLoRA

class PluginLoRA(NaiveLoRA):
    name = "{name}"
    aliases = ()
    paper = "{paper}"

def register_methods(register):
    register(PluginLoRA)
'''


def builtin_method(name: str) -> type:
    """The class of the registered method ``name`` (a built-in or an installed plugin), e.g. to compare with."""
    from clbench.methods.registry import discover

    return discover().get(name).cls


def tiny_stream(num_tasks: int = 2, num_classes: int = 4, samples_per_class: int = 24, seed: int = 0) -> Stream:
    """A synthetic stream through the same Avalanche path as the real ones."""
    cfg = StreamConfig(name="synthetic", num_tasks=num_tasks, num_classes=num_classes,
                       samples_per_class=samples_per_class)
    return build_stream(cfg, seed)


def tiny_model(name: str = "vit_micro_clbench", image_size: int = 16, seed: int = 0) -> CLModel:
    """A randomly initialised tiny ViT (real timm VisionTransformer)."""
    torch.manual_seed(seed)
    return build_model(name, image_size, pretrained=False, checkpoint=None)


@dataclass(frozen=True)
class TextCase:
    """A text stream and the tiny language backbone that runs it (``clbench.model.lm``): where a helper here takes
    a ``Stream``, a ``TextCase`` runs the same loop on a language model (built from the seed, the stream
    tokenized by it). Needs the language-model extra (transformers)."""

    stream: Any  # clbench.data.text.TextStream
    backbone: str = "t5_tiny_clbench"


def tiny_text_case(num_tasks: int = 2, backbone: str = "t5_tiny_clbench", per_class: int = 8,
                   seed: int = 0) -> TextCase:
    """The synthetic instruction-formatted text tasks (``clbench.data.lm_synthetic``) on a tiny language model."""
    from clbench.data.lm_synthetic import synthetic_text_stream

    return TextCase(synthetic_text_stream(num_tasks, per_class, max(1, per_class // 2), seed), backbone)


def model_and_stream(stream: Stream | TextCase, seed: int = 0) -> tuple[CLModel, Stream]:
    """A fresh tiny model for ``stream`` (initialised from ``seed``) and the stream as the loop takes it."""
    if isinstance(stream, TextCase):
        from clbench.model.lm import build_language_model

        torch.manual_seed(seed)
        model = build_language_model(stream.backbone)
        return model, model.encode(stream.stream)
    return tiny_model(seed=seed), stream


def tiny_train(**overrides: Any) -> TrainConfig:
    base = dict(epochs=1, batch_size=16, lr=5e-3, optimizer="adam")
    return TrainConfig(**{**base, **overrides})


@dataclass
class TinyRun:
    model: CLModel
    method: Any
    state: LoopState
    results: list[TaskResult] = field(default_factory=list)

    @property
    def R(self) -> np.ndarray:
        return self.state.R


def run_method(method: Any, stream: Stream | None = None, model: CLModel | None = None, seed: int = 0,
               **train: Any) -> TinyRun:
    """Run ``method`` (an instance) through ``stream`` on CPU with the real loop and hooks; the returned
    ``model`` is the one trained (the replacement when ``configure_model`` returned one)."""
    fresh, stream = model_and_stream(stream or tiny_stream(seed=seed), seed)
    trained = [model or fresh]
    results: list[TaskResult] = []

    def on_task(result: TaskResult, state: LoopState, model: CLModel) -> None:
        results.append(result)
        trained[0] = model

    state = run_stream(trained[0], stream, run_manager(method), tiny_train(**train), seed,
                       LoopOptions(on_task=on_task))
    return TinyRun(trained[0], method, state, results)


class _Stop(Exception):
    """Ends an interrupted run right after its checkpoint (a kill, without a process)."""


def _method_factory(method: Any, params: Any) -> Callable[[], Any]:
    """A method class (built with ``params``) or a zero-argument factory, as a factory of fresh instances."""
    if isinstance(method, type):
        return lambda: method(params)
    if params is not None:
        raise TypeError("params go with a method class; a factory builds its instances itself")
    return method


def _recorder(results: list, weights: list) -> Callable[[TaskResult, LoopState, CLModel], None]:
    def on_task(result: TaskResult, state: LoopState, model: CLModel) -> None:
        results.append(result)
        weights[:] = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    return on_task


@dataclass
class ResumeComparison:
    """An uninterrupted run and the same run interrupted after ``after`` tasks, checkpointed, loaded back with
    ``torch.load(weights_only=True)`` and continued in a fresh method instance on a fresh model.

    ``full`` / ``resumed`` hold the task results from task ``after`` on; ``checkpoint`` is the loaded checkpoint.
    :meth:`mismatch` says what differs, if anything."""

    after: int
    checkpoint: dict[str, Any]
    full: list[TaskResult]
    resumed: list[TaskResult]
    full_state: LoopState
    resumed_state: LoopState
    full_weights: dict[str, torch.Tensor]
    resumed_weights: dict[str, torch.Tensor]

    def mismatch(self) -> str | None:
        """The first difference between the two runs (per-task losses and loss terms, the accuracy matrices,
        the final weights, all bit for bit), or None when the resumed run is the uninterrupted one."""
        where = f"resumed after task {self.after - 1}"
        for a, b in zip(self.full, self.resumed):
            if a.loss != b.loss or a.loss_terms != b.loss_terms:
                return (f"{where}: task {a.task} trains differently from the uninterrupted run (loss {b.loss!r} "
                        f"vs {a.loss!r}, terms {b.loss_terms} vs {a.loss_terms})")
        for label, a, b in (("R", self.full_state.R, self.resumed_state.R),
                            ("R_til", self.full_state.R_til, self.resumed_state.R_til)):
            if not np.array_equal(a, b, equal_nan=True):
                return f"{where}: {label} {b.tolist()} differs from the uninterrupted run's {a.tolist()}"
        w_full, w_resumed = self.full_weights, self.resumed_weights
        if set(w_full) != set(w_resumed):
            return (f"{where}: the final model has parameters {sorted(set(w_full) ^ set(w_resumed))[:4]} in only "
                    "one of the resumed and uninterrupted runs")
        for k, v in w_full.items():
            if not torch.equal(v, w_resumed[k]):
                return f"{where}: final weight '{k}' differs from the uninterrupted run's"
        return None


def _ignore(msg: str) -> None:
    return None


def interrupted_checkpoint(method: Any, stream: Stream, after: int, seed: int = 0, *,
                           progress: Callable[[str], None] = _ignore, **train: Any) -> dict[str, Any]:
    """Run ``method`` (an instance) through ``stream`` on CPU, stop after ``after`` tasks, and return the checkpoint
    as a resumed run reads it: the loop's payload (:func:`clbench.run.loop.checkpoint_payload`) saved by the runner's
    :class:`clbench.run.checkpoint.RunStore` and loaded back with ``torch.load(weights_only=True)``. Raises
    ``ClbenchError`` when ``method_state`` would not load that way."""

    def save_and_stop(result: TaskResult, state: LoopState, model: CLModel) -> None:
        if result.task + 1 < after:
            return
        checkpoint.check_loadable(state.method_state, "method_state()")
        store.save(checkpoint_payload(state, model))
        raise _Stop

    with tempfile.TemporaryDirectory(prefix="clbench-resume-") as tmp:
        store = checkpoint.RunStore(Path(tmp), "resume")
        try:
            model, tensors = model_and_stream(stream, seed)
            run_stream(model, tensors, run_manager(method), tiny_train(**train), seed,
                       LoopOptions(on_task=save_and_stop, progress=progress))
        except _Stop:
            pass
        ck = store.load()
    if ck is None:
        raise ClbenchError(f"no checkpoint after task {after - 1}: the stream has only {len(stream.tasks)} tasks")
    return ck


@dataclass(kw_only=True)
class ResumeSetup:
    """Where :func:`compare_resume` trains: ``stream`` (default: a synthetic ``num_tasks``-task stream, 2 classes
    per task), ``seed``, and ``train``: overrides of the tiny training settings (default two steps per epoch)."""

    stream: Stream | TextCase | None = None
    num_tasks: int = 3
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: dict[str, Any]) -> ResumeSetup:
        """``stream``, ``num_tasks`` and ``seed`` from ``settings``; every other key is a training override."""
        own = {k: settings.pop(k) for k in ("stream", "num_tasks", "seed") if k in settings}
        return cls(**own, train={"max_steps_per_epoch": 2, **settings})


def compare_resume(method: Any, params: Any = None, *, after: int = 1,
                   inspect: Callable[[dict[str, Any]], None] | None = None, progress: Callable[[str], None] = _ignore,
                   **settings: Any) -> ResumeComparison:
    """Train ``after`` of the stream's tasks, save through the real checkpoint path, reload ``weights_only`` into
    a fresh instance on a fresh model, continue to the end, and return the comparison with an uninterrupted run.

    ``method``: a method class (built with ``params``) or a zero-argument factory of fresh instances.
    ``settings``: :class:`ResumeSetup`'s ``stream``, ``num_tasks`` and ``seed``; any other key overrides the tiny
    training settings. ``inspect(checkpoint)`` runs between the checkpoint and the resume (the contract checks
    there that saved state has a ``load_method_state`` to go to). ``progress`` gets the loop's progress lines of
    the three runs, each prefixed by which run it is. A failing resume raises ``ClbenchError`` ("resume after
    task k failed: ...")."""
    make = _method_factory(method, params)
    setup = ResumeSetup.of(dict(settings))
    seed, train, num_tasks = setup.seed, setup.train, setup.num_tasks
    stream = setup.stream or tiny_stream(num_tasks=num_tasks, num_classes=2 * num_tasks, samples_per_class=16,
                                         seed=seed)
    cfg = tiny_train(**train)
    full, full_weights = [], []
    model, tensors = model_and_stream(stream, seed)
    full_state = run_stream(model, tensors, run_manager(make()), cfg, seed,
                            LoopOptions(on_task=_recorder(full, full_weights),
                                        progress=lambda m: progress(f"uninterrupted: {m}")))
    ck = interrupted_checkpoint(make(), stream, after, seed, progress=lambda m: progress(f"interrupted: {m}"), **train)
    if inspect is not None:
        inspect(ck)
    resumed, resumed_weights = [], []
    try:  # a fresh model (another seed: every weight must come from the checkpoint), as the runner builds one
        model, tensors = model_and_stream(stream, seed + 1)
        end = run_stream(model, tensors, run_manager(make()), cfg, seed,
                         LoopOptions(on_task=_recorder(resumed, resumed_weights), state=resume_state(ck),
                                     progress=lambda m: progress(f"resumed: {m}")))
    except ClbenchError as exc:
        raise ClbenchError(f"resume after task {after - 1} failed: {exc}") from None
    return ResumeComparison(after, ck, full[after:], resumed, full_state, end, full_weights[0], resumed_weights[0])


def assert_resumes(method: Any, params: Any = None, **kwargs: Any) -> ResumeComparison:
    """:func:`compare_resume`, failing (``AssertionError``) unless the resumed run is bit-identical to the
    uninterrupted one: a method's own resume test in one line, e.g.
    ``assert_resumes(MyMethod, {"rank": 2}, after=2, num_tasks=3)``."""
    comparison = compare_resume(method, params, **kwargs)
    problem = comparison.mismatch()
    if problem:
        raise AssertionError(f"{problem}; load_method_state must restore everything method_state saved (and "
                             "rebuild the adapters), and no state may live outside method_state and the model")
    return comparison
