"""SD-LoRA: scalable decoupled low-rank adaptation, with its SD-LoRA-RR and SD-LoRA-KD variants.

Paper: Yichen Wu, Hongming Piao, Long-Kai Huang, Renzhen Wang, Wanhua Li, Hanspeter Pfister, Deyu Meng, Kede
Ma, Ying Wei, "SD-LoRA: Scalable Decoupled Low-Rank Adaptation for Class Incremental Learning", ICLR 2025
(arXiv 2501.13198). Official code: github.com/WuYichen-97/SD-Lora-CL (``backbone/lora.py``
``_LoRA_qkv_timm_train`` / ``LoRA_ViT_timm``, ``models/sdlora.py``, ``exps/sdlora_*.json``). The algorithm in
our words, every deviation and the hyperparameter table: docs/METHODS.md section 6.

The rule, per adapted site (default the q and v slices of every block's fused qkv, r = 10) while training
task t (0-based), exactly as the official forward pass:

    delta W = sum_{i < t} alpha_i * B_i A_i / (||B_i||_F ||A_i||_F)  +  alpha_t * B_t A_t

* ``B_i A_i`` of a finished task is frozen; divided by its norm it is that task's *direction*. The current
  task's pair (A Kaiming-uniform, B zero) trains un-normalised (normalising a zero B would divide by zero).
* ``alpha_0 .. alpha_t`` are learnable scalars, **one per task shared by every site** (all blocks, q and v);
  all of them train during task t. The official code re-creates every alpha at 0.8 when it builds the network
  for a new task (``reset_magnitudes: true``, default); ``false`` carries the learned values over instead.
* A finished task's direction is normalised when the next task starts, so the evaluation after task t sees
  the model exactly as it was trained (the official code evaluates before rebuilding its network).
* ``normalize: factors`` (official code) divides by ``||B||_F ||A||_F``; ``product`` divides by
  ``||B A||_F``, the paper's Eq. (3).

Variants (paper section 3.5, Algorithm 1):

* **SD-LoRA-RR** (``rank_reduction: true``): task t trains a rank ``r_t`` pair, with the rank stepping down at
  the 0-based tasks ``rr_tasks`` (default 4 and 8) to ``rr_ranks`` (default 8 and 6): the commented lines of the
  official ``update_network`` (``_cur_task >= 4``: 8, ``>= 8``: 6) and the paper's mu = 4, nu = 8.
* **SD-LoRA-KD** (``kd: true``): after task t >= 1, per site, least squares fits the new direction
  ``D_t`` with the earlier directions ``D_k``: ``min ||D_t - sum_k beta_k D_k||_F``. If the residual is at most
  ``kd_threshold`` (tau = 9e-4, paper), the new pair is dropped and its term is absorbed into the earlier
  magnitudes of that site: ``alpha_k + c_t beta_k`` with ``c_t = alpha_t n_t`` the coefficient of ``D_t`` in
  the trained model (``n_t`` the new pair's norm), so the update changes by at most ``|c_t| tau`` (Frobenius). The
  alphas are shared across sites but the fit is per site, so the absorbed part is a fixed per-site offset
  added to the shared learnable alpha (as LibContinual's reimplementation does). The official repository has
  no KD code; the paper writes ``alpha_k + beta_k`` (Eq. 8), which equals ours when ``c_t = 1``.

Task updates (for spectra and the contract): the *change of the whole adapter update across task t*,

    Delta_t = sum_i (c_i^(t) - c_i^(t-1)) B_i A_i

over every live direction of the site, with ``c_i^(t)`` the coefficient of ``B_i A_i`` in the model evaluated
after task t (``alpha_i / n_i`` for a finished direction, ``alpha_t`` for the new one, 0 before it existed). It
includes the change of the old tasks' magnitudes (their re-learning and, with the official reset, the jump to
0.8 and to the normalised form at the task's start), as factors ``[delta_i B_i] [A_i]`` of rank sum r_i. Exactly
zero coefficient changes are left out.

Nothing is merged into the base weights for good: every old magnitude keeps training, so each task's branch
stays live. The official code runs t + 1 branches per site at task t; here the t frozen pairs of a site are
folded into one factor pair with the magnitudes as a diagonal (:func:`folded_sum`), or, once that costs more
than a dense product (:func:`merge_pays`, a multiply-add count per call), the site's whole update
``B diag(g) A + alpha_t B_t A_t`` is multiplied out once per step and added to the site's rows of the base weight
for that step (:func:`folded_weight`), so every token costs one matmul at any t. Either way equal to the
per-branch sum up to float rounding (tested), and the branches stay separate modules (state dict, task updates,
KD and resume unchanged). The magnitudes are one parameter vector with one entry per task (:class:`Magnitudes`),
so the optimizer's step does not grow with t either.

Presets per benchmark: the official configs differ only in training settings, never in the method's params
(rank 10 on q and v, alphas from 0.8 everywhere), so there is no ``preset`` param; the suites in
``suites/repro/`` hold each official protocol (SGD, momentum 0.9, constant lr, 20 epochs, batch 128, no weight
decay, the timm ``vit_base_patch16_224.augreg2_in21k_ft_in1k`` backbone, the official class order):

==========================  =======  ======  ==========================================
suite                       tasks    lr      reference (official log; paper)
==========================  =======  ======  ==========================================
sdlora-cifar100             10       8e-3    C100.log; paper Table 6
sdlora-imagenet-r-5         5        1e-2    InR-T5.log; paper Table 2
sdlora-imagenet-r-10        10       8e-3    InR-T20.log (10 tasks); paper Table 2
sdlora-imagenet-r-20        20       1e-2    InR-T10.log (20 tasks); paper Table 2
==========================  =======  ======  ==========================================

Deviations (details in docs/METHODS.md section 6): SD-LoRA-KD, which has no official code, absorbs ``c_t beta_k``
rather than the paper's literal ``beta_k`` (function-preserving) as per-site offsets; RR uses the code's 0-based
task indices; ``normalize: product`` and ``reset_magnitudes: false`` are options beyond the official code; the
official unused orthogonality loss is not computed; a branch computes ``((x A^T) B^T) (alpha / n)`` where the
official code computes ``alpha (B (A x)) / n`` (equal up to float rounding); the finished pairs of a site run
folded into one factor pair (or, past the break-even, the whole update added to the base weight for the step)
instead of one branch each (equal up to float rounding; the official forward's cost grows with the number of
tasks, this one's stops growing); the magnitudes are entries of one vector, not one parameter each.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from clbench import BlockList, ClbenchError, LoRABranch, LoRASite, LowRank, Method, hookimpl, inject


class Magnitudes(nn.Module):
    """The per-task magnitudes alpha_0 .. alpha_t, shared by every site (one registered copy in the model), held as
    one parameter vector with one entry per task (``values``), which grows by one entry per task.

    One tensor rather than one parameter per task: every element is updated by the same elementwise optimizer
    rule as a separate scalar would be, but the optimizer's step, the gradient bookkeeping and every site's read
    cost the same at task 50 as at task 2 (measured: Adam over t one-element parameters costs about 15 us per
    parameter per step on one CPU thread, a visible part of the micro ViT's step at t = 50)."""

    def __init__(self) -> None:
        super().__init__()
        self.values = nn.Parameter(torch.zeros(0))

    def append(self, value: float, device: torch.device) -> None:
        """One more task's magnitude (a new parameter object: the optimizer is built after it, per task)."""
        with torch.no_grad():
            grown = torch.cat([self.values.detach().to(device), torch.full((1,), value, device=device)])
        self.values = nn.Parameter(grown)

    def current(self) -> torch.Tensor:
        """Every alpha as one tensor (task order)."""
        return self.values

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, task: int) -> torch.Tensor:
        """alpha_task, shape (1,): a view of the vector (in-place writes reach the parameter)."""
        return self.values[task:task + 1]


