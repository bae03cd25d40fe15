"""InfLoRA: interference-free low-rank adaptation for continual learning, as the ``inflora`` method plugin.

Paper: Yan-Shuo Liang and Wu-Jun Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual
Learning", CVPR 2024 (arXiv 2404.00228). Official code: github.com/liangyanshuo/InfLoRA (``methods/inflora.py``,
``methods/inflora_domain.py``, ``models/vit_inflora.py``). Specification: docs/METHODS.md section 3, "inflora".

Naming (the paper's letters, which the official code swaps, mapped onto ``clbench.model.lora``):

======================  =========================  ===========================  ===========================
paper                   role                       official code                clbench ``LoRABranch``
======================  =========================  ===========================  ===========================
``B_t`` (r x d_in)      designed, frozen down-     ``lora_A_k/v[t]``            ``branch.A``
                        projection
``A_t`` (d_out x r)     trained up-projection,     ``lora_B_k/v[t]``            ``branch.B``
                        zero init
======================  =========================  ===========================  ===========================

so the task's update is ``delta W_t = A_t B_t`` = ``branch.B @ branch.A`` (branch scale 1, no gain).

Per task t (0-based, T tasks):

1. ``before_task``: stream the task's training data through the current model and accumulate, at every
   adapted linear map, the uncentred covariance of its input ``C = (1/N_tok) sum x x^T`` (d x d, never the
   N x d feature matrix; float64 by default whatever the compute dtype; on a language backbone over the real
   token positions only, padding left out: ``TextBackbone.token_mask``). Project it with the memory of
   that input (``C - M M^T C`` for a "remove" basis M, ``Mbar Mbar^T C`` for a "retain" basis Mbar of the
   complement) and set ``B_t = U[:, :r]^T / sqrt(3)`` from its SVD. Sites reading the same input (q, k and v
   of a block read the fused qkv input) share ``B_t``, as the official k/v do. A new branch per site holds
   ``B_t`` frozen and a zero ``A_t``; only the ``A_t`` of this task train (``param_groups``).
2. ``after_task``: recollect the covariance with the trained model and update the memory at threshold
   ``eps_t = lambda_b + (lambda_e - lambda_b) t / T``. ``memory: dualgpm`` (default; the official
   ``update_DualGPM`` of ``methods/inflora.py``): a "remove" basis with more than d/2 columns is replaced by its
   complement ("retain"). ``memory: gpm`` (the official ``update_GPM`` of ``methods/inflora_domain.py``, the
   model of the DomainNet config): the "remove" basis only grows, by the top directions of the residual
   ``C - M M^T C`` until the protected share of ``||C||_F^2`` reaches ``eps_t``; never a complement. Both apply
   one criterion, so in exact arithmetic they protect the same subspace and design the same ``B_t`` (DualGPM
   differs only in representation, and when a share equals ``eps_t`` exactly); ``gpm`` is the official DomainNet
   computation to the letter, at the cost of projections with up to d columns.
   The task's update reported for spectra is its branch ``A_t B_t``; the harness computes it
   (``clbench.methods.probes.TaskUpdateProbe``: the branch is new, earlier ones are merged or frozen).
3. ``merge_task`` (``merge: true``, the default): the finished branch is folded into the frozen base weight.
   The official code keeps every task's branch and sums them; merging is output-identical (up to float
   rounding) and makes later tasks and evaluation run at the bare backbone's cost. ``merge: false`` keeps the
   branches, exactly as the official model does.

Presets (``preset`` fills rank / lambda_b / lambda_e not given explicitly) and the suite ``train`` section
that reproduces each official config (``train`` lives in the suite, not in the method's params):

============  ===================================  =====================================================
preset        method params                        suite ``train``
============  ===================================  =====================================================
cifar100      rank 10, lambda_b 0.95, lambda_e 1   optimizer adam, lr 5.0e-4, schedule inflora_cosine,
(default)                                          epochs 20, batch_size 128, weight_decay 0 (10 x 10 classes)
imagenet_r    rank 10, lambda_b 0.98, lambda_e 1   optimizer adam, lr 5.0e-4, schedule inflora_cosine,
                                                   epochs 50, batch_size 128, weight_decay 0 (5/10/20 tasks)
domainnet     rank 30, lambda_b 0.95, lambda_e 1   optimizer sgd, momentum 0.9, lr 5.0e-3, head_lr 1.0e-2,
                                                   schedule multistep, milestones [4], gamma 0.1, epochs 5,
                                                   batch_size 128, weight_decay 0   (5 tasks)
============  ===================================  =====================================================

With ``backbone.normalize: none`` (inputs in [0, 1], as the official pipeline). The official DomainNet model
keeps plain GPM memory: its reproduction suite sets ``memory: gpm`` next to the preset (a preset fills only
rank and thresholds; the memory is always chosen explicitly). ``suites/repro/`` holds these suites;
docs/REPRODUCTION.md lists what still differs.

Deviations from the official code, each deliberate:

* ``memory: gpm`` appends only residual directions that carry energy, re-orthogonalised against the stored
  basis (``gpm_update``); the official code could append arbitrary zero-energy singular vectors, possibly
  inside the stored span, when rounding keeps the share below ``eps_t`` (only with ``eps_t`` within rounding
  of 1). A no-op otherwise.
* (DualGPM) The first task's memory when the kept rank k reaches d/2: the official code stores the *kept* basis
  ``U[:, :k]`` labelled "retain" (and then trips its own ``assert`` that a retain basis has <= d/2 columns);
  here the complement ``U[:, k:]`` is stored, which is what "retain" means everywhere else in that code.
  With ViT-B features the branch is never taken (k << 384), so results there are unaffected.
* A guard after the SVD: ``B_t`` is multiplied by the complement projector of the memory. This is a no-op
  (to float rounding) whenever the projected covariance has rank >= r, the official regime; when it has
  rank < r the official code keeps arbitrary singular vectors of zero singular values, which may point into
  the protected subspace, and the guard removes that component so interference-freeness holds exactly.
* The memory, projections and decompositions are in float64 on the CPU (the official code runs float32
  torch / numpy SVDs). The left singular vectors and squared singular values of a (projected) covariance
  ``C_hat`` are taken from the symmetric eigendecomposition of ``C_hat C_hat^T`` (of C itself when
  unprojected), which yields the same vectors and sigma^2 as the official SVD at about half the cost; the
  official energy criterion on the singular values of the covariance (eigenvalues squared) is kept, with
  the total energy taken as ``||C||_F^2`` (equal to the sum of squared singular values).
* Covariance is accumulated as a running sum in ``cov_dtype`` on the compute device (float64 default) and
  divided by the token count at the end; the official code keeps a running float32 mean on the CPU.
* Training-loop differences are the harness's, not this plugin's: the official schedulers step per epoch
  (``train.schedule: inflora_cosine`` / ``multistep`` do the same), the model is in ``train()`` while training (the
  official code keeps ``eval()``; identical for a ViT without dropout / drop-path), and the official
  per-epoch k-means of features (``clustering``, unused by InfLoRA's prediction) is not reproduced.
* Targets are configurable (default k and v of every block, as official); q/k/v/qkv sites of a block share
  one memory and one ``B_t`` because they share the input; proj/fc1/fc2 get their own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from clbench import (
    TARGETS,
    AdaptedLinear,
    AdapterParams,
    ClbenchError,
    LoRABranch,
    LoRASite,
    Method,
    Target,
    TaskContext,
    hookimpl,
    inject,
)

PRESETS: dict[str, dict[str, float]] = {
    "cifar100": {"rank": 10, "lambda_b": 0.95, "lambda_e": 1.0},  # configs/cifar100_inflora.json
    "imagenet_r": {"rank": 10, "lambda_b": 0.98, "lambda_e": 1.0},  # configs/mimg{5,10,20}_inflora.json
    "domainnet": {"rank": 30, "lambda_b": 0.95, "lambda_e": 1.0},  # configs/domainnet_inflora.json
}
REMOVE, RETAIN = "remove", "retain"


# ----------------------------------------------------------------------------------------------------
# DualGPM and plain-GPM memories (pure functions on float64 CPU tensors; tested directly)
# ----------------------------------------------------------------------------------------------------

@dataclass
class Memory:
    """The protected input subspace of one adapted input.

    ``kind == "remove"``: ``basis`` (d x k, orthonormal) spans the protected subspace M.
    ``kind == "retain"``: ``basis`` spans its orthogonal complement Mbar (the still-free directions).
    """

    basis: torch.Tensor
    kind: str

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    def free_projector(self) -> torch.Tensor:
        """Projector onto the free directions (the complement of the protected subspace)."""
        P = self.basis @ self.basis.t()
        return torch.eye(self.dim, dtype=P.dtype) - P if self.kind == REMOVE else P

    def project(self, C: torch.Tensor) -> torch.Tensor:
        """``C - M M^T C`` (remove) or ``Mbar Mbar^T C`` (retain): the part of C outside the protected space."""
        MtC = self.basis.t() @ C
        return C - self.basis @ MtC if self.kind == REMOVE else self.basis @ MtC

    def protected_basis(self) -> torch.Tensor:
        """An orthonormal basis of the protected subspace, whatever the representation."""
        return self.basis if self.kind == REMOVE else _complement(self.basis)

    def captured_energy(self, C: torch.Tensor) -> float:
        """Share of ``||C||_F^2`` inside the protected subspace (the DualGPM criterion)."""
        total = float(C.pow(2).sum())
        return 1.0 - float(self.project(C).pow(2).sum()) / total if total > 0 else 1.0


def threshold(t: int, num_tasks: int, lambda_b: float, lambda_e: float) -> float:
    """``eps_t = lambda_b + (lambda_e - lambda_b) * t / T`` with t the 0-based index of the finished task."""
    return lambda_b + (lambda_e - lambda_b) * t / num_tasks


def _complement(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the orthogonal complement of span(basis) (eigenvalue-0 vectors of the projector;
    the official full SVD's trailing left singular vectors span the same space, the gap of 1 keeps it exact)."""
    _, vecs = torch.linalg.eigh(basis @ basis.t())
    return vecs[:, : basis.shape[0] - basis.shape[1]]


