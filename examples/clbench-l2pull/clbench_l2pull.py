"""l2pull: sequential LoRA whose factors are pulled towards their values at the end of the previous task.

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

import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench.hookspecs import hookimpl
from clbench.lora import LowRank, inject
from clbench.method import Method


class L2PullParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a suite's params must fail, not be ignored
    rank: int = Field(10, ge=1, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, description="LoRA scaling (delta W = alpha/r B A); default r")
    targets: list[str] = Field(["q", "v"], min_length=1,
                               description="adapted maps: q, k, v, qkv, proj, fc1, fc2")
    strength: float = Field(1.0, ge=0,
                            description="lambda of the L2 pull towards the previous task's factors")


class L2Pull(Method):
    name = "l2pull"
    paper = ("Kirkpatrick et al., PNAS 2017 (the L2 baseline of EWC) applied to LoRA factors "
             "(Hu et al., ICLR 2022)")
    code = "github.com/microsoft/LoRA (LoRA); no official code for the combination"
    Params = L2PullParams

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.sites = {}
        self._anchor: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._before: dict[str, LowRank] = {}
        self._update: dict[str, LowRank] = {}

    @hookimpl
    def configure_model(self, model, ctx):
        # inject() freezes the whole backbone; the one branch per site is all that trains.
        p = self.params
        self.sites = inject(model.backbone, p.targets)
        for site in self.sites.values():
            site.add_branch(p.rank, scale=(p.alpha or p.rank) / p.rank)

    @hookimpl
    def before_task(self, model, ctx):
        # The anchor is the factors' value when this task begins, i.e. at the end of the previous task.
        factors = [q for s in self.sites.values() for q in (s.branches[0].A, s.branches[0].B)]
        self._anchor = [(q, q.detach().clone()) for q in factors] if ctx.task > 0 else []
        self._before = {n: s.update() for n, s in self.sites.items()}

    @hookimpl
    def param_groups(self, model, ctx):
        live = [q for s in self.sites.values() for q in s.branches[0].parameters()]
        return [{"params": live, "name": "lora"}]

    @hookimpl
    def loss_terms(self, model, batch, logits, ctx):
        if not self._anchor or self.params.strength == 0:
            return None  # nothing to pull towards on the first task
        pull = sum((q - q0).pow(2).sum() for q, q0 in self._anchor)
        return {"l2pull": self.params.strength * pull}

    @hookimpl
    def after_task(self, model, ctx):
        # The task's update is the change of B A across the task, as factors [B_t, -B_{t-1}] [A_t; A_{t-1}].
        self._update = {n: s.update() - self._before[n] for n, s in self.sites.items()}

    @hookimpl
    def task_updates(self, model, ctx):
        return self._update


def register_methods(register):
    register(L2Pull)