class SDBranch(LoRABranch):
    """``delta(x) = ((alpha_task + offset) / norm) * B A x``.

    ``alpha_task`` lives in the shared :class:`Magnitudes`; ``norm`` (1 while the task trains, the direction's
    norm once it is frozen) and ``offset`` (SD-LoRA-KD's absorbed coefficients, else 0) are buffers, so they
    travel with the model's state dict. Dividing by 1 and adding 0 are exact, so the training-time branch is
    exactly ``alpha_t B A x``.
    """

    def __init__(self, d_in: int, d_out: int, rank: int, task: int, bank: Magnitudes) -> None:
        super().__init__(d_in, d_out, rank, scale=1.0)
        self.task = task
        object.__setattr__(self, "_bank", bank)  # not a submodule: the bank is registered once, in the backbone
        self.register_buffer("norm", torch.ones(1))
        self.register_buffer("offset", torch.zeros(1))

    @property
    def frozen(self) -> bool:
        return not self.B.requires_grad

    def coefficient(self) -> torch.Tensor:
        """The scalar multiplying ``B A`` in the model, shape (1,)."""
        return (self._bank[self.task] + self.offset) / self.norm

    def effective_B(self) -> torch.Tensor:
        return self.B * self.coefficient()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.dropout(x) @ self.A.t()) @ self.B.t()) * self.coefficient()


