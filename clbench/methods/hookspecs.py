"""The whole plugin contract of clbench: every hook a method may implement, typed and documented.

Two pluggy managers use this file (see ``clbench.methods.registry``):

* the *discovery* manager calls :func:`register_methods` on every plugin module once, so the module can
  ``register(MethodClass)``;
* the *per-run* manager holds the one method instance of a run, the harness's default ``task_updates``
  (``clbench.methods.probes.TaskUpdateProbe``, called last) and read-only probes; the training loop
  (``clbench/run/loop.py``) calls the lifecycle hooks below, in this order::

      configure_model                                    once, before the first task
      load_method_state                                  on resume only, before the checkpointed weights load
      for each task:
          training_set                                   rehearsal: replace the task's training set
          before_task                                    new head exists, optimizer not built yet
          param_groups                                   optimizer is built from the first non-None result
                                                         (this and the step loop: gradient_training tasks only)
          for each step:
              replay_batch                               rehearsal: extra samples for this step
              loss_terms                                 after the forward pass, summed into the loss
              before_optimizer_step                      after backward (gradient projection)
              after_optimizer_step                       after the step (retraction)
          after_task                                     adapters still separate
          merge_task                                     fold the update into the weights
          task_updates                                   this task's low-rank update per adapted layer
          replay_buffer                                  rehearsal: what the method keeps (cost/buffer_images)
          (evaluation on every seen task)
          method_state                                   the method's own state, for the checkpoint

A method that takes no gradient step (a closed-form classifier such as RanPAC, class prototypes such as
SimpleCIL) sets ``gradient_training = False`` on its class (or defines ``gradient_training(self, ctx) -> bool``
to decide per task, e.g. to adapt on the first task only). For such a task the loop skips ``param_groups``, the
optimizer and the whole step loop (``replay_batch``, ``loss_terms``, ``before/after_optimizer_step``):
``train.epochs`` does not apply, the new head stays frozen, no ``train/loss`` is logged and
``cost/trainable_params`` is 0. The method reads ``ctx.loader()`` in ``before_task`` or ``after_task`` and writes
the heads' weights itself (under ``torch.no_grad()``; finished tasks' heads too: evaluation uses whatever the
heads hold). The time of every task-level hook is the run's ``cost/method_seconds``, counted with
``cost/train_seconds`` in ``cost/total_seconds`` (the leaderboard's ``total_s`` and its accuracy-vs-cost plot);
``cost/state_mb`` is the size of ``method_state``'s tensors, ``cost/checkpoint_mb`` the checkpoint file's.

Hooks marked ``firstresult`` call their implementations one after the other and stop at the first that
returns something other than None; that result wins. The others call every implementation.

Rehearsal (training on samples of earlier tasks) is three hooks around one type, ``clbench.Samples``
(raw uint8 images, stream-wide labels, and a loss scope per group: the sample's own task's head, every seen
head, or none), so ER, DER, GDumb or joint training are plugins like any other; ``loss_terms`` sees the added rows
as ``clbench.Replayed``, and the step hooks see which stored rows the step trains on (``rows``, a stream index),
so a buffer can take them during training. ``clbench.methods.rehearsal``'s docstring defines the types.

Hook names and arguments are public and never renamed; they may gain arguments, and an implementation
takes only the arguments it needs (pluggy passes by name). Hooks return data; none mutates loop state.

What trains by default (contract 3): after ``configure_model`` the loop freezes every pre-trained backbone
parameter unless the method declares ``trains_backbone = True``; then, without ``param_groups``, the optimizer
trains every parameter that still requires grad outside the heads (the adapters or prompts the method added) plus
the current task's head. A method that implements neither ``configure_model`` nor ``param_groups`` (say, one
``loss_terms`` hook) therefore trains the heads on the frozen backbone, and with ``trains_backbone = True`` it
fine-tunes the whole backbone. The contract's version is ``clbench.CONTRACT_VERSION``; docs/CONTRACT_CHANGELOG.md
lists every change and what a plugin written to an earlier version does about it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from clbench.methods.context import TaskContext
    from clbench.methods.rehearsal import Replayed, Samples
    from clbench.model.lora import LowRank

PROJECT = "clbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class StepBatch:
    """One training step as ``loss_terms`` sees it, after the forward pass (``clbench.StepBatch``).

    ``batch``: the step's own ``(images, labels)`` (preprocessed, labels within the task; empty when
    ``training_set`` replaced the task's data). ``logits``: the current task's head outputs on ``batch``.
    ``replayed``: the rows the rehearsal hooks added, with their logits over every seen class, or None.
    ``aux``: what the model's ``features`` returned beside the features (empty for a plain ``CLModel`` and on
    rehearsal steps). ``rows``: the stream index ``(task, row)`` of the step's training rows (CPU ``torch.long``,
    ``N x 2``; see ``loss_terms``)."""

    batch: tuple[torch.Tensor, torch.Tensor]
    logits: torch.Tensor
    replayed: Replayed | None
    aux: dict[str, torch.Tensor]
    rows: torch.Tensor


# The parts of StepBatch that contract 3's loss_terms took as arguments of their own; an implementation that
# still names them (and no ``step``) is called with them taken from the StepBatch (clbench.methods.registry).
STEP_PARTS = ("batch", "logits", "replayed", "aux", "rows")


class DiscoverySpec:
    """Hooks of the global discovery manager (called once per plugin module)."""

    @hookspec
    def register_methods(self, register: Callable[[type], None]) -> None:
        """Call ``register(MethodClass)`` for every method this plugin module provides."""


class MethodSpec:
    """Lifecycle hooks of one run; implemented as methods on the method instance."""

    @hookspec(firstresult=True)
    def configure_model(self, model: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module | None:
        """Once, before the first task: inject adapters (``clbench.model.lora.inject``), freeze what must stay frozen.

        Return a replacement model or None to keep ``model`` (modified in place). First non-None result wins.
        A replacement must be a ``clbench.model.backbones.CLModel`` subclass around the *same* backbone object
        (``model.backbone``, not a copy; the loop checks it) and changes the forward by overriding
        ``features(x)``, which may return ``(features, aux)`` to hand auxiliary tensors to ``loss_terms``.
        Every parameter it trains must be in ``param_groups`` (or a head), and an image's prediction must not
        depend on the rest of its batch; the contract checks both. Afterwards the loop freezes every pre-trained
        backbone parameter still requiring grad, unless the method sets ``trains_backbone = True`` (and prints one
        notice line when it froze anything): adapters and prompts train their own parameters.
        """

    @hookspec
    def before_task(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        """Each task, before the optimizer is built. The new task's (untrained) head already exists and
        ``ctx.loader()`` iterates this task's training data (``ctx.loader(augmented=True)``: with the stream's
        training augmentation, as an official statistics pass over the training loader): design projections,
        initialise new adapters."""

    @hookspec(firstresult=True)
    def param_groups(self, model: torch.nn.Module, ctx: TaskContext) -> list[dict[str, Any]] | None:
        """When the optimizer is built: the parameter groups of the method's trainable parameters.

        Groups are torch optimizer groups and may carry extra keys (e.g. ``"name"``) for the method's own
        step hooks. The loop appends the current task's head as its own group; do not include it. Earlier
        tasks' heads are frozen by the loop before ``before_task``; a rehearsal method that trains them (its
        samples score on every seen head) unfreezes them there and returns them here.
        Return None (or do not implement the hook) to let the loop train every ``requires_grad`` parameter
        outside the heads: the parameters the method added, since the pre-trained backbone is frozen after
        ``configure_model`` unless the method sets ``trains_backbone = True`` (then the whole backbone).
        A pre-trained parameter in the groups of a method without ``trains_backbone``, or a parameter left
        requiring grad outside the groups and the heads, fails the run. First non-None result wins.
        """

    @hookspec(firstresult=True)
    def training_set(self, ctx: TaskContext) -> Samples | list[Samples] | None:
        """Each task, before ``before_task``: the samples this task trains on instead of its own training set
        (joint training: ``[ctx.task_samples(j).with_scope("seen") for j in range(ctx.task + 1)]``; GDumb: its
        buffer). Samples of seen tasks only. The loop shuffles, augments and batches them like the task's own
        data, and ``ctx.steps_per_epoch`` counts their batches. None keeps the task's own training set."""

    @hookspec
    def replay_batch(
        self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], ctx: TaskContext, rows: torch.Tensor,
    ) -> Samples | list[Samples] | None:
        """Each step, before the forward pass: samples of seen tasks to add to this step's batch (ER, DER).
        Return one ``Samples`` or a list of them (several draws, several scopes); their rows are appended in
        that order. ``batch`` is the step's own batch (preprocessed, labels within the task; empty when
        ``training_set`` replaced the task's data); ``rows`` the stream index of the step's training rows
        (``clbench.methods.rehearsal``: ``N x 2`` ``(task, row)``). The added rows are augmented and preprocessed like
        the batch, go through the same forward pass, and their cross-entropy (per their scope) is averaged with
        the batch's; ``loss_terms`` sees them as ``replayed``. Draw from a generator seeded from ``ctx.seed`` and
        ``ctx.task`` so runs resume exactly."""

    @hookspec
    def loss_terms(self, model: torch.nn.Module, ctx: TaskContext, step: StepBatch) -> dict[str, torch.Tensor] | None:
        """Each step after the forward pass: extra scalar loss terms by name; they are added to the task's
        cross-entropy and logged as ``train/<name>``. ``step`` (:class:`StepBatch`) holds the step: ``step.logits``
        are the current task's head outputs on ``step.batch``; ``step.replayed`` holds the rows the rehearsal
        hooks added (with their logits over every seen class), or None when there are none; ``step.aux`` what the
        model's ``features`` returned beside the features (empty for a plain ``CLModel``, and on rehearsal steps).

        ``step.rows`` (a CPU ``torch.long`` tensor, ``N x 2``) is the stream index ``(task, row)`` of the step's
        training rows, so a method can insert them into a buffer with this step's logits (DER):
        ``ctx.stream_samples(step.rows)`` gives back their raw images and labels. They are ``batch``'s
        rows (``task`` is ``ctx.task``), or, when ``training_set`` replaced the task's data, the first
        ``len(rows)`` rows of ``replayed`` (``batch`` and ``logits`` are then empty; rows of a part without a
        ``Samples.index`` read ``(-1, -1)``). Under torchrun, this rank's rows.

        An implementation may instead name the parts it uses as arguments of their own, as contract 3 wrote
        the hook: ``loss_terms(self, model, batch, logits, ctx)`` (any of ``batch``, ``logits``, ``replayed``,
        ``aux``, ``rows``, with ``model`` and ``ctx``); it is called with them taken from ``step``."""

    @hookspec
    def before_optimizer_step(self, model: torch.nn.Module, ctx: TaskContext, rows: torch.Tensor) -> None:
        """After backward, before ``optimizer.step()``: project or rescale gradients in place. ``rows``: the
        step's training rows, as in ``loss_terms``."""

    @hookspec
    def after_optimizer_step(self, model: torch.nn.Module, ctx: TaskContext, rows: torch.Tensor) -> None:
        """After ``optimizer.step()``: retractions, re-orthonormalisation of factors. ``rows``: the step's training
        rows, as in ``loss_terms`` (a buffer that inserts after the step, as Mammoth's DER does, takes them
        here)."""

    @hookspec
    def after_task(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        """End of the task, adapters still separate: store subspaces, memories, statistics."""

    @hookspec
    def merge_task(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        """After ``after_task``, before evaluation: fold this task's update into the base weights if the
        method merges."""

    @hookspec(firstresult=True)
    def task_updates(self, model: torch.nn.Module, ctx: TaskContext) -> dict[str, LowRank] | None:
        """After the task: this task's update of every adapted layer as low-rank factors
        (``LowRank(B, A)`` with delta W = B @ A), keyed by the adapted layer's name. Used for spectra.

        First non-None result wins. The harness's own implementation (``clbench.methods.probes.TaskUpdateProbe``) is
        called last: a method that does not implement this hook, or returns None, gets the change of its
        sites' branches across the task (taken after ``after_task``, before ``merge_task``). Return ``{}``
        to report no update. A method whose class sets ``low_rank_updates = False`` (prompt methods) reports none:
        it has no sites, so the probe answers None too; its spectra read n/a and the suite's spectra statistics
        leave it out."""

    @hookspec(firstresult=True)
    def replay_buffer(self, ctx: TaskContext) -> Samples | list[Samples] | None:
        """After ``task_updates``: the samples of seen tasks the method keeps for rehearsal (its buffer; all
        seen data for joint training). The loop reports their number as ``cost/buffer_images``; a buffer the
        method owns belongs in ``method_state`` so a resumed run replays the same samples."""

    @hookspec(firstresult=True)
    def method_state(self, ctx: TaskContext) -> dict[str, Any] | None:
        """After a finished task, for the checkpoint: the method's own state (tensors, numbers, lists) that
        is not stored in the model's parameters (subspaces, memories). Must be ``torch.load(weights_only=True)``
        loadable. First non-None result wins."""

    @hookspec
    def load_method_state(self, model: torch.nn.Module, state: dict[str, Any], ctx: TaskContext) -> None:
        """On resume, after ``configure_model``: restore what :func:`method_state` returned and rebuild any
        adapter structure (branches per finished task) so that the checkpointed model state dict loads.

        ``ctx`` is the context of the last finished task (the one ``method_state`` was called with); the
        finished tasks' heads already exist. The model's parameters are then loaded strictly from the
        checkpoint, so create modules of the right shapes here; their values do not matter."""
