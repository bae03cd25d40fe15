"""Naive sequential LoRA (SeqLoRA) and IncLoRA: the baselines every continual-LoRA method is compared to.

* ``lora`` (default): one LoRA per adapted layer, trained through all tasks with no constraint. This is the
  SeqLoRA baseline of O-LoRA (Wang et al., EMNLP Findings 2023, arXiv 2310.14152; github.com/cmnfriend/O-LoRA:
  the same code with lambda1 = lambda2 = 0 and a single LoRA) applied to a ViT as in METHODS.md section 4.1.
* ``fresh_per_task: true`` (IncLoRA): a new LoRA per task, merged into the base weights after the task.

LoRA itself: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022
(github.com/microsoft/LoRA); A Kaiming-uniform, B zero, delta W = (alpha / r) B A.

The task update reported for spectra is the change of the factor product across the task,
``B_t A_t - B_{t-1} A_{t-1}`` (factors ``[B_t, -B_{t-1}] [A_t; A_{t-1}]``).

Deviations: targets default to q and v of every block (InfLoRA/SD-LoRA protocol, r = 10) rather than the
PEFT/T5 defaults; no LoRA dropout by default (the ViT protocols use none).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from clbench.hookspecs import hookimpl
from clbench.lora import LowRank, inject
from clbench.method import Method


class LoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(10, ge=1, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, description="scaling alpha (delta W = alpha/r B A); default alpha = r")
    targets: list[str] = Field(["q", "v"], min_length=1, description="adapted maps: q, k, v, qkv, proj, fc1, fc2")
    blocks: list[int] | None = Field(None, description="adapted transformer blocks (default: all)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    fresh_per_task: bool = Field(False, description="IncLoRA: a new LoRA per task, merged after the task")


class NaiveLoRA(Method):
    name = "lora"
    aliases = ("seqlora",)
    paper = "Hu et al., LoRA, ICLR 2022; SeqLoRA baseline as in Wang et al., O-LoRA, EMNLP Findings 2023"
    code = "github.com/microsoft/LoRA; github.com/cmnfriend/O-LoRA"
    Params = LoRAParams

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.sites = {}
        self._before: dict[str, LowRank] = {}
        self._task_update: dict[str, LowRank] = {}

    def _new_branches(self) -> None:
        p = self.params
        scale = (p.alpha or p.rank) / p.rank
        for site in self.sites.values():
            site.add_branch(p.rank, scale=scale, dropout=p.dropout)

    @hookimpl
    def configure_model(self, model, ctx):
        self.sites = inject(model.backbone, self.params.targets, self.params.blocks)
        self._new_branches()

    @hookimpl
    def before_task(self, model, ctx):
        if self.params.fresh_per_task and ctx.task > 0:
            self._new_branches()
        self._before = {n: s.update() for n, s in self.sites.items()}

    @hookimpl
    def param_groups(self, model, ctx):
        live = [p for s in self.sites.values() for p in s.branches[-1].parameters()]
        return [{"params": live, "name": "lora"}]

    @hookimpl
    def after_task(self, model, ctx):
        if self.params.fresh_per_task:  # the task's own branch is its update (no zero half of rank r)
            self._task_update = {n: s.branches[-1].lowrank() for n, s in self.sites.items()}
        else:
            self._task_update = {n: s.update() - self._before[n] for n, s in self.sites.items()}

    @hookimpl
    def merge_task(self, model, ctx):
        if self.params.fresh_per_task:
            for site in self.sites.values():
                site.merge()

    @hookimpl
    def task_updates(self, model, ctx):
        return self._task_update

    @hookimpl
    def load_method_state(self, model, state, ctx):
        # SeqLoRA's single branch already exists after configure_model. IncLoRA merged (and so removed) every
        # finished task's branch; before_task adds the next one, so no branch may be live at the checkpoint.
        if self.params.fresh_per_task:
            for site in self.sites.values():
                site.branches = nn.ModuleList()


def register_methods(register):
    register(NaiveLoRA)
