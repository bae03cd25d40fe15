"""What the reference methods train, shared by ``finetune``, ``joint`` and ``er``: LoRA adapters on the frozen
backbone (as the ``lora`` baseline), or every backbone parameter (full fine-tuning); and the task's update
reported for spectra in both cases.

* LoRA: one branch per site, trained through all tasks; the update is the change of ``B A`` across the task,
  ``[B_t, -B_(t-1)] [A_t; A_(t-1)]``, which the harness reports (``clbench.methods.probes.TaskUpdateProbe``), as for
  ``clbench_plugins.lora``.
* Full: the update of each block's linear maps (q, k, v rows of qkv, proj, fc1, fc2) is the dense change
  ``W_t - W_(t-1)``, factored by an exact SVD kept to its top ``update_rank`` directions
  (``clbench.model.dense.factor_change``; ``update_rank: null`` keeps the numerical rank, i.e. the exact change).

Not a plugin module (no entry point): the leading underscore keeps plugin folders from loading it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from clbench import (
    BackboneFacts,
    LoRAParams,
    LowRank,
    TaskContext,
    backbone_maps,
    hookimpl,
    inject,
    snapshot_maps,
    task_changes,
)

Trainable = Literal["lora", "full"]


class PartParams(LoRAParams):
    """The trained part's params: clbench's shared LoRA params (used with ``trainable: lora``) plus the rank of
    the dense update reported with ``trainable: full``."""

    update_rank: int | None = Field(64, ge=1, description="trainable: full: each map's dense task change is "
                                    "reported as its top-k SVD factors (null: the exact change, at numerical rank)")

    def check_against(self, backbone: BackboneFacts) -> list[str]:
        """LoRA's checks (blocks, rank) when the adapters train; with ``trainable: full`` (the subclasses' field)
        the maps themselves train, so no rank has to fit them."""
        if getattr(self, "trainable", "lora") == "lora":
            return super().check_against(backbone)
        problem = backbone.blocks_problem("blocks", self.blocks)
        return [problem] if problem else []


class TrainedPart:
    """Mixin for a ``clbench.methods.method.Method`` whose ``params`` extend :class:`PartParams`: call
    :meth:`configure_part` from ``configure_model``. The mixin implements ``before_task`` (:meth:`begin_part_task`),
    ``after_task`` (:meth:`end_part_task`) and ``task_updates`` itself (pluggy registers hook implementations a
    class inherits); a method that needs more in one of them overrides it with ``@hookimpl`` and calls ``super()``.
    """

    params: PartParams

    def configure_part(self, model: nn.Module, trainable: Trainable) -> None:
        self._trainable = trainable
        if trainable == "lora":
            p = self.params
            self.sites = inject(model.backbone, p.targets, p.blocks)
            for site in self.sites.values():
                site.add_branch(p.rank, scale=p.scale, dropout=p.dropout)
            self.maps = {}
        else:
            self.sites = {}
            model.backbone.requires_grad_(True)
            self.maps = backbone_maps(model.backbone)
        self._before: dict = {}
        self._update: dict[str, LowRank] | None = None  # None: the harness reports the LoRA change

    def part_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        if self._trainable == "lora":
            return [q for s in self.sites.values() for q in s.branches[0].parameters()]
        return list(model.backbone.parameters())

    def begin_part_task(self) -> None:
        """Full: remember the weights where the task starts (re-read from the model, so a resumed run starts the
        same)."""
        if self._trainable == "full":
            self._before = snapshot_maps(self.maps)

    def end_part_task(self) -> None:
        """Full: this task's dense change of every map, as factors (``self._update``, for ``task_updates``)."""
        if self._trainable == "full":
            self._update = task_changes(self.maps, self._before, self.params.update_rank)
            self._before = {}

    @hookimpl
    def before_task(self, model: nn.Module, ctx: TaskContext) -> None:
        self.begin_part_task()

    @hookimpl
    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        self.end_part_task()

    @hookimpl
    def task_updates(self, model: nn.Module, ctx: TaskContext) -> dict[str, LowRank] | None:
        """Full: the dense change of the task just ended; LoRA: None, so the harness reports the adapters'."""
        return self._update


def seen_heads(model: nn.Module, task: int) -> list[nn.Parameter]:
    """The earlier tasks' heads, unfrozen: rehearsed samples that score on every seen head train them too
    (the loop froze them before ``before_task`` and trains the current head itself)."""
    params = [p for h in list(model.heads)[:task] for p in h.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params
