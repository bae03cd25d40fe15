"""lora_l2: sequential LoRA whose factors are pulled towards their values at the end of the previous task.

One LoRA per adapted layer is trained through the whole stream (as clbench's ``lora`` baseline). From the
second task on, the loss gains ``strength * sum ||theta - theta_prev||^2`` over every LoRA factor ``theta``
(A and B of every site), where ``theta_prev`` is the factor's value when the task began. The task's update
can still grow, but each step is pulled back towards what the previous tasks learnt.

Paper: the penalty is the plain "L2" baseline of Kirkpatrick et al., "Overcoming catastrophic forgetting in
neural networks", PNAS 2017 (EWC with the Fisher information replaced by the identity), applied to the
factors of LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022).
Official code: none for this combination; LoRA's is github.com/microsoft/LoRA.

Deviations:
- the penalty acts on the LoRA factors A and B, not on the network's weights as in Kirkpatrick et al.; the
  factors are not identifiable (B A = (B M)(M^-1 A)), so the pull is stronger than needed to keep B A fixed;
- the anchor is the previous task's end point only (no sum of penalties over all earlier tasks);
- ``strength`` = 1.0 is chosen for clbench's quickstart, not taken from a paper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from clbench import LoRAParams, LoRASite, Method, StepBatch, TaskContext, hookimpl, inject


class LoRAL2Params(LoRAParams):
    # rank, alpha, targets, blocks and dropout come from clbench's LoRAParams (a typo in targets fails the suite)
    strength: float = Field(1.0, ge=0,
                            description="lambda of the L2 pull towards the previous task's factors")


class LoRAL2(Method):
    name = "lora_l2"
    paper = ("Kirkpatrick et al., PNAS 2017 (the L2 baseline of EWC) applied to LoRA factors "
             "(Hu et al., ICLR 2022)")
    code = "github.com/microsoft/LoRA (LoRA); no official code for the combination"
    Params = LoRAL2Params

    def __init__(self, params: LoRAL2Params | dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.sites: dict[str, LoRASite] = {}
        self._anchor: list[tuple[nn.Parameter, torch.Tensor]] = []

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: TaskContext) -> None:
        # inject() freezes the whole backbone; the one branch per site is all that trains, so no
        # param_groups hook is needed (the loop trains every requires_grad parameter outside the heads).
        p = self.params
        self.sites = inject(model.backbone, p.targets, p.blocks)
        for site in self.sites.values():
            site.add_branch(p.rank, scale=p.scale, dropout=p.dropout)

    @hookimpl
    def before_task(self, model: nn.Module, ctx: TaskContext) -> None:
        # The anchor is the factors' value when this task begins, i.e. at the end of the previous task.
        factors = [q for s in self.sites.values() for q in (s.branches[0].A, s.branches[0].B)]
        self._anchor = [(q, q.detach().clone()) for q in factors] if ctx.task > 0 else []

    @hookimpl
    def loss_terms(self, model: nn.Module, ctx: TaskContext, step: StepBatch) -> dict[str, torch.Tensor] | None:
        if not self._anchor or self.params.strength == 0:
            return None  # nothing to pull towards on the first task
        pull = sum((q - q0).pow(2).sum() for q, q0 in self._anchor)
        return {"l2": self.params.strength * pull}

    # No task_updates: clbench reports the change of B A across each task (its default), as for `lora`.


def register_methods(register: Callable[[type], None]) -> None:
    register(LoRAL2)
