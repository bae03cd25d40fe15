"""CODA-Prompt (Smith et al., CVPR 2023): attention-based decomposed prompts on the frozen ViT.

In each block of ``blocks`` (official: 0-4) a pool of M prompt components P_m (length L) with keys K_m and
attention vectors A_m. For the query q = q(x) (the frozen backbone's [CLS] feature, no prompts), the weight of
component m is ``alpha_m = cos(q * A_m, K_m)`` (element-wise attention on the query, then cosine with the key),
and the prompt is the weighted sum ``P = sum_m alpha_m P_m``, used as prefix keys (first L/2 rows) and values.
Everything is differentiable end to end: the cross-entropy trains the components, keys and attention.

Continual: the pool is split into equal chunks, one per task. Task t trains only chunk t; chunks of earlier tasks
are frozen and still used (weighted by their own alpha), later chunks are not used yet. At the start of task t
its chunk is re-initialised orthogonal to every earlier component (Gram-Schmidt), for P, K and A alike.
Optional orthogonality penalty ``ortho_mu * mean((C C^T - I)^2)`` on the components used (official scripts: 0).

Defaults: GT-RIPL/CODA-Prompt ``models/zoo.py`` (class ``CodaPrompt``) with ``--prompt_param 100 8 0.0``
(pool 100, length 8, no penalty), the configuration of the paper's tables (ImageNet-R, CIFAR-100, DomainNet).

Inference: per-image weights from the image's own query; nothing depends on the batch or the task identity.

Deviations: the official code Gram-Schmidts new components against the earlier components as they are after
training (no longer orthonormal), so the result is only approximately orthogonal to them; here new components
are projected off the exact span of all earlier ones (QR), then orthonormalised, so they are exactly orthogonal.
When the pool exceeds the dimension (tiny CPU backbones), components beyond the available dimensions are
random unit vectors. Frozen chunks are separate parameters outside the optimizer rather than detached rows of
one tensor inside it (identical with zero weight decay, and exact with any).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clbench import (
    BackboneFacts,
    ClbenchError,
    Method,
    PromptMethod,
    PromptModel,
    StepBatch,
    attach,
    fit_blocks,
    hookimpl,
    split_prefix,
)


class CodaPromptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool_size: int = Field(100, ge=1, description="prompt components M in each block, split equally over tasks")
    length: int = Field(8, ge=2, description="prompt length L (half prefix keys, half prefix values)")
    blocks: list[int] | None = Field(None, min_length=1, description="blocks with prompts (default: official "
                                                                      "0-4, those the backbone has)")
    ortho_mu: float = Field(0.0, ge=0, description="weight of the orthogonality penalty (official scripts: 0)")

    def check_against(self, backbone: BackboneFacts) -> list[str]:
        """``blocks`` names blocks the backbone has, each once (a prompt has no rank to fit)."""
        problems = (backbone.blocks_problem(f, getattr(self, f)) for f in ("blocks",))
        return [p for p in problems if p]

    @model_validator(mode="after")
    def _check(self) -> CodaPromptParams:
        if self.length % 2:
            raise ValueError(f"length ({self.length}) must be even (half key rows, half value rows)")
        return self


def orthogonal_rows(n: int, old: torch.Tensor) -> torch.Tensor:
    """``n`` random unit rows orthogonal to every row of ``old`` (k x d) and to each other, as far as the
    dimension d allows; rows beyond it are random unit vectors."""
    d = old.shape[1]
    v = torch.randn(n, d, dtype=torch.float64)
    if old.shape[0]:
        q, _ = torch.linalg.qr(old.double().T)  # d x k: orthonormal basis of the old rows' span
        v = v - (v @ q) @ q.T
    room = min(n, d - min(d, old.shape[0]))
    if room:
        basis, _ = torch.linalg.qr(v[:room].T)  # orthonormalise the first `room` rows among themselves
        v[:room] = basis.T
    return F.normalize(v, dim=1).float()


class CodaModel(PromptModel):
    def __init__(self, base, p: CodaPromptParams, num_tasks: int) -> None:
        per_task = p.pool_size // num_tasks
        if per_task < 1:
            raise ClbenchError(f"codaprompt: pool_size {p.pool_size} gives no component per task for "
                               f"{num_tasks} tasks; set pool_size >= {num_tasks}")
        self.blocks = fit_blocks(p.blocks, [0, 1, 2, 3, 4], len(base.backbone.blocks), "codaprompt")
        super().__init__(base, attach(base.backbone, self.blocks))
        D = base.feature_dim
        self.p, self.per_task = p, per_task

        def chunks(*shape: int) -> torch.nn.ParameterList:
            return torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(per_task, *shape))
                                           for _ in range(num_tasks)])

        # [block][task] -> (per_task x L x D), (per_task x D), (per_task x D)
        self.P = torch.nn.ModuleList([chunks(p.length, D) for _ in self.blocks])
        self.K = torch.nn.ModuleList([chunks(D) for _ in self.blocks])
        self.A = torch.nn.ModuleList([chunks(D) for _ in self.blocks])

    def components(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P, K, A of block slot ``i`` over tasks 0..task (earlier chunks frozen: no gradient reaches them)."""
        t = self.task + 1
        return (torch.cat(list(self.P[i][:t])), torch.cat(list(self.K[i][:t])), torch.cat(list(self.A[i][:t])))

    def start_task(self, t: int) -> None:
        """Re-initialise chunk t orthogonal to every earlier component; train only chunk t."""
        with torch.no_grad():
            for group in (self.P, self.K, self.A):
                for chunks in group:
                    new = chunks[t]
                    old = torch.cat([c.detach().flatten(1) for c in chunks[:t]]) if t else new.new_zeros(
                        0, new[0].numel())
                    new.copy_(orthogonal_rows(self.per_task, old.cpu()).view_as(new))
                    for j, c in enumerate(chunks):
                        c.requires_grad_(j == t)

    def select(self, q):
        prefixes, ortho = {}, q.new_zeros(())
        for i, b in enumerate(self.blocks):
            P, K, A = self.components(i)
            alpha = torch.einsum("bkd,kd->bk", F.normalize(q[:, None, :] * A[None], dim=2), F.normalize(K, dim=1))
            prefixes[b] = split_prefix(torch.einsum("bk,kld->bld", alpha, P))
            if self.training and self.p.ortho_mu > 0:
                for c in (K, A, P.flatten(1)):
                    eye = torch.eye(c.shape[0], device=c.device)
                    ortho = ortho + self.p.ortho_mu * ((c @ c.T - eye) ** 2).mean()
        return prefixes, None, ({"ortho": ortho} if self.training and self.p.ortho_mu > 0 else {})


class CodaPrompt(PromptMethod, Method):
    name = "codaprompt"
    aliases = ("coda-prompt", "coda")
    paper = ("Smith et al., CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free "
             "Continual Learning, CVPR 2023")
    code = "github.com/GT-RIPL/CODA-Prompt (models/zoo.py)"
    Params = CodaPromptParams

    def build(self, model, ctx):
        return CodaModel(model, self.params, ctx.num_tasks)

    @hookimpl
    def before_task(self, model, ctx):
        model.task = ctx.task
        model.start_task(ctx.task)

    @hookimpl
    def param_groups(self, model, ctx):
        t = ctx.task
        return [{"params": [g[i][t] for g in (model.P, model.K, model.A) for i in range(len(g))],
                 "name": "prompts"}]

    @hookimpl
    def loss_terms(self, step: StepBatch):
        return {"ortho": step.aux["ortho"]} if "ortho" in step.aux else None


def register_methods(register):
    register(CodaPrompt)
