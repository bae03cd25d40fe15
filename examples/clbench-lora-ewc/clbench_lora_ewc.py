"""lora_ewc: sequential LoRA with Elastic Weight Consolidation on the LoRA factors.

One LoRA branch per adapted layer trains through the whole stream (as clbench's ``lora`` baseline). At the end
of every task t, the method stores the factors' values theta*_t (the anchor) and their diagonal Fisher
information F_t, estimated on the task's training data. From the next task on, the loss gains one quadratic
penalty per finished task,

    ewc_lambda / 2 * sum_t sum_i F_t,i * (theta_i - theta*_t,i)^2,

over every entry i of every LoRA factor (A and B of every site): factors that mattered for an earlier task are
held near their value after it, unimportant ones stay free.

The Fisher is the mean, over the task's training batches, of the squared gradient of the batch's mean
log-likelihood of its true labels on the task's head: with ``fisher_batch_size`` 1 (the default) exactly the
per-sample empirical Fisher E[(d log p(y|x) / d theta)^2]; a larger batch is Avalanche's cheaper minibatch
estimate.

Paper: Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 114(13), 2017
(arXiv 1612.00796), applied to the factors of LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022, arXiv 2106.09685).
Official code: none was released with the EWC paper; the estimator and the separate per-task penalties follow
Avalanche's ``EWCPlugin`` (github.com/ContinualAI/avalanche, avalanche/training/plugins/ewc.py). LoRA's code is
github.com/microsoft/LoRA. No official code for the combination.

Deviations:
- the penalty acts on the LoRA factors A and B, not on the network's weights; the factors are not identifiable
  (B A = (B M)(M^-1 A)), so the penalty also holds directions that leave B A unchanged;
- empirical Fisher (the true labels), as Avalanche computes it, not labels sampled from the model's predictive
  distribution; on the current task's head only (the protocol's training loss);
- the penalty keeps the paper's 1/2 (Avalanche's plugin leaves it out: its lambda is half of ours);
- ``ewc_lambda`` = 100 is chosen for clbench's quickstart scale, not taken from the paper (which tunes it per
  experiment); heads are not penalised (earlier heads are frozen by the protocol, the current one is new).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clbench import LoRAParams, LoRASite, Method, TaskContext, hookimpl, inject


class LoRAEWCParams(LoRAParams):
    # rank, alpha, targets, blocks and dropout come from clbench's LoRAParams
    ewc_lambda: float = Field(100.0, ge=0, description="lambda of the EWC penalty (lambda/2 sum F (theta-theta*)^2)")
    fisher_batch_size: int = Field(1, ge=1, description="images per gradient of the Fisher estimate (1: per "
                                                        "sample, the definition; larger: cheaper, Avalanche's)")
    fisher_fraction: float = Field(1.0, gt=0, le=1, description="evenly spaced fraction of the task's training "
                                                                "set the Fisher is estimated on")


class LoRAEWC(Method):
    name = "lora_ewc"
    paper = ("Kirkpatrick et al., Overcoming catastrophic forgetting in neural networks, PNAS 2017 (EWC), on LoRA "
             "factors (Hu et al., ICLR 2022)")
    code = ("none for EWC (estimator as github.com/ContinualAI/avalanche EWCPlugin); github.com/microsoft/LoRA; "
            "no official code for the combination")
    Params = LoRAEWCParams

    def __init__(self, params: LoRAEWCParams | dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.sites: dict[str, LoRASite] = {}
        # one entry per finished task: factor name -> tensor, both detached (state kept across steps)
        self.fisher: list[dict[str, torch.Tensor]] = []
        self.anchor: list[dict[str, torch.Tensor]] = []

    def factors(self) -> dict[str, nn.Parameter]:
        """Every LoRA factor by name (``blocks.0.attn.q.A``): what the penalty and the Fisher cover."""
        return {f"{n}.{k}": q for n, s in self.sites.items() for k, q in (("A", s.branches[0].A),
                                                                          ("B", s.branches[0].B))}

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: TaskContext) -> None:
        p = self.params
        self.sites = inject(model.backbone, p.targets, p.blocks)
        for site in self.sites.values():
            site.add_branch(p.rank, scale=p.scale, dropout=p.dropout)

    def penalty(self) -> torch.Tensor | None:
        """ewc_lambda / 2 * sum over finished tasks of sum F (theta - theta*)^2, or None before the first."""
        if not self.fisher:
            return None
        live = self.factors()
        total = sum((f[k] * (q - a[k]).pow(2)).sum() for f, a in zip(self.fisher, self.anchor)
                    for k, q in live.items())
        return self.params.ewc_lambda / 2 * total

    @hookimpl
    def loss_terms(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], logits: torch.Tensor,
                   ctx: TaskContext) -> dict[str, torch.Tensor] | None:
        if self.params.ewc_lambda == 0:
            return None
        term = self.penalty()
        return None if term is None else {"ewc": term}

    def estimate_fisher(self, model: nn.Module, ctx: TaskContext) -> dict[str, torch.Tensor]:
        """The diagonal empirical Fisher of every factor on this task's training data (see the docstring).

        after_task runs with gradients enabled and the model in eval mode (CONTRIBUTING, hook author's guide);
        torch.autograd.grad leaves every .grad alone, and the squares are detached, so nothing keeps a graph."""
        live = self.factors()
        names, params = list(live), list(live.values())
        fisher = {k: torch.zeros_like(q, dtype=torch.float32) for k, q in live.items()}
        n = 0
        for x, y in ctx.loader(batch_size=self.params.fisher_batch_size, fraction=self.params.fisher_fraction):
            with ctx.autocast():
                logits = model(x, head=ctx.task)
            loss = F.cross_entropy(logits.float(), y)  # minus the batch's mean log-likelihood
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for k, g in zip(names, grads):
                if g is not None:
                    fisher[k] += g.detach().float().pow(2)
            n += 1
        return {k: v / max(1, n) for k, v in fisher.items()}

    @hookimpl
    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        self.fisher.append(self.estimate_fisher(model, ctx))
        self.anchor.append({k: q.detach().clone() for k, q in self.factors().items()})

    @hookimpl
    def method_state(self, ctx: TaskContext) -> dict[str, Any]:
        # the Fisher and anchors of every finished task: not in the model's parameters, so the checkpoint needs them
        return {"fisher": self.fisher, "anchor": self.anchor}

    @hookimpl
    def load_method_state(self, model: nn.Module, state: dict[str, Any], ctx: TaskContext) -> None:
        # checkpoints load on the CPU: back to the device the factors live on
        self.fisher = [{k: v.to(ctx.device) for k, v in f.items()} for f in state.get("fisher", [])]
        self.anchor = [{k: v.to(ctx.device) for k, v in a.items()} for a in state.get("anchor", [])]

    # No task_updates: clbench reports the change of B A across each task (its default), as for `lora`.


def register_methods(register: Callable[[type], None]) -> None:
    register(LoRAEWC)
