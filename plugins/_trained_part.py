"""What the reference methods train, shared by ``finetune``, ``joint`` and ``er``: LoRA adapters on the frozen
backbone (as the ``lora`` baseline), or every backbone parameter (full fine-tuning); and the task's update
reported for spectra in both cases.

* LoRA: one branch per site, trained through all tasks; the update is the change of ``B A`` across the task,
  ``[B_t, -B_(t-1)] [A_t; A_(t-1)]`` (as ``clbench_plugins.lora``).
* Full: the update of each block's linear maps (q, k, v rows of qkv, proj, fc1, fc2) is the dense change
  ``W_t - W_(t-1)``, factored by an exact SVD kept to its top ``update_rank`` directions
  (``clbench.dense.factor_change``; ``update_rank: null`` keeps the numerical rank, i.e. the exact change).

Not a plugin module (no entry point): the leading underscore keeps plugin folders from loading it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from clbench import dense
from clbench.lora import LowRank, inject

Trainable = Literal["lora", "full"]


class PartParams(BaseModel):
    """The trained part's params (LoRA's as in ``clbench_plugins.lora``, plus the dense update's rank)."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(10, ge=1, description="LoRA rank r (trainable: lora)")
    alpha: float | None = Field(None, gt=0, description="LoRA scaling alpha (delta W = alpha/r B A); default alpha = r")
    targets: list[Literal["q", "k", "v", "qkv", "proj", "fc1", "fc2"]] = Field(
        ["q", "v"], min_length=1, description="LoRA-adapted maps (trainable: lora)")
    blocks: list[int] | None = Field(None, description="LoRA-adapted transformer blocks (default: all)")
    update_rank: int | None = Field(64, ge=1, description="trainable: full: each map's dense task change is "
                                    "reported as its top-k SVD factors (null: the exact change, at numerical rank)")


class TrainedPart:
    """Mixin for a ``clbench.method.Method`` whose ``params`` extend :class:`PartParams`: call
    :meth:`configure_part`, :meth:`begin_part_task`, :meth:`end_part_task` from the hooks."""

    params: PartParams

    def configure_part(self, model: nn.Module, trainable: Trainable) -> None:
        self._trainable = trainable
        if trainable == "lora":
            p = self.params
            self.sites = inject(model.backbone, p.targets, p.blocks)
            for site in self.sites.values():
                site.add_branch(p.rank, scale=(p.alpha or p.rank) / p.rank)
            self.maps = {}
        else:
            self.sites = {}
            model.backbone.requires_grad_(True)
            self.maps = dense.backbone_maps(model.backbone)
        self._before: dict = {}
        self._update: dict[str, LowRank] = {}

    def part_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        if self._trainable == "lora":
            return [q for s in self.sites.values() for q in s.branches[0].parameters()]
        return list(model.backbone.parameters())

    def begin_part_task(self) -> None:
        """Remember where the task starts (re-derived from the weights, so a resumed run starts the same)."""
        if self._trainable == "lora":
            self._before = {n: s.update() for n, s in self.sites.items()}
        else:
            self._before = dense.snapshot(self.maps)

    def end_part_task(self) -> None:
        if self._trainable == "lora":
            self._update = {n: s.update() - self._before[n] for n, s in self.sites.items()}
        else:
            self._update = dense.task_changes(self.maps, self._before, self.params.update_rank)
        self._before = {}


def seen_heads(model: nn.Module, task: int) -> list[nn.Parameter]:
    """The earlier tasks' heads, unfrozen: rehearsed samples that score on every seen head train them too
    (the loop froze them before ``before_task`` and trains the current head itself)."""
    params = [p for h in list(model.heads)[:task] for p in h.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params
