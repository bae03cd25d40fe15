"""EBLoRA (Energy-Balanced LoRA, alias ``spectral_balancing``): flat-spectrum low-rank updates on a restricted
Stiefel manifold, for continual adaptation of a ViT.

Paper: Hao Gu, Mao-Lin Luo, Zi-Hao Zhou, Han-Chen Zhang, Min-Ling Zhang, Tong Wei, "Spectral Imbalance Causes
Forgetting in Low-Rank Continual Adaptation", ICML 2026, arXiv 2602.00722. Official code:
github.com/haodotgu/EBLoRA (LLaVA-1.5; ``llava/peft/tuners/lora.py``, ``llava/train/riemannian_adam.py``,
``llava/train/stiefel.py``, ``llava/train/extract_gradients.py``, ``llava/train/train.py``,
``llava/train/llava_trainer.py``, ``scripts/Train_UCIT/train_all.sh``). docs/METHODS.md section 2, "eblora", has the spec.

The rule, per task t and adapted site (a linear map W of d_out x d_in):

* ``delta W_t = s_t (alpha / r) B_t A_t`` with ``B_t^T B_t = I`` (B on St(d_out, r)), ``A_t A_t^T = I`` and
  ``A_t F = 0`` (A^T on the Stiefel manifold restricted to the complement of F, an orthonormal d_in x k basis of
  the earlier tasks' input-side gradient subspace), and one learnable scalar ``s_t`` per site. Every non-zero
  singular value of delta W_t is ``|s_t| alpha / r``: the spectrum is flat by construction. The branch is a
  :class:`clbench.model.lora.LoRABranch` with ``scale = alpha / r`` and ``gain = "scalar"`` (the gain is s).
* ``before_task``: the mean full-weight gradient G of the task's loss over a uniformly spaced subset of its
  training data (``grad_fraction``, official 0.2); ``M = G^T`` projected away from F; ``U, S, V =
  torch.svd_lowrank(M)``; ``A_t = U_r^T``, ``B_t = V_r``. ``s_t = -(init_alpha + init_beta * l / (L - 1))`` for
  block l of L (the official ``compute_scale_fn``).
* every step (official ``RiemannianAdamW``): before the optimizer step the Euclidean gradient of X (X = B, or
  X = A^T with ``g <- g - F F^T g`` first) becomes ``g - X g^T X``; the loop's optimizer steps (AdamW, decoupled
  weight decay on the B, A and s groups); after it ``delta = X_new - X_old`` is multiplied by
  ``sqrt(grad_scaling / r)``, projected (``- F F^T delta`` for A, then ``delta - X_old delta^T X_old``) and
  retracted, ``X <- polar(X_old + delta)`` (for A after projecting ``X_old + delta`` away from F), with
  ``polar(M) = U V^T`` of the thin SVD.
* ``after_task``: F is extended GPM-style on the task's
  gradient ``M = G^T``: on the first task the leading left singular vectors keeping ``energy`` (0.99) of
  ``||M||^2``; later, the leading left singular vectors of the residual ``M - F F^T M`` until the captured share
  reaches ``energy``. ``merge_task`` folds the branch into the base weight (official: ``merge_and_unload``).
  The task's update reported for spectra is the new branch; the harness computes it
  (``clbench.methods.probes.TaskUpdateProbe``).

ViT reconstruction (no ViT code exists; docs/METHODS.md section 2):

* sites: q and v slices of timm's fused qkv in every block (the InfLoRA / SD-LoRA protocol; official: all
  linear maps of LLaMA); r = 16, alpha = 2r and s_init = 0 as in the official UCIT scripts;
* the init gradient is taken through the new task's head, which is untrained when ``before_task`` runs.
  ``init_head = "probe"`` (default) first fits a *copy* of that head on the frozen features of the same subset
  (``probe_steps`` full-batch Adam steps) and takes the gradient through the copy; ``"untrained"`` uses the head
  as it is. The probe is the default because the official gradient flows through a trained output layer (the
  LM head): through a random head, G is the class signal multiplied by random head rows, and its top singular
  directions are mostly those of the random head. The loop's head is left untouched, so the protocol's head
  training is identical to every other method's;
* the GPM gradient of ``after_task``: ``subspace_gradient = "pre"`` (default) reuses the ``before_task``
  gradient, which is what the released code computes: its ``train_post`` pass (``extract_gradients.py``)
  loads the pre-trained weights whatever ``model_path`` lists and runs on the same samples, so it returns the
  init gradient (docs/REPRODUCTION.md). ``"post"`` (documented variant) takes it at the model after the task
  (trained head, update in place), which the configs' ``model_path`` lists suggest was intended;
* the post-step rescale ``sqrt(c / r)`` uses ``c = 4096`` in the official code (LLaMA-7B's width, lr 2e-4,
  r 16). Adam's first step moves each entry by about lr, so the relative change of a d x r frame is about
  ``lr sqrt(c d / r)``: it depends on d, c and lr together, and no fixed c keeps it across widths (c = width
  gives 0.12 on the ViT-B suites, 0.17 on the quickstart, against the official 0.20; c = 4096^2 / d is tied
  to lr 2e-4 and saturates the retraction at larger lr). ``grad_scaling = "official_step"`` (default) picks
  ``c = r (0.2048 / lr)^2 / d`` (d = the backbone width, lr = ``train.lr``), the official first-step relative
  change 0.2048 = 2e-4 sqrt(4096 * 4096 / 16) on any width and lr; ``"width"`` takes c = d; a number sets c;
  0 switches the rescale off. docs/REPRODUCTION.md has the measurement behind the choice;
* the gradient is computed with the model in eval mode (LLaMA has no dropout, so the official ``model.train()``
  is the same thing there) and, on CUDA, under the loop's bf16 autocast.

Deviations from the official code:

* the GPM and init gradients are taken at the current (merged) model; the released ``extract_gradients.py``
  has the lines that merge the earlier LoRAs commented out, so it differentiates the pre-trained weights;
* ``svd_lowrank`` is called with ``q = r + svd_oversample`` (default 8) and truncated to r; the official
  ``q = r`` is a looser randomised estimate of the same top-r subspace; ``svd_oversample = 0`` is official;
* F keeps at most ``d_in - r`` columns (official: d_in) so that an r-frame orthogonal to F always exists; the
  factors are completed to r orthonormal columns (random directions in the complement of F) when the
  projected gradient has rank below r;
* mean gradient = sum of per-sample gradients / N over the subset (official: running mean of batch-size-1
  gradients, the same number), computed in batches for speed;
* LoRA dropout defaults to 0 (official 0.05) to match the other ViT methods of the suite;
* the optimizer is the loop's (``train.optimizer``): the Riemannian parts live in ``before_optimizer_step`` /
  ``after_optimizer_step`` and the groups set ``weight_decay`` (official 0.1). Suites should use
  ``optimizer: adamw`` to get the official AdamW; with adam or sgd the factors still stay on the manifold
  (the post-step projection and retraction do not depend on the optimizer) but weight decay becomes L2;
* the official code pads F with zero columns to a multiple of 8 to batch sites; here sites of one shape are
  batched with F padded to the largest k of the batch (zero columns change no projection).

Ablations (params): ``use_f = false`` drops the F constraint; ``gain = "vector"`` learns a diagonal S instead of
s I (StelLA-like); ``use_f = false, grad_init = false`` is the bare flat spectrum with the official
(commented-out) random orthonormal init of ``init_rando``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as Fn
from pydantic import Field
from torch import nn

from clbench import ClbenchError, LoRABranch, LoRAParams, LoRASite, Method, TaskContext, hookimpl, inject


class EBLoRAParams(LoRAParams):
    rank: int = Field(16, ge=1, description="rank r of each task's update (official UCIT: 16)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha, update scaled by alpha / r (default 2r, official)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the branch input (official 0.05)")
    gain: Literal["scalar", "vector"] = Field("scalar", description="scalar s (EBLoRA) or a learnable diagonal S "
                                                                    "(StelLA-like ablation)")
    use_f: bool = Field(True, description="constrain A orthogonal to the earlier tasks' gradient subspace F")
    grad_init: bool = Field(True, description="initialise B, A from the SVD of the task's mean gradient; "
                                              "false = random orthonormal (official init_rando)")
    grad_fraction: float = Field(0.2, gt=0, le=1, description="share of the task's training data (uniformly "
                                                              "spaced) for the gradients (official 0.2)")
    grad_batch_size: int | None = Field(None, ge=1, description="batch size of the gradient passes (default: "
                                                                "the suite's)")
    init_head: Literal["probe", "untrained"] = Field("probe", description="head the init gradient flows through: "
                                                     "a linear-probed copy, or the untrained head")
    probe_steps: int = Field(100, ge=1, description="full-batch Adam steps of the linear probe")
    probe_lr: float = Field(1e-2, gt=0, description="learning rate of the linear probe")
    init_alpha: float = Field(0.0, description="s_init = -(init_alpha + init_beta * l / (L - 1)) (UCIT 0; DCL 0.002)")
    init_beta: float = Field(0.0, description="layer slope of s_init (UCIT 0; MLLM-DCL 0.006)")
    energy: float = Field(0.99, gt=0, le=1, description="GPM energy threshold of the F update")
    subspace_gradient: Literal["pre", "post"] = Field("pre", description="gradient of the F update: the "
                                                      "before_task one (what the released train_post pass "
                                                      "computes) or one after the task (variant)")
    grad_scaling: float | Literal["official_step", "width"] = Field(
        "official_step", description="c of the post-step rescale sqrt(c / r): official_step = r (0.2048 / lr)^2 / "
                                     "width (the official first-step relative change); width; a number (official "
                                     "4096 = LLaMA-7B's width at lr 2e-4); 0: off")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay of the B, A, s groups (official)")
    svd_oversample: int = Field(8, ge=0, description="extra columns for svd_lowrank (official 0)")
    svd_niter: int = Field(2, ge=0, description="subspace iterations of svd_lowrank (torch default, official)")


# The official first-step relative change of a frame: lr sqrt(c d / r) with lr 2e-4, c = d = 4096, r = 16.
OFFICIAL_STEP = 2e-4 * math.sqrt(4096 * 4096 / 16)


# -- Stiefel-manifold algebra (batched over a leading site dimension; X is n x d x r) ---------------------------

def project_out(F: torch.Tensor | None, D: torch.Tensor) -> torch.Tensor:
    """``D - F F^T D``: remove the span of F (orthonormal columns) from D."""
    return D if F is None else D - F @ (F.mT @ D)


def tangent(X: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The official tangent map ``D - X D^T X`` (canonical-metric Riemannian gradient at X)."""
    return D - X @ (D.mT @ X)


