"""L2P: Learning to Prompt (Wang et al., CVPR 2022) on the frozen ViT, as implemented in the CODA-Prompt code.

A pool of M prompts P_j (length L) with keys k_j. The query q(x) is the frozen backbone's [CLS] feature with
no prompts. Each image takes the top-N prompts by cosine similarity cos(q(x), k_j); the selected keys are pulled
toward the query by the surrogate loss sum_j (1 - cos(q(x), k_j)) (the query is detached, so only the keys
move; the prompts are trained by the cross-entropy through the prompted pass). The whole pool is shared by all
tasks and trained on every task.

Default (preset ``l2p++``): the L2P++ of GT-RIPL/CODA-Prompt ``models/zoo.py`` (class ``L2P``; Smith et al.,
CODA-Prompt, CVPR 2023): prefix-tuning in block 0 (``--prompt_param 30 20 -1``: pool 30, length 20, top-5),
the L2P the CODA-Prompt, InfLoRA and SD-LoRA tables report. Preset ``original``: the paper's prompt-tuning
(prompt tokens after [CLS], pool 10, length 5, top-5, classifier on the mean of the prompt tokens' outputs,
pull coefficient 0.1 on the batch mean, as in the authors' code github.com/google-research/l2p).

Inference: every test image picks its own prompts from its own query. The original code's optional
batch-wise prompt vote at test time (the most frequent prompt ids of the batch) is not implemented: the common
protocol evaluates each task in its own batches, so a batch vote leaks the task identity; the published L2P++
numbers do not use it.

Deviations: the CODA-Prompt code computes the pull loss as ``(1 - cos_sim[:, k_idx]).sum()``, which indexes
every image's similarities with every image's selected keys (B x B x N terms); here each image pulls its own N
selected keys (the paper's loss). The diversity-by-frequency penalty of the paper's appendix is not used (as in
both official codes' defaults).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clbench import (
    BackboneFacts,
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

PRESETS: dict[str, dict[str, Any]] = {
    # GT-RIPL/CODA-Prompt experiments/*.sh: --learner_name L2P --prompt_param 30 20 -1
    "l2p++": dict(position="prefix", pool_size=30, length=20, top_k=5, key_weight=1.0,
                  key_reduction="sum"),
    # google-research/l2p configs (and its PyTorch port): prompt-tuning, pool 10, length 5, top-5, coeff 0.1
    "original": dict(position="tokens", pool_size=10, length=5, top_k=5, key_weight=0.1,
                     key_reduction="mean"),
}


class L2PParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: Literal["l2p++", "original"] | None = Field(
        "l2p++", description="official configuration filling the params not given explicitly (None: none)")
    position: Literal["prefix", "tokens"] = Field("prefix", description="prefix-tuning in `blocks` (L2P++) or "
                                                                        "prompt tokens after [CLS] (original)")
    pool_size: int = Field(30, ge=1, description="number of prompts M in the pool")
    length: int = Field(20, ge=1, description="prompt length L (prefix: L/2 key rows and L/2 value rows)")
    top_k: int = Field(5, ge=1, description="prompts selected per image N")
    blocks: list[int] | None = Field(None, min_length=1, description="blocks with prefix prompts (default: "
                                                                      "block 0, L2P++ shallow)")
    key_weight: float = Field(1.0, ge=0, description="weight of the key-query pull loss")
    key_reduction: Literal["sum", "mean"] = Field("sum", description="pull loss summed (CODA-Prompt code) or "
                                                                     "averaged (original code) over the batch")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            name = data.get("preset", "l2p++")
            if name is not None:
                data = {**PRESETS[name], **data} if name in PRESETS else data
        return data

    def check_against(self, backbone: BackboneFacts) -> list[str]:
        """``blocks`` names blocks the backbone has, each once (a prompt has no rank to fit)."""
        problems = (backbone.blocks_problem(f, getattr(self, f)) for f in ("blocks",))
        return [p for p in problems if p]

    @model_validator(mode="after")
    def _check(self) -> L2PParams:
        if self.top_k > self.pool_size:
            raise ValueError(f"top_k ({self.top_k}) must not exceed pool_size ({self.pool_size})")
        if self.position == "prefix" and self.length % 2:
            raise ValueError(f"length ({self.length}) must be even for prefix prompts (half keys, half values)")
        return self


class L2PModel(PromptModel):
    """The prompt pool and its keys; ``select`` picks each image's top-N prompts by its own query."""

    def __init__(self, base, p: L2PParams) -> None:
        prefix = p.position == "prefix"
        self.blocks = fit_blocks(p.blocks, [0], len(base.backbone.blocks), "l2p")
        slots = attach(base.backbone, self.blocks if prefix else [], tokens=not prefix)
        super().__init__(base, slots, pool="head" if prefix else "prompts")
        D = base.feature_dim
        self.p = p
        self.keys = uniform_prompt(p.pool_size, D)
        layers = self.blocks if prefix else [0]
        self.prompts = torch.nn.ParameterList([uniform_prompt(p.pool_size, p.length, D) for _ in layers])

    def select(self, q):
        sim = cosine(q, self.keys)  # q is detached (the query pass runs without gradient)
        idx = sim.topk(self.p.top_k, dim=1).indices  # B x N, per image
        aux = {}
        if self.training:
            pull = (1.0 - sim.gather(1, idx)).sum(1)
            aux["key_match"] = pull.sum() if self.p.key_reduction == "sum" else pull.mean()
        if self.p.position == "tokens":
            B, D = q.shape[0], q.shape[1]
            return {}, pick(self.prompts[0], idx).reshape(B, -1, D), aux
        return {b: split_prefix(pick(self.prompts[i], idx)) for i, b in enumerate(self.blocks)}, None, aux


class L2P(PromptMethod, Method):
    name = "l2p"
    paper = ("Wang et al., Learning to Prompt for Continual Learning, CVPR 2022; L2P++ as in Smith et al., "
             "CODA-Prompt, CVPR 2023")
    code = "github.com/google-research/l2p; github.com/GT-RIPL/CODA-Prompt (models/zoo.py)"
    Params = L2PParams

    def build(self, model, ctx):
        return L2PModel(model, self.params)

    @hookimpl
    def param_groups(self, model, ctx):
        return [{"params": [model.keys, *model.prompts], "name": "prompts"}]


def register_methods(register):
    register(L2P)