def folded_sum(site: LoRASite, x: torch.Tensor) -> torch.Tensor:
    """The site's update of ``x`` with every frozen pair folded into one factor pair (``LoRASite.combine``).

    The frozen pairs concatenated, ``A = [A_0; ..; A_k]`` (R x d_in) and ``B = [B_0 .. B_k]`` (d_out x R), and
    their coefficients ``(alpha_task + offset) / norm`` repeated over each pair's rank as a diagonal ``g``, give
    ``sum_i c_i B_i A_i x = B diag(g) A x``: one factor pair per site instead of one branch per finished task,
    equal to the per-branch sum up to float rounding, with gradients to the shared magnitudes through ``g``. The
    concatenations are cached (outside the state dict) and rebuilt whenever a frozen pair, its norm or its offset
    changes (a tensor's version counter moves with every in-place write: freezing, KD, loading a checkpoint).
    The training pair keeps its own branch (its factors train). Past the break-even of :func:`merge_pays`,
    :func:`folded_weight` adds the whole update into the base weight instead and this is not called."""
    fold = _fold_of(site)
    out = None
    if fold.frozen:
        out = ((x @ fold.A.t()) * fold.coefficients()) @ fold.B.t()
    for b in fold.train:
        out = b(x) if out is None else out + b(x)
    return out


def merge_pays(tokens: int, d_in: int, d_out: int, frozen_rank: int, train_rank: int, grad: bool) -> bool:
    """Whether one dense update per step, ``W0 + B diag(g) A`` (every pair of the site, multiplied out) applied
    by the base weight's matmul, costs fewer multiply-adds than the low-rank products per token.

    Low rank: per token the frozen pairs cost ``R (d_in + d_out)`` forward and as much again backward (A, B
    frozen: the input gradient only), the training pair ``r (d_in + d_out)`` forward and twice that backward
    (input and both factors). Dense: the product costs ``d_in d_out`` per rank once per step (forward, and
    again backward for the magnitudes' and factors' gradients), plus the gradient of the site's weight rows,
    ``d_in d_out`` per token, without which the magnitudes get none. Without gradients (evaluation) only the
    forward terms count. The per-token matmul by the base weight is paid either way."""
    if grad:
        low = tokens * (d_in + d_out) * (2 * frozen_rank + 3 * train_rank)
        dense = tokens * d_in * d_out + d_in * d_out * (2 * frozen_rank + 3 * train_rank)
    else:
        low = tokens * (d_in + d_out) * (frozen_rank + train_rank)
        dense = d_in * d_out * (frozen_rank + train_rank)
    return dense < low