def _left_singular(M: torch.Tensor, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (d x d) and squared singular values of a d x d matrix, descending.

    Computed as eigenvectors of ``M M^T`` (or of M itself when it is symmetric PSD, the unprojected
    covariance): the same vectors and sigma^2 as the official SVD, about twice as fast at d = 768."""
    if symmetric:
        vals, vecs = torch.linalg.eigh((M + M.t()) / 2)
        s2 = vals.pow(2)
    else:
        G = M @ M.t()
        vals, vecs = torch.linalg.eigh((G + G.t()) / 2)
        s2 = vals.clamp_min(0)
    order = torch.argsort(s2, descending=True, stable=True)
    return vecs[:, order], s2[order]


def design_down_projection(C: torch.Tensor, memory: Memory | None, rank: int,
                           scale: float = 1 / math.sqrt(3)) -> torch.Tensor:
    """The paper's ``B_t`` (rank x d): top-``rank`` left singular vectors of the projected covariance, scaled."""
    C = C.double()
    U, _ = _left_singular(C, symmetric=True) if memory is None else _left_singular(memory.project(C))
    B = U[:, :rank].t()
    if memory is not None:  # guard (module docstring): a no-op unless C_hat has rank < r
        B = B @ memory.free_projector()
    return B * scale


def dualgpm_update(memory: Memory | None, C: torch.Tensor, eps: float) -> Memory:
    """One DualGPM step of the official ``update_DualGPM`` on the covariance C of the finished task."""
    C = C.double()
    d = C.shape[0]
    total = float(C.pow(2).sum())
    if memory is None:
        U, s2 = _left_singular(C, symmetric=True)
        ratio = s2 / total
        k = int((torch.cumsum(ratio, 0) < eps).sum())  # official: no "+1", so the prefix stays below eps
        k = max(k, 1)
        memory = Memory(U[:, :k], REMOVE) if k < d / 2 else Memory(U[:, k:], RETAIN)
    elif memory.kind == REMOVE:
        C_hat = memory.project(C)
        U, s2 = _left_singular(C_hat)
        ratio = (s2 / total).tolist()
        acc = (total - float(C_hat.pow(2).sum())) / total
        r = 0
        for s2 in ratio:
            if acc >= eps:
                break
            acc += s2
            r += 1
        if r:
            memory = Memory(torch.cat([memory.basis, U[:, :r]], 1)[:, :d], REMOVE)
    else:
        C_hat = memory.project(C)
        U, s2 = _left_singular(C_hat)
        ratio = (s2 / total).tolist()
        acc = float(C_hat.pow(2).sum()) / total
        r = 0
        for s2 in ratio:
            if acc < 1 - eps:
                break
            acc -= s2
            r += 1
        if r:
            Ur = U[:, :r]
            left = memory.basis - Ur @ (Ur.t() @ memory.basis)
            Ui, _, _ = torch.linalg.svd(left, full_matrices=False)  # official: full; same leading columns
            memory = Memory(Ui[:, : memory.basis.shape[1] - r], RETAIN)
    if memory.kind == REMOVE and memory.basis.shape[1] > d / 2:
        memory = Memory(_complement(memory.basis), RETAIN)
    return memory


# Relative energy below which a direction of the residual counts as empty: the eigenvalues of ``C_hat C_hat^T``
# carry an absolute rounding error of about d * 1e-16 of the largest, i.e. <= 1e-13 of ``||C||_F^2``.
_EMPTY_SHARE = 1e-12


def gpm_update(memory: Memory | None, C: torch.Tensor, eps: float) -> Memory:
    """One plain-GPM step of the official ``update_GPM`` (``methods/inflora_domain.py``, the DomainNet model).

    The memory is always a "remove" basis M of the protected inputs and only grows (no switch to the complement
    at d/2). First task: the left singular vectors of C whose cumulative energy share stays strictly below
    ``eps`` (at least one). Later tasks: starting from the share of ``||C||_F^2`` already inside span(M),
    append the top left singular vectors of the residual ``C - M M^T C`` one at a time while that share is below
    ``eps``; nothing is appended when it already reaches ``eps`` (official "skip updating"); at most d columns.

    Deviation (a no-op in the official regime): appended directions are limited to those carrying energy
    (share above ``_EMPTY_SHARE``) and re-orthogonalised against M. The official code would append the
    arbitrary singular vectors of zero singular values once rounding keeps the share below ``eps`` after
    every residual direction (only reachable with ``eps`` within rounding of 1); those may lie inside span(M)
    and would break the orthonormality of the basis.
    """
    C = C.double()
    d = C.shape[0]
    total = float(C.pow(2).sum())
    if memory is None:
        U, s2 = _left_singular(C, symmetric=True)
        k = int((torch.cumsum(s2 / total, 0) < eps).sum()) if total > 0 else 0  # official: no "+1"
        return Memory(U[:, : max(k, 1)], REMOVE)
    if memory.kind != REMOVE:
        raise ValueError("gpm_update: plain GPM keeps a 'remove' basis, got a 'retain' (DualGPM) memory")
    if total == 0:
        return memory
    C_hat = memory.project(C)
    U, s2 = _left_singular(C_hat)
    shares = (s2 / total).tolist()
    acc = (total - float(C_hat.pow(2).sum())) / total  # the energy share already protected
    r = 0
    for share in shares:
        if acc >= eps:
            break
        acc += share
        r += 1
    r = min(r, sum(1 for share in shares if share > _EMPTY_SHARE))  # deviation (docstring)
    if r == 0:
        return memory
    new = U[:, :r] - memory.basis @ (memory.basis.t() @ U[:, :r])
    Q, R = torch.linalg.qr(new)
    Q = Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q)  # keep each column's sign
    return Memory(torch.cat([memory.basis, Q], 1)[:, :d], REMOVE)