def polar(M: torch.Tensor) -> torch.Tensor:
    """Polar factor ``U V^T`` of the thin SVD: the closest matrix with orthonormal columns."""
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ Vh


def orthonormal_frame(X: torch.Tensor, r: int, F: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """r orthonormal columns orthogonal to F, starting from X's columns (Gram-Schmidt, twice), completed with
    random directions where X is short of r columns or rank-deficient. Already-orthonormal X ⟂ F is kept."""
    d = X.shape[0]
    basis = torch.zeros(d, 0, dtype=torch.float64, device=X.device) if F is None else F.double()
    Q = torch.zeros(d, 0, dtype=torch.float64, device=X.device)
    cols = [c for c in X.double().t()]
    j = 0
    while Q.shape[1] < r:
        if j < len(cols):
            v = cols[j]
        else:
            v = torch.randn(d, dtype=torch.float64, generator=generator).to(X.device)
        j += 1
        norm0 = float(v.norm())
        for _ in range(2):
            v = v - basis @ (basis.t() @ v) - Q @ (Q.t() @ v)
        if norm0 == 0 or float(v.norm()) < 1e-6 * norm0:
            if j > len(cols) + 10 * r:
                raise ClbenchError(f"eblora: no {r} directions left orthogonal to F (d = {d}); lower the rank")
            continue
        Q = torch.cat([Q, (v / v.norm())[:, None]], 1)
    return Q.to(X.dtype)


def gradient_svd_init(G: torch.Tensor, F: torch.Tensor | None, r: int, oversample: int = 8,
                      niter: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``fixed_rank`` init: ``M = G^T`` (d_in x d_out) projected away from F, ``U, S, V =
    svd_lowrank(M)``; returns ``B = V_r`` (d_out x r) and ``A = U_r^T`` (r x d_in)."""
    M = project_out(None if F is None else F.float(), G.t().float())
    q = min(r + oversample, *M.shape)
    U, _, V = torch.svd_lowrank(M, q=q, niter=niter)
    A = orthonormal_frame(U[:, :r], r, F)
    B = orthonormal_frame(V[:, :r], r)
    return B, A.t().contiguous()


def gpm_update(G: torch.Tensor, F: torch.Tensor | None, threshold: float = 0.99,
               max_k: int | None = None) -> tuple[torch.Tensor, float]:
    """Official ``energy`` mode on ``M = G^T``: extend F (d_in x k) with the leading left singular vectors of the
    residual ``M - F F^T M`` until ``||F^T M||^2 >= threshold ||M||^2``. Returns the new F and the share of
    ``||M||^2`` it captures."""
    M = G.t().double()
    d_in = M.shape[0]
    max_k = d_in if max_k is None else min(max_k, d_in)
    U1, S1, _ = torch.linalg.svd(M, full_matrices=False)
    total = float((S1 ** 2).sum())
    if F is None or F.shape[1] == 0:
        if total <= 0:
            return torch.zeros(d_in, 0, dtype=G.dtype, device=G.device), 1.0
        ratio = torch.cumsum(S1 ** 2, 0) / total
        k = int((ratio >= threshold).nonzero()[0, 0]) + 1 if bool((ratio >= threshold).any()) else len(S1)
        F_new = U1[:, :k]
    else:
        F = F.double()
        if total <= 0:
            return F.to(G.dtype), 1.0
        U, S, _ = torch.linalg.svd(M - F @ (F.t() @ M), full_matrices=False)
        acc, add = (total - float((S ** 2).sum())) / total, 0
        for s2 in (S ** 2 / total).tolist():
            if acc >= threshold:
                break
            acc += s2
            add += 1
        F_new = torch.cat([F, U[:, :add]], 1) if add else F
    F_new = F_new[:, :max_k]
    kept = float((F_new.t() @ M).pow(2).sum()) / total if total > 0 else 1.0
    return F_new.to(G.dtype), kept


@dataclass
class _StiefelGroup:
    """Factors of one tag ("U" = B, "Vt" = A) and one shape, stepped as one batch."""

    tag: str
    params: list[torch.nn.Parameter]
    F: torch.Tensor | None  # n x d_in x k (zero-padded), Vt only

    def frames(self, grads: bool = False) -> torch.Tensor:
        ts = [p.grad if grads else p.detach() for p in self.params]
        return torch.stack([t if self.tag == "U" else t.mT for t in ts])

    def write(self, X: torch.Tensor, grads: bool = False) -> None:
        for p, x in zip(self.params, X):
            (p.grad if grads else p.data).copy_(x if self.tag == "U" else x.mT)


class EBLoRA(Method):
    name = "eblora"
    aliases = ("spectral_balancing",)
    paper = ("Gu et al., Spectral Imbalance Causes Forgetting in Low-Rank Continual Adaptation, ICML 2026, "
             "arXiv 2602.00722")
    code = "github.com/haodotgu/EBLoRA"
    Params = EBLoRAParams

    def __init__(self, params: EBLoRAParams | dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.sites: dict[str, LoRASite] = {}
        self.F: dict[str, torch.Tensor] = {}  # site -> d_in x k basis of earlier tasks' gradient subspace
        self.kept_energy: dict[str, float] = {}  # site -> share of the last GPM gradient's energy F captures
        self.depth = 1
        self.width = 0
        self.lr = 1e-3  # train.lr, read in configure_model (the official_step rule needs it)
        self._live: dict[str, LoRABranch] = {}
        self._groups: list[_StiefelGroup] = []
        self._x_old: list[torch.Tensor] = []
        self._pre_grads: dict[str, torch.Tensor] = {}

    @property
    def scale(self) -> float:
        return (self.params.alpha or 2 * self.params.rank) / self.params.rank

    @property
    def rescale(self) -> float:
        """The post-step factor sqrt(c / r) of the official ``post_step``."""
        c = self.grad_scaling_c()
        return math.sqrt(c / self.params.rank) if c else 1.0

    def grad_scaling_c(self) -> float:
        """The constant c of the rescale (class docstring): ``official_step`` matches the official relative step."""
        g = self.params.grad_scaling
        if g == "width":
            return float(self.width)
        if g == "official_step":
            return self.params.rank * (OFFICIAL_STEP / self.lr) ** 2 / self.width
        return float(g)

    def s_init(self, site: str) -> float:
        """Official ``compute_scale_fn``: ``-(alpha + beta * l / (L - 1))`` for block l of L."""
        layer = int(site.split(".")[1]) if site.startswith("blocks.") else 0
        p = self.params
        return -(p.init_alpha + p.init_beta * layer / max(1, self.depth - 1))

    # -- hooks ---------------------------------------------------------------------------------------------

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: TaskContext) -> None:
        self.sites = inject(model.backbone, self.params.targets, self.params.blocks)
        self.depth = len(model.backbone.blocks)
        self.width = int(getattr(model.backbone, "embed_dim", 0) or model.backbone.num_features)
        self.lr = ctx.lr
        for name, site in self.sites.items():
            if self.params.rank > min(site.d_in, site.d_out):
                raise ClbenchError(f"eblora: rank {self.params.rank} exceeds the size {site.d_out} x {site.d_in} "
                                   f"of site {name}; lower params.rank")

    @hookimpl
    def before_task(self, model: nn.Module, ctx: TaskContext) -> None:
        p = self.params
        need_post = p.use_f and p.subspace_gradient == "post"
        grads = None
        if p.grad_init or (p.use_f and not need_post):
            head = self._probe_head(model, ctx) if p.init_head == "probe" else model.heads[ctx.task]
            grads = self.mean_gradients(model, ctx, head)
        self._pre_grads = grads if (p.use_f and not need_post) else {}
        self._live = {}
        for name, site in self.sites.items():
            branch = site.add_branch(p.rank, scale=self.scale, gain=p.gain, dropout=p.dropout)
            with torch.no_grad():
                branch.gain.fill_(self.s_init(name))  # s starts at its energy-based value
            F = self.F.get(name) if p.use_f else None
            with torch.no_grad():
                if grads is not None and p.grad_init:
                    B, A = gradient_svd_init(grads[name], F, p.rank, p.svd_oversample, p.svd_niter)
                else:  # official init_rando: orthogonal_ on both factors (then off F when constrained)
                    B = torch.nn.init.orthogonal_(torch.empty(site.d_out, p.rank))
                    A = orthonormal_frame(torch.nn.init.orthogonal_(torch.empty(site.d_in, p.rank)), p.rank, F).t()
                branch.B.copy_(B)
                branch.A.copy_(A)
            self._live[name] = branch
        self._build_groups()

    @hookimpl
    def param_groups(self, model: nn.Module, ctx: TaskContext) -> list[dict[str, Any]]:
        wd = self.params.weight_decay
        live = list(self._live.values())
        return [{"params": [b.B for b in live], "name": "eblora_U", "lora_tag": "U", "weight_decay": wd},
                {"params": [b.A for b in live], "name": "eblora_Vt", "lora_tag": "Vt", "weight_decay": wd},
                {"params": [b.gain for b in live], "name": "eblora_s", "lora_tag": "s", "weight_decay": wd}]

    @hookimpl
    @torch.no_grad()
    def before_optimizer_step(self, model: nn.Module, ctx: TaskContext) -> None:
        """Official ``pre_step``: remember X, turn the Euclidean gradient into the Riemannian one."""
        self._x_old = []
        for g in self._groups:
            X = g.frames()
            self._x_old.append(X)
            g.write(tangent(X, project_out(g.F, g.frames(grads=True))), grads=True)

    @hookimpl
    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, ctx: TaskContext) -> None:
        """Official ``post_step``: rescale, project and retract the optimizer's change of every frame."""
        c = self.rescale
        for g, X0 in zip(self._groups, self._x_old):
            delta = (g.frames() - X0) * c
            delta = tangent(X0, project_out(g.F, delta))
            g.write(polar(project_out(g.F, X0 + delta)))
        self._x_old = []

    @hookimpl
    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        if not self.params.use_f:
            return
        grads = self._pre_grads or self.mean_gradients(model, ctx, model.heads[ctx.task])
        for name, site in self.sites.items():
            F, kept = gpm_update(grads[name], self.F.get(name), self.params.energy, site.d_in - self.params.rank)
            self.F[name], self.kept_energy[name] = F, kept
        self._pre_grads = {}

    @hookimpl
    def merge_task(self, model: nn.Module, ctx: TaskContext) -> None:
        for site in self.sites.values():
            site.merge()
        self._live, self._groups = {}, []


    @hookimpl
    def method_state(self, ctx: TaskContext) -> dict[str, Any]:
        return {"F": {n: f.detach().cpu() for n, f in self.F.items()},
                "kept_energy": dict(self.kept_energy)}

    @hookimpl
    def load_method_state(self, model: nn.Module, state: dict[str, Any], ctx: TaskContext) -> None:
        # Every finished task is merged into the base weights, so no branch must be rebuilt: only F returns.
        device = next(iter(self.sites.values())).weight.device if self.sites else torch.device("cpu")
        self.F = {n: f.to(device) for n, f in state.get("F", {}).items()}
        self.kept_energy = dict(state.get("kept_energy", {}))

    # -- helpers -------------------------------------------------------------------------------------------

    def _build_groups(self) -> None:
        """Batch the live frames by (tag, shape); A's F padded with zero columns to the group's largest k."""
        by_key: dict[tuple, list[str]] = {}
        for name, b in self._live.items():
            by_key.setdefault(("U", tuple(b.B.shape)), []).append(name)
            by_key.setdefault(("Vt", tuple(b.A.shape)), []).append(name)
        self._groups = []
        for (tag, _), names in by_key.items():
            params = [self._live[n].B if tag == "U" else self._live[n].A for n in names]
            F = None
            if tag == "Vt" and self.params.use_f:
                Fs = [self.F.get(n) for n in names]
                k = max((f.shape[1] for f in Fs if f is not None), default=0)
                if k:
                    d = params[0].shape[1]
                    F = torch.zeros(len(names), d, k, dtype=params[0].dtype, device=params[0].device)
                    for i, f in enumerate(Fs):
                        if f is not None:
                            F[i, :, : f.shape[1]] = f.to(F.dtype)
            self._groups.append(_StiefelGroup(tag, params, F))

    def _probe_head(self, model, ctx) -> torch.nn.Module:
        """A copy of the task's head fitted on the frozen features of the gradient subset (linear probe)."""
        head = copy.deepcopy(model.heads[ctx.task]).float()
        was_training = model.training
        model.eval()
        feats, ys = [], []
        with torch.no_grad(), (ctx.autocast or contextlib.nullcontext)():
            for x, y in ctx.loader(batch_size=self.params.grad_batch_size, fraction=self.params.grad_fraction):
                feats.append(model.features(x).float())
                ys.append(y)
        model.train(was_training)
        if not feats:
            return head
        X, Y = torch.cat(feats), torch.cat(ys)
        head.requires_grad_(True)
        opt = torch.optim.Adam(head.parameters(), lr=self.params.probe_lr)
        with torch.enable_grad():
            for _ in range(self.params.probe_steps):
                opt.zero_grad(set_to_none=True)
                Fn.cross_entropy(head(X), Y).backward()
                opt.step()
        head.requires_grad_(False)
        return head

    def mean_gradients(self, model, ctx, head: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Mean over the task's gradient subset of the per-sample gradient of the task loss with respect to
        every site's full weight (d_out x d_in), through ``head``; the model (live branches included) is
        evaluated in eval mode, and the base weights' ``requires_grad`` is restored afterwards."""
        owners: list[Any] = []
        for site in self.sites.values():
            if all(o is not site.owner for o in owners):
                owners.append(site.owner)
        weights = [o.base.weight for o in owners]
        flags = [w.requires_grad for w in weights]
        sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
        was_training, n = model.training, 0
        model.eval()
        try:
            for w in weights:
                w.requires_grad_(True)
            for x, y in ctx.loader(batch_size=self.params.grad_batch_size, fraction=self.params.grad_fraction):
                with torch.enable_grad():
                    with (ctx.autocast or contextlib.nullcontext)():
                        logits = head(model.features(x))
                    loss = Fn.cross_entropy(logits.float(), y, reduction="sum")
                    for s, g in zip(sums, torch.autograd.grad(loss, weights)):
                        s += g.float()
                n += len(y)
        finally:
            for w, f in zip(weights, flags):
                w.requires_grad_(f)
            model.train(was_training)
        index = {id(o): i for i, o in enumerate(owners)}
        return {name: sums[index[id(site.owner)]][site.rows] / max(1, n) for name, site in self.sites.items()}


def register_methods(register: Callable[[type], None]) -> None:
    register(EBLoRA)
