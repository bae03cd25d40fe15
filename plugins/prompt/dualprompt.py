"""DualPrompt (Wang et al., ECCV 2022) on the frozen ViT, as implemented in the CODA-Prompt code.

Two kinds of prefix prompts (prefix-tuning: a prompt of length L gives L/2 key rows and L/2 value rows):

* **G-prompts** (general, task-invariant), one per block in ``g_blocks`` (default blocks 0 and 1, length 6),
  shared by all tasks and trained on every task;
* **E-prompts** (expert, task-specific), a pool of one prompt and one key per task in each block of
  ``e_blocks`` (default blocks 2, 3, 4, length 20). Training on task t uses E-prompt t (the task identity is
  known in training) and pulls key t toward the queries, ``sum (1 - cos(q(x), k_t))``, in every E-block. At test
  time each image picks, per E-block, the E-prompt whose key is closest to its own query (top-1).

Defaults: GT-RIPL/CODA-Prompt ``models/zoo.py`` (class ``DualPrompt``) with ``--prompt_param 10 20 6`` (pool
size = number of tasks, E length 20, G length 6), the DualPrompt the CODA-Prompt, InfLoRA and SD-LoRA tables
report. The pool size defaults to the stream's number of tasks.

Inference maps onto the common protocol unchanged: per-image key matching, no batch statistics.

Deviations: none in the algorithm. As in the official code the optimizer holds the whole E-pool; other tasks'
E-prompts and keys get zero gradient (so, with the protocols' zero weight decay, they do not move).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clbench import (
    BackboneFacts,
    ClbenchError,
    Method,
    PromptMethod,
    PromptModel,
    attach,
    cosine,
    fit_blocks,
    hookimpl,
    pick,
    split_prefix,
    uniform_prompt,
)


class DualPromptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    g_blocks: list[int] | None = Field(None, description="blocks with G-prompts (default: official 0, 1; on a "
                                                         "backbone of depth n, those below n - 1)")
    e_blocks: list[int] | None = Field(None, min_length=1, description="blocks with E-prompts (default: official "
                                                                       "2, 3, 4; those below the depth, else the last)")
    g_length: int = Field(6, ge=0, description="G-prompt length (official 6; half keys, half values)")
    e_length: int = Field(20, ge=2, description="E-prompt length (official 20; half keys, half values)")
    pool_size: int | None = Field(None, ge=1, description="E-prompt pool size (default: the number of tasks)")
    key_weight: float = Field(1.0, ge=0, description="weight of the key-query matching loss (summed over "
                                                     "the batch and the E-blocks, as in the official code)")

    def check_against(self, backbone: BackboneFacts) -> list[str]:
        """``g_blocks`` and ``e_blocks`` name blocks the backbone has, each once (a prompt has no rank to fit)."""
        problems = (backbone.blocks_problem(f, getattr(self, f)) for f in ("g_blocks", "e_blocks"))
        return [p for p in problems if p]

    @model_validator(mode="after")
    def _check(self) -> DualPromptParams:
        if self.g_length % 2 or self.e_length % 2:
            raise ValueError("g_length and e_length must be even (half key rows, half value rows)")
        return self


class DualPromptModel(PromptModel):
    def __init__(self, base, p: DualPromptParams, num_tasks: int) -> None:
        pool = p.pool_size or num_tasks
        if pool < num_tasks:
            raise ClbenchError(f"dualprompt: pool_size {pool} is smaller than the stream's {num_tasks} tasks")
        depth = len(base.backbone.blocks)
        self.e_blocks = fit_blocks(p.e_blocks, [2, 3, 4], depth, "dualprompt e_blocks")
        self.g_blocks = (fit_blocks(p.g_blocks, [], depth, "dualprompt g_blocks") if p.g_blocks is not None
                         else [b for b in (0, 1) if b < min(self.e_blocks)])
        super().__init__(base, attach(base.backbone, sorted(set(self.g_blocks) | set(self.e_blocks))))
        D = base.feature_dim
        self.p = p
        self.g = torch.nn.ParameterList([uniform_prompt(p.g_length, D) for _ in self.g_blocks])
        self.e = torch.nn.ParameterList([uniform_prompt(pool, p.e_length, D) for _ in self.e_blocks])
        self.e_keys = torch.nn.ParameterList([uniform_prompt(pool, D) for _ in self.e_blocks])

    def select(self, q):
        B = q.shape[0]
        prefixes, aux = {}, {}
        pull = q.new_zeros(())
        for i, b in enumerate(self.e_blocks):
            sim = cosine(q, self.e_keys[i])
            if self.training:  # the training task's E-prompt (task identity is given in training)
                idx = torch.full((B,), self.task, dtype=torch.long, device=q.device)
                pull = pull + (1.0 - sim[:, self.task]).sum()
            else:  # each image's own top-1 key
                idx = sim.argmax(1)
            prefixes[b] = split_prefix(pick(self.e[i], idx))
        for i, b in enumerate(self.g_blocks):
            gk, gv = split_prefix(self.g[i].expand(B, -1, -1))
            if b in prefixes:  # official order: E-prompt rows first, then G-prompt rows
                ek, ev = prefixes[b]
                gk, gv = torch.cat([ek, gk], 1), torch.cat([ev, gv], 1)
            prefixes[b] = (gk, gv)
        if self.training:
            aux["key_match"] = pull
        return prefixes, None, aux


class DualPrompt(PromptMethod, Method):
    name = "dualprompt"
    paper = "Wang et al., DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning, ECCV 2022"
    code = "github.com/google-research/l2p (DualPrompt); github.com/GT-RIPL/CODA-Prompt (models/zoo.py)"
    Params = DualPromptParams

    def build(self, model, ctx):
        return DualPromptModel(model, self.params, ctx.num_tasks)

    @hookimpl
    def param_groups(self, model, ctx):
        return [{"params": [*model.g, *model.e, *model.e_keys], "name": "prompts"}]


def register_methods(register):
    register(DualPrompt)
