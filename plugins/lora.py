"""Naive sequential LoRA (SeqLoRA) and IncLoRA: the baselines every continual-LoRA method is compared to.

* ``lora`` (default): one LoRA per adapted layer, trained through all tasks with no constraint. This is the
  SeqLoRA baseline of O-LoRA (Wang et al., EMNLP Findings 2023, arXiv 2310.14152; github.com/cmnfriend/O-LoRA:
  the same code with lambda1 = lambda2 = 0 and a single LoRA) applied to a ViT (docs/METHODS.md section 5, "lora").
* ``fresh_per_task: true`` (IncLoRA): a new LoRA per task, merged into the base weights after the task.

LoRA itself: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022
(github.com/microsoft/LoRA); A Kaiming-uniform, B zero, delta W = (alpha / r) B A.

The task update reported for spectra is the change of the factor product across the task,
``B_t A_t - B_{t-1} A_{t-1}`` (factors ``[B_t, -B_{t-1}] [A_t; A_{t-1}]``): the harness computes it
(``clbench.methods.probes.TaskUpdateProbe``). IncLoRA reports its task's own branch instead (rank r, without the zero
half ``-B_{t-1}`` that the harness would add on the first task, where the branch starts at B = 0).

Claim interventions (issue 24: does spectral imbalance *cause* forgetting?): with ``fresh_per_task``,
``spectrum: flat | sharpen`` replaces the finished task's update ``delta W = U S V^T`` by ``U S' V^T`` just before
it is merged (``clbench.model.spectra.reshape_spectrum``: same singular subspaces, same Frobenius norm, or the same
nuclear norm with ``norm: nuclear``); ``flat`` sets S' to S's RMS (mean for nuclear) on the update's rank,
``sharpen`` uses ``S^power`` renormalised. Training is untouched, so the task's own accuracy right after the
intervention (``eval/acc/task_JJ`` at that step) shows what the intervention costs on the current task, and the
reported task update (spectra) is the intervened one. ``spectrum: keep`` (default) changes nothing.

Deviations: targets default to q and v of every block (InfLoRA/SD-LoRA protocol, r = 10) rather than the
PEFT/T5 defaults; no LoRA dropout by default (the ViT protocols use none).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from clbench import (
    LoRABranch,
    LoRAParams,
    LoRASite,
    LowRank,
    Method,
    TaskContext,
    hookimpl,
    inject,
    reshape_spectrum,
)


class NaiveLoRAParams(LoRAParams):
    fresh_per_task: bool = Field(False, description="IncLoRA: a new LoRA per task, merged after the task")
    spectrum: Literal["keep", "flat", "sharpen"] = Field(
        "keep", description="claim intervention on the finished task's update before merging (needs "
        "fresh_per_task): keep; flat = every singular value set equal; sharpen = S^power; same subspaces, same norm")
    power: float = Field(2.0, gt=1, description="sharpen: the exponent p of S^p")
    norm: Literal["frobenius", "nuclear"] = Field(
        "frobenius", description="the norm the intervention preserves: frobenius (sum S^2) or nuclear (sum S)")

    @model_validator(mode="after")
    def _intervention_needs_fresh(self) -> NaiveLoRAParams:
        if self.spectrum != "keep" and not self.fresh_per_task:
            raise ValueError(f"spectrum: {self.spectrum} intervenes on a task's own update before it is merged; "
                             "set fresh_per_task: true (IncLoRA)")
        return self


class NaiveLoRA(Method):
    name = "lora"
    aliases = ("seqlora",)
    paper = "Hu et al., LoRA, ICLR 2022; SeqLoRA baseline as in Wang et al., O-LoRA, EMNLP Findings 2023"
    code = "github.com/microsoft/LoRA; github.com/cmnfriend/O-LoRA"
    Params = NaiveLoRAParams

    def __init__(self, params: NaiveLoRAParams | dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.sites: dict[str, LoRASite] = {}
        self._own_branch: dict[str, LowRank] = {}  # IncLoRA: this task's branch, kept before it is merged

    def _new_branches(self) -> None:
        p = self.params
        for site in self.sites.values():
            site.add_branch(p.rank, scale=p.scale, dropout=p.dropout)

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: TaskContext) -> None:
        self.sites = inject(model.backbone, self.params.targets, self.params.blocks)
        self._new_branches()

    @hookimpl
    def before_task(self, model: nn.Module, ctx: TaskContext) -> None:
        if self.params.fresh_per_task and ctx.task > 0:
            self._new_branches()

    @hookimpl
    def param_groups(self, model: nn.Module, ctx: TaskContext) -> list[dict[str, Any]]:
        live = [p for s in self.sites.values() for p in s.branches[-1].parameters()]
        return [{"params": live, "name": "lora"}]

    @hookimpl
    def merge_task(self, model: nn.Module, ctx: TaskContext) -> None:
        if self.params.fresh_per_task:
            if self.params.spectrum != "keep":
                for site in self.sites.values():
                    self._intervene(site.branches[-1])
            self._own_branch = {n: s.branches[-1].lowrank() for n, s in self.sites.items()}
            for site in self.sites.values():
                site.merge()

    @torch.no_grad()
    def _intervene(self, branch: LoRABranch) -> None:
        """Replace the branch's factors by the intervened update's (zero-padded to the branch rank when the
        update is rank-deficient); the scale stays, so B holds ``B' / scale``."""
        p = self.params
        new = reshape_spectrum(branch.lowrank(), p.spectrum, power=p.power, norm=p.norm)
        k = new.rank
        branch.B.zero_()
        branch.A.zero_()
        branch.B[:, :k] = (new.B / branch.scale).to(branch.B.dtype)
        branch.A[:k] = new.A.to(branch.A.dtype)

    @hookimpl
    def task_updates(self, model: nn.Module, ctx: TaskContext) -> dict[str, LowRank] | None:
        # SeqLoRA: None, so the harness reports the change of B A across the task.
        return self._own_branch if self.params.fresh_per_task else None

    @hookimpl
    def load_method_state(self, model: nn.Module, state: dict[str, Any], ctx: TaskContext) -> None:
        # SeqLoRA's single branch already exists after configure_model. IncLoRA merged (and so removed) every
        # finished task's branch; before_task adds the next one, so no branch may be live at the checkpoint.
        if self.params.fresh_per_task:
            for site in self.sites.values():
                site.branches = nn.ModuleList()


def register_methods(register: Callable[[type], None]) -> None:
    register(NaiveLoRA)