def folded_weight(site: LoRASite, x: torch.Tensor) -> tuple[torch.Tensor, None] | None:
    """``LoRASite.fold_weight``: the site's whole update as one dense ``d_out x d_in`` matrix,
    ``B diag(g) A`` over the frozen pairs (as :func:`folded_sum`) plus ``alpha_t B_t A_t`` of the training pair,
    for the owner to add to the site's rows of the base weight, when :func:`merge_pays`; else None (the low-rank
    path, :func:`folded_sum`). One matmul per token then serves every task's pair, and the step's cost stops
    growing with t except for the product, ``d_out d_in`` per rank per step. Equal to the per-branch sum up to
    float rounding (within 1e-6 in float32, values and gradients; tested)."""
    fold = _fold_of(site)
    tokens = x.numel() // x.shape[-1]
    if not merge_pays(tokens, site.d_in, site.d_out, fold.frozen_rank, fold.train_rank, torch.is_grad_enabled()):
        return None
    delta = None
    if fold.frozen:
        delta = (fold.B * fold.coefficients()) @ fold.A
    for b in fold.train:
        part = (b.B * b.coefficient()) @ b.A
        delta = part if delta is None else delta + part
    return delta, None


class _Fold:
    """A site's pairs as the fold uses them: the frozen ones concatenated, the training ones, their ranks. Cached
    on the site (a plain attribute: never in the state dict or a checkpoint) and rebuilt when the branch list
    changes or a watched tensor is written in place (a tensor's version counter moves with every in-place write:
    freezing, KD, loading a checkpoint) or moved. Checking costs one version read per watched tensor, not a module
    attribute walk per branch, so a step at task 50 does not pay for the fifty branches in Python."""

    def __init__(self, branches: tuple[SDBranch, ...]) -> None:
        self.branches = branches
        self.frozen = [b for b in branches if b.frozen]
        self.train = [b for b in branches if not b.frozen]
        self.frozen_rank = sum(b.rank for b in self.frozen)
        self.train_rank = sum(b.rank for b in self.train)
        self.watched = [t for b in self.frozen for t in (b.A, b.B, b.offset)] + [b.norm for b in branches]
        self.versions = self.stamp()
        if self.frozen:
            with torch.inference_mode(False), torch.no_grad():  # built during evaluation, used in training too
                self.A = torch.cat([b.A for b in self.frozen])
                self.B = torch.cat([b.B for b in self.frozen], 1)
                ranks = torch.tensor([b.rank for b in self.frozen], device=self.A.device)
                self.tasks = torch.tensor([b.task for b in self.frozen], device=self.A.device).repeat_interleave(ranks)
                self.offset = torch.cat([b.offset for b in self.frozen]).repeat_interleave(ranks)
                self.norm = torch.cat([b.norm for b in self.frozen]).repeat_interleave(ranks)

    def stamp(self) -> tuple[int, ...]:
        return (*(t._version for t in self.watched), self.watched[0].data_ptr() if self.watched else 0)

    def coefficients(self) -> torch.Tensor:
        """``g`` (R,): each frozen pair's ``(alpha_task + offset) / norm`` over its rank, with the magnitudes' graph."""
        return (self.frozen[0]._bank.current()[self.tasks] + self.offset) / self.norm


def _fold_of(site: LoRASite) -> _Fold:
    branches = tuple(site.branches)
    fold = site.__dict__.get("_sdlora_fold")
    if fold is None or fold.branches != branches or fold.versions != fold.stamp():
        fold = _Fold(branches)
        site.__dict__["_sdlora_fold"] = fold
    return fold