# ----------------------------------------------------------------------------------------------------
# Streaming covariance of the adapted layers' inputs
# ----------------------------------------------------------------------------------------------------

class CovarianceCollector:
    """Forward hooks that accumulate ``sum x x^T`` and the token count of each module's input (d x d each).

    ``token_mask(module)`` (a language backbone's ``TextBackbone.token_mask``), when given and not None for a
    module, says which positions of its input are real tokens: padding positions are left out of the sum and the
    count. A ViT has no padding: every token counts."""

    def __init__(self, modules: dict[str, nn.Module], dtype: torch.dtype = torch.float64,
                 token_mask: Callable[[nn.Module], torch.Tensor | None] | None = None) -> None:
        self.modules, self.dtype, self.token_mask = modules, dtype, token_mask
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list[Any] = []

    def _hook(self, key: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach()
            mask = self.token_mask(module) if self.token_mask is not None else None
            if mask is not None:
                if mask.shape != x.shape[:-1]:
                    raise ClbenchError(f"inflora: the input of {key} has positions {tuple(x.shape[:-1])} but "
                                       f"the backbone's token mask {tuple(mask.shape)}")
                x = x[mask.to(x.device)]
            x = x.reshape(-1, x.shape[-1])
            with torch.autocast(device_type=x.device.type, enabled=False):
                x = x.to(self.dtype)
                xtx = x.t() @ x
            if key in self.sums:
                self.sums[key] += xtx
            else:
                self.sums[key] = xtx
            self.counts[key] = self.counts.get(key, 0) + x.shape[0]
        return hook

    def __enter__(self) -> CovarianceCollector:
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def covariances(self) -> dict[str, torch.Tensor]:
        """``C = (1/N_tok) sum x x^T`` per module, float64 on the CPU."""
        return {k: (s / max(1, self.counts[k])).double().cpu() for k, s in self.sums.items()}


# ----------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------

class InfLoRAParams(AdapterParams):
    preset: Literal["cifar100", "imagenet_r", "domainnet"] | None = Field(
        None, description="official config whose rank/lambda_b/lambda_e fill the params not given explicitly")
    rank: int = Field(10, ge=1, description="rank r of each task's branch (official: 10; DomainNet 30)")
    lambda_b: float = Field(0.95, gt=0, le=1, description="DualGPM threshold at the first task ('lamb'; "
                                                          "0.95 CIFAR-100/DomainNet, 0.98 ImageNet-R)")
    lambda_e: float = Field(1.0, gt=0, le=1, description="DualGPM threshold approached at the last task ('lame')")
    targets: list[Target] = Field(["k", "v"], min_length=1, description="adapted maps: " + ", ".join(TARGETS))
    down_scale: float = Field(1 / math.sqrt(3), gt=0, description="scale of the designed down-projection B_t "
                                                                  "(official 1/sqrt(3))")
    cov_dtype: Literal["float64", "float32"] = Field("float64", description="covariance accumulation dtype")
    cov_fraction: float = Field(1.0, gt=0, le=1, description="share of the task's training data (uniformly "
                                                             "spaced) used for the covariances; official: all")
    merge: bool = Field(True, description="fold each finished task's branch into the base weights "
                                          "(output-identical to keeping it, as the official code does)")
    memory: Literal["dualgpm", "gpm"] = Field(
        "dualgpm", description="memory of the protected inputs: dualgpm = the official update_DualGPM (methods/"
                               "inflora.py; a basis or its complement, switching at d/2); gpm = the official "
                               "plain update_GPM of the DomainNet model (methods/inflora_domain.py; a growing "
                               "basis)")
    stats_data: Literal["augmented", "plain"] = Field(
        "augmented", description="images of the covariance passes: augmented = the training augmentation, as the "
                                 "official code iterates its training loader (network in eval mode); plain = "
                                 "the un-augmented training images")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            preset = PRESETS.get(data["preset"])
            if preset is not None:
                data = {**preset, **data}
        return data

    @model_validator(mode="after")
    def _order(self) -> InfLoRAParams:
        if self.lambda_e < self.lambda_b:
            raise ValueError(f"lambda_e ({self.lambda_e}) must be >= lambda_b ({self.lambda_b})")
        return self


class InfLoRA(Method):
    name = "inflora"
    paper = "Liang & Li, InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning, CVPR 2024"
    code = "github.com/liangyanshuo/InfLoRA"
    Params = InfLoRAParams

    def __init__(self, params: InfLoRAParams | dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.sites: dict[str, LoRASite] = {}
        self.inputs: dict[str, AdaptedLinear] = {}  # input key -> the module whose input is collected
        self.site_input: dict[str, str] = {}  # site name -> input key
        self.memory: dict[str, Memory] = {}
        self.down: dict[str, torch.Tensor] = {}  # input key -> this task's B_t (for tests and inspection)
        self.tasks_done = 0
        self.cost: list[dict[str, float]] = []  # per task: seconds of covariance, design and memory update

    # -- structure ---------------------------------------------------------------------------------
    @hookimpl
    def configure_model(self, model: nn.Module, ctx: TaskContext) -> None:
        p = self.params
        try:
            self.sites = inject(model.backbone, p.targets, p.blocks)
        except ValueError as exc:
            raise ClbenchError(f"inflora: {exc}") from None
        names = {id(m): n for n, m in model.backbone.named_modules()}
        self.inputs, self.site_input = {}, {}
        for name, site in self.sites.items():
            owner = site.owner
            key = names[id(owner)]
            self.inputs[key] = owner
            self.site_input[name] = key

    def _add_branches(self, down: dict[str, torch.Tensor] | None) -> None:
        """A new branch on every site: ``A`` = the paper's B_t (frozen), ``B`` = the paper's A_t (zero)."""
        for name, site in self.sites.items():
            for old in site.branches:
                old.requires_grad_(False)
            branch: LoRABranch = site.add_branch(self.params.rank, scale=1.0)
            if down is not None:
                with torch.no_grad():
                    branch.A.copy_(down[self.site_input[name]].to(branch.A))
            branch.A.requires_grad_(False)

    @torch.no_grad()
    def collect(self, model, ctx) -> dict[str, torch.Tensor]:
        """Covariance of every adapted input over this task's training data with the current model."""
        was_training = model.training
        model.eval()
        backbone = getattr(model.backbone, "_orig_mod", model.backbone)  # hooks bypass torch.compile
        dtype = torch.float64 if self.params.cov_dtype == "float64" else torch.float32
        autocast = ctx.autocast if ctx.autocast is not None else None
        with CovarianceCollector(self.inputs, dtype, getattr(backbone, "token_mask", None)) as coll:
            for xb, _ in ctx.loader(fraction=self.params.cov_fraction,
                                    augmented=self.params.stats_data == "augmented"):
                if autocast is not None:
                    with autocast():
                        backbone(xb)
                else:
                    backbone(xb)
        model.train(was_training)
        if not coll.sums:
            raise ClbenchError(f"inflora: task {ctx.task} has no training data to collect covariances from")
        return coll.covariances()

    # -- lifecycle ---------------------------------------------------------------------------------
    @hookimpl
    def before_task(self, model: nn.Module, ctx: TaskContext) -> None:
        tic = time.perf_counter()
        covs = self.collect(model, ctx)
        t_cov = time.perf_counter() - tic
        tic = time.perf_counter()
        self.down = {k: design_down_projection(C, self.memory.get(k), self.params.rank, self.params.down_scale)
                     .float() for k, C in covs.items()}
        self._add_branches(self.down)
        self.cost.append({"cov_before": t_cov, "design": time.perf_counter() - tic})

    @hookimpl
    def param_groups(self, model: nn.Module, ctx: TaskContext) -> list[dict[str, Any]]:
        # only the current task's up-projections (the paper's A_t) train; the loop adds the head
        return [{"params": [s.branches[-1].B for s in self.sites.values()], "name": "inflora_A_t"}]

    @hookimpl
    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        tic = time.perf_counter()
        covs = self.collect(model, ctx)
        t_cov = time.perf_counter() - tic
        tic = time.perf_counter()
        eps = threshold(ctx.task, ctx.num_tasks, self.params.lambda_b, self.params.lambda_e)
        update = gpm_update if self.params.memory == "gpm" else dualgpm_update
        for key, C in covs.items():
            self.memory[key] = update(self.memory.get(key), C, eps)
        self.tasks_done = ctx.task + 1
        if self.cost:
            self.cost[-1].update({"cov_after": t_cov, "memory_update": time.perf_counter() - tic})

    @hookimpl
    def merge_task(self, model: nn.Module, ctx: TaskContext) -> None:
        if self.params.merge:
            for site in self.sites.values():
                site.merge()


    # -- checkpoints -------------------------------------------------------------------------------
    @hookimpl
    def method_state(self, ctx: TaskContext) -> dict[str, Any]:
        return {"tasks_done": self.tasks_done,
                "layers": list(self.memory),
                "kinds": [m.kind for m in self.memory.values()],
                "bases": [m.basis.clone() for m in self.memory.values()]}

    @hookimpl
    def load_method_state(self, model: nn.Module, state: dict[str, Any], ctx: TaskContext) -> None:
        self.memory = {k: Memory(b.double().cpu(), kind)
                       for k, kind, b in zip(state["layers"], state["kinds"], state["bases"])}
        self.tasks_done = int(state.get("tasks_done", ctx.task))
        if not self.params.merge:  # the checkpointed model holds one frozen branch per finished task
            for site in self.sites.values():
                while len(site.branches) < ctx.task:
                    site.add_branch(self.params.rank, scale=1.0).requires_grad_(False)


def register_methods(register: Callable[[type], None]) -> None:
    register(InfLoRA)
