"""The whole plugin contract of clbench: every hook a method may implement, typed and documented.

Two pluggy managers use this file (see ``clbench.registry``):

* the *discovery* manager calls :func:`register_methods` on every plugin module once, so the module can
  ``register(MethodClass)``;
* the *per-run* manager holds the one method instance of a run, the harness's default ``task_updates``
  (``clbench.probes.TaskUpdateProbe``, called last) and read-only probes; the training loop
  (``clbench/loop.py``) calls the lifecycle hooks below, in this order::

      configure_model                                    once, before the first task
      load_method_state                                  on resume only, before the checkpointed weights load
      for each task:
          before_task                                    new head exists, optimizer not built yet
          param_groups                                   optimizer is built from the first non-None result
          for each step:
              loss_terms                                 after the forward pass, summed into the loss
              before_optimizer_step                      after backward (gradient projection)
              after_optimizer_step                       after the step (retraction)
          after_task                                     adapters still separate
          merge_task                                     fold the update into the weights
          task_updates                                   this task's low-rank update per adapted layer
          (evaluation on every seen task)
          method_state                                   the method's own state, for the checkpoint

Hooks marked ``firstresult`` call their implementations one after the other and stop at the first that
returns something other than None; that result wins. The others call every implementation.

Hook names and arguments are public and never renamed; they may gain arguments, and an implementation
takes only the arguments it needs (pluggy passes by name). Hooks return data; none mutates loop state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from clbench.context import TaskContext
    from clbench.lora import LowRank

PROJECT = "clbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class DiscoverySpec:
    """Hooks of the global discovery manager (called once per plugin module)."""

    @hookspec
    def register_methods(self, register: Callable[[type], None]) -> None:
        """Call ``register(MethodClass)`` for every method this plugin module provides."""


class MethodSpec:
    """Lifecycle hooks of one run; implemented as methods on the method instance."""

    @hookspec(firstresult=True)
    def configure_model(self, model: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module | None:
        """Once, before the first task: inject adapters (``clbench.lora.inject``), freeze what must stay frozen.

        Return a replacement model or None to keep ``model`` (modified in place). First non-None result wins.
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
        step hooks. The loop appends the current task's head as its own group; do not include heads.
        Return None to let the loop train every ``requires_grad`` parameter outside the heads.
        First non-None result wins.
        """

    @hookspec
    def loss_terms(
        self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], logits: torch.Tensor,
        ctx: TaskContext,
    ) -> dict[str, torch.Tensor] | None:
        """Each step after the forward pass: extra scalar loss terms by name; they are added to the task's
        cross-entropy and logged as ``train/<name>``. ``logits`` are the current task's head outputs."""

    @hookspec
    def before_optimizer_step(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        """After backward, before ``optimizer.step()``: project or rescale gradients in place."""

    @hookspec
    def after_optimizer_step(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        """After ``optimizer.step()``: retractions, re-orthonormalisation of factors."""

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

        First non-None result wins. The harness's own implementation (``clbench.probes.TaskUpdateProbe``) is
        called last: a method that does not implement this hook, or returns None, gets the change of its
        sites' branches across the task (taken after ``after_task``, before ``merge_task``). Return ``{}``
        to report no update."""

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