def direction_norm(B: torch.Tensor, A: torch.Tensor, rule: str) -> torch.Tensor:
    """``||B||_F ||A||_F`` (``factors``, official code) or ``||B A||_F`` (``product``, paper Eq. 3), float64,
    computed from the r x r Gram products so the d_out x d_in product is never formed."""
    B, A = B.detach().double(), A.detach().double()
    if rule == "factors":
        return B.norm() * A.norm()
    return ((B.t() @ B) * (A @ A.t())).sum().clamp_min(0).sqrt()


def fit_direction(old: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  new: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Least squares ``min_beta ||D_new - sum_k beta_k D_k||_F`` with ``D = B A / n`` given as (B, A, n).

    Works on Frobenius inner products ``<B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T))`` (r x r), float64.
    Returns beta (k,) and the residual norm."""
    def inner(p, q) -> torch.Tensor:
        (Bp, Ap, np_), (Bq, Aq, nq) = p, q
        return ((Bp.t() @ Bq) * (Ap @ Aq.t())).sum() / (np_ * nq)

    def f64(p) -> tuple[torch.Tensor, ...]:
        B, A, n = p
        return B.detach().double(), A.detach().double(), torch.as_tensor(n).detach().double().reshape(())

    parts = [f64(p) for p in old]
    new = f64(new)
    G = torch.stack([torch.stack([inner(p, q) for q in parts]) for p in parts])
    b = torch.stack([inner(p, new) for p in parts])
    beta = torch.linalg.lstsq(G, b[:, None], driver="gelsd").solution[:, 0]
    r2 = inner(new, new) - 2 * (b @ beta) + beta @ G @ beta
    return beta, math.sqrt(max(0.0, float(r2)))


class SDLoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(10, ge=1, description="rank r of each task's pair (official 10; r_1 of SD-LoRA-RR)")
    targets: list[str] = Field(["q", "v"], min_length=1, description="adapted maps: q, k, v, qkv, proj, fc1, fc2 "
                                                                     "(official: q and v)")
    blocks: BlockList | None = Field(None, description="adapted transformer blocks, counted from 0 (default: all)")
    init_magnitude: float = Field(0.8, description="initial value of every magnitude alpha (official code 0.8; "
                                                   "the paper's analysis uses 1)")
    reset_magnitudes: bool = Field(True, description="re-initialise every alpha at each task's start (official "
                                                     "code); false carries the learned alphas over")
    normalize: Literal["factors", "product"] = Field(
        "factors", description="direction norm: ||B|| ||A|| (factors, official code) or ||B A|| (product, paper)")
    rank_reduction: bool = Field(False, description="SD-LoRA-RR: smaller ranks rr_ranks from the tasks rr_tasks on")
    rr_tasks: list[int] = Field([4, 8], description="SD-LoRA-RR: 0-based tasks at which the rank steps down "
                                                    "(official 4 and 8)")
    rr_ranks: list[int] = Field([8, 6], description="SD-LoRA-RR: the ranks from those tasks on (official 8, 6)")
    kd: bool = Field(False, description="SD-LoRA-KD: absorb a new direction that earlier ones fit within "
                                        "kd_threshold into their magnitudes")
    kd_threshold: float = Field(9e-4, ge=0, description="SD-LoRA-KD: residual threshold tau (paper 9e-4)")

    @model_validator(mode="after")
    def _schedule(self) -> SDLoRAParams:
        if len(self.rr_tasks) != len(self.rr_ranks):
            raise ValueError(f"rr_tasks {self.rr_tasks} and rr_ranks {self.rr_ranks} must have the same length")
        if self.rr_tasks != sorted(set(self.rr_tasks)) or min(self.rr_tasks, default=1) < 1:
            raise ValueError(f"rr_tasks {self.rr_tasks} must be increasing task indices >= 1")
        if min(self.rr_ranks, default=1) < 1:
            raise ValueError(f"rr_ranks {self.rr_ranks} must be >= 1")
        if self.rank_reduction and max(self.rr_ranks, default=0) > self.rank:
            # reduced ranks: so the rank limit checked on `rank` (clbench.run.preflight) covers every task's pair
            raise ValueError(f"rr_ranks {self.rr_ranks} must not exceed rank {self.rank} (they reduce it)")
        return self

    def rank_at(self, task: int) -> int:
        """r_t: the rank of task t's pair."""
        rank = self.rank
        if self.rank_reduction:
            for start, reduced in zip(self.rr_tasks, self.rr_ranks):
                if task >= start:
                    rank = reduced
        return rank


class SDLoRA(Method):
    name = "sdlora"
    aliases = ("sd_lora",)
    paper = ("Wu et al., SD-LoRA: Scalable Decoupled Low-Rank Adaptation for Class Incremental Learning, "
             "ICLR 2025")
    code = "github.com/WuYichen-97/SD-Lora-CL"
    Params = SDLoRAParams

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.sites: dict[str, LoRASite] = {}
        self.bank: Magnitudes | None = None
        self.tasks_done = 0
        self.prev_coef: dict[str, dict[int, torch.Tensor]] = {}  # site -> task -> coefficient after last task
        self.absorbed: list[dict[str, Any]] = []  # SD-LoRA-KD decisions: task, site, residual, beta
        self._task_update: dict[str, LowRank] = {}

    # -- structure ---------------------------------------------------------------------------------
    @hookimpl
    def configure_model(self, model, ctx):
        try:
            self.sites = inject(model.backbone, self.params.targets, self.params.blocks)
        except ValueError as exc:
            raise ClbenchError(f"sdlora: {exc}") from None
        self.bank = Magnitudes()
        model.backbone.sdlora_magnitudes = self.bank  # registered once, so the state dict carries the alphas
        for site in self.sites.values():
            site.combine = folded_sum  # finished pairs as one factor pair per site
            site.fold_weight = folded_weight  # past the break-even: all pairs in the base weight's one matmul

    def _device(self) -> torch.device:
        return next(iter(self.sites.values())).weight.device

    def _add_branch(self, site: LoRASite, task: int, rank: int) -> SDBranch:
        branch = SDBranch(site.d_in, site.d_out, rank, task, self.bank).to(self._device())
        site.branches.append(branch)
        return branch

    def _add_magnitude(self) -> None:
        self.bank.append(float(self.params.init_magnitude), self._device())

    @torch.no_grad()
    def _freeze_finished(self) -> None:
        """Normalise and freeze every branch still training (the previous task's pair)."""
        for site in self.sites.values():
            for b in site.branches:
                if not b.frozen:
                    norm = float(direction_norm(b.B, b.A, self.params.normalize))
                    # a pair left at zero contributes nothing; dividing it by 0 would make NaNs (as officially)
                    b.norm.fill_(norm if norm > 0 else 1.0)
                    b.requires_grad_(False)
                    b.A.grad, b.B.grad = None, None

    # -- lifecycle ---------------------------------------------------------------------------------
    @hookimpl
    def before_task(self, model, ctx):
        self._freeze_finished()
        if self.params.reset_magnitudes:
            with torch.no_grad():
                self.bank.values.fill_(float(self.params.init_magnitude))
        while len(self.bank) <= ctx.task:
            self._add_magnitude()
        rank = self.params.rank_at(ctx.task)
        for site in self.sites.values():
            self._add_branch(site, ctx.task, rank)

    @hookimpl
    def param_groups(self, model, ctx):
        new = [p for s in self.sites.values() for b in s.branches if not b.frozen for p in (b.A, b.B)]
        return [{"params": new, "name": "sdlora_direction"},
                {"params": [self.bank.values], "name": "sdlora_magnitude"}]

    @hookimpl
    def after_task(self, model, ctx):
        if self.params.kd and ctx.task > 0:
            self.absorb(ctx.task)
        self._task_update = self._updates()
        self.tasks_done = ctx.task + 1

    def _updates(self) -> dict[str, LowRank]:
        """``Delta_t`` (module docstring) per site, and the new coefficient snapshot."""
        updates: dict[str, LowRank] = {}
        with torch.no_grad():
            for name, site in self.sites.items():
                prev = self.prev_coef.get(name, {})
                now: dict[int, torch.Tensor] = {}
                parts = []
                for b in site.branches:
                    c = b.coefficient().detach().float().clone()
                    now[b.task] = c
                    delta = c - prev[b.task] if b.task in prev else c
                    if bool(delta != 0):
                        parts.append(LowRank(b.B.detach().float() * delta, b.A.detach().float()))
                self.prev_coef[name] = now
                total = LowRank.sum(parts)
                if total is not None:
                    updates[name] = total
        return updates

    @torch.no_grad()
    def absorb(self, task: int) -> None:
        """SD-LoRA-KD: per site, fold the new direction into the earlier magnitudes when they fit it."""
        tau = self.params.kd_threshold
        for name, site in self.sites.items():
            old = [b for b in site.branches if b.frozen]
            new = [b for b in site.branches if not b.frozen]
            if not old or not new:
                continue
            b_new = new[0]
            n_new = direction_norm(b_new.B, b_new.A, self.params.normalize)
            if float(n_new) == 0.0:
                continue  # the task left this site's pair at zero: nothing to fit or to keep
            beta, residual = fit_direction([(b.B, b.A, b.norm) for b in old], (b_new.B, b_new.A, n_new))
            if residual > tau:
                continue
            c_new = b_new.coefficient().double() * n_new  # coefficient of D_t = B A / n in the trained model
            for b, beta_k in zip(old, beta):
                b.offset += (c_new * beta_k).to(b.offset.dtype)
            site.branches = nn.ModuleList(b for b in site.branches if b is not b_new)
            self.absorbed.append({"task": task, "site": name, "residual": residual})

    @hookimpl
    def task_updates(self, model, ctx):
        return self._task_update

    # -- checkpoints -------------------------------------------------------------------------------
    @hookimpl
    def method_state(self, ctx):
        layout = {n: [[b.task, b.rank] for b in s.branches] for n, s in self.sites.items()}
        prev = {n: {"tasks": torch.tensor(list(c), dtype=torch.long),
                    "coef": torch.cat(list(c.values())).cpu() if c else torch.zeros(0)}
                for n, c in self.prev_coef.items()}
        return {"tasks_done": self.tasks_done, "layout": layout, "prev_coef": prev,
                "absorbed": [[a["task"], a["site"], a["residual"]] for a in self.absorbed]}

    @hookimpl
    def load_method_state(self, model, state, ctx):
        missing = sorted(set(self.sites) - set(state.get("layout", {})))
        if missing:
            raise ClbenchError(f"sdlora: the checkpoint has no adapter layout for {missing[0]}; resume with the "
                               "same targets and blocks")
        self.tasks_done = int(state["tasks_done"])
        while len(self.bank) < self.tasks_done:
            self._add_magnitude()
        for name, site in self.sites.items():
            site.branches = nn.ModuleList()
            for task, rank in state["layout"][name]:
                b = self._add_branch(site, int(task), int(rank))
                if int(task) < self.tasks_done - 1:  # the last finished pair is normalised by the next before_task
                    b.requires_grad_(False)
        device = self._device()
        self.prev_coef = {n: {int(t): c.reshape(1).to(device) for t, c in zip(p["tasks"].tolist(), p["coef"])}
                          for n, p in state["prev_coef"].items()}
        self.absorbed = [{"task": int(t), "site": s, "residual": float(r)} for t, s, r in state.get("absorbed", [])]


def register_methods(register: Any) -> None:
    register(SDLoRA)
