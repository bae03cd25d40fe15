"""CL-LoRA: dual task-shared / task-specific low-rank adapters, as the ``cllora`` method plugin.

Paper: Jiangpeng He, Zhihao Duan, Fengqing Zhu, "CL-LoRA: Continual Low-Rank Adaptation for Rehearsal-Free
Class-Incremental Learning", CVPR 2025 (arXiv 2505.24816). Official code: github.com/JiangpengHe/CL-LoRA
(``models/cllora.py``, ``backbone/vit_cllora.py``, ``utils/inc_net.py::OurNet``, ``backbone/linears.py::
CosineLinearFeature``). The algorithm in our words, every deviation and the hyperparameter table:
docs/METHODS.md section 7.

Naming. The official ``Adapter_lora`` calls its down-projection ``lora_B`` (r x d) and its up-projection
``lora_A`` (d x r); here, as everywhere in ``clbench.model.lora``, ``branch.A`` (r x d_in) is the down-projection
and ``branch.B`` (d_out x r) the up-projection, so the official ``lora_A`` is our ``B``.

The method, on the q and v maps (``targets``) of a ViT:

* **Task-shared adapters** in the first half of the blocks (``shared_blocks``): one branch per site for the
  whole stream; ``A`` is a fixed random orthonormal matrix (QR of a uniform random matrix), only ``B``
  trains. From the second task on, the loss gains ``kd_weight * KD`` where KD is the soft-target
  cross-entropy (temperature ``kd_temperature``) between the current task's head applied to the
  *shared blocks only* (the other blocks are skipped, then the final norm and the class token) with the
  current shared adapters (student) and with the previous task's shared adapters (teacher). **Gradient
  reassignment**: the KD gradient of every shared ``B`` is scaled per output row by that row's norm in the
  teacher's ``B``, normalised to mean 1 (the cross-entropy gradient is not scaled).
* **Task-specific adapters** in the other blocks (``specific_blocks``): a fresh branch per task and site
  (random orthonormal ``A`` and zero ``B``, both trained), frozen after its task, each multiplied by a
  learnable **block-wise weight**: one (3 x n_specific) tensor per task (rows q, k, v), drawn from
  U(0.5, 1.5). From the second task on the loss gains ``orth_weight`` times the mean over finished tasks of
  ``|cos(flatten(w_t), flatten(w_j))|``.
* **Heads**: while a task trains, its head is the official cosine classifier ``sigma * cos(f, w)``
  (learnable ``sigma``, no bias). After the task, its rows become the class **prototypes**: the mean
  feature of each class's training images computed with that task's specific adapters.
* **Inference**: one forward pass per finished task j, with the (current) shared adapters and task j's
  specific adapters and block weights, and logits ``cos(f_j(x), p_c)`` for the classes c of task j; the
  prediction is the argmax over all seen classes (the official ``forward_test`` + ``forward_diagonal``).

How this maps onto the loop's contract (no new hook, no loop change): ``configure_model`` returns a
:class:`CLLoRAModel`, a :class:`~clbench.model.backbones.CLModel` around the same backbone whose heads are
cosine heads and whose ``forward(x, head=j)`` runs the backbone with task j's specific adapters selected
and applies head j; ``forward(x)`` concatenates ``forward(x, head=j)`` over every head. The loop's
training loss ``model(x, head=t)`` is therefore the official training forward, ``after_task`` sets head t
to its prototypes (sigma 1), and the loop's evaluation ``model(x)[:, :n_seen]`` is the official inference:
CIL is its argmax, TIL the argmax within the true task's slice (the official "task acc").

Spectra (``task_updates``): for a shared site, this task's change of its update ``(B_t - B_{t-1}) A``
(A is fixed, so this is exact at rank r); for a specific site, task t's own branch ``w_t B_t A_t`` (its
block weight folded into B). The summed "effective weight" the contract checks is therefore the base
weight plus the shared update plus every task's weighted specific update, of which inference uses one at a
time; it changes across a task exactly by the reported updates.

Deviations from the official code (details and reasons: docs/METHODS.md section 7):

* one optimizer step per batch on ``grad(CE + orth) + w * grad(KD)``, where the official code steps on the
  reassigned KD gradient and then again on CE + orth (a second backward through a graph whose weights the
  first step changed, which newer PyTorch refuses); weight decay of the shared B and the training head is
  therefore applied once per batch instead of twice;
* only the prototypes inference reads are computed (the official code also computes unused off-diagonal
  ones), accumulated in float64;
* an all-zero teacher B gives reassignment weights 1 instead of a division by zero;
* task t's specific adapters and block weights are drawn at the start of task t (official: end of t-1);
* q and v are row slices of timm's fused qkv (official: separate linears); default block halves for any depth;
* harness: cosine schedule per step (official per epoch), class order and ImageNet-R split, augmentation.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from clbench import (
    ATTN_SLICES,
    BackboneFacts,
    ClbenchError,
    CLModel,
    LoRABranch,
    LoRASite,
    LowRank,
    Method,
    StepBatch,
    hookimpl,
    inject,
)

# ----------------------------------------------------------------------------------------------------
# Building blocks (tested directly)
# ----------------------------------------------------------------------------------------------------


def random_orthonormal(rank: int, d_in: int, device: torch.device | None = None) -> torch.Tensor:
    """The official fixed down-projection: ``Q^T`` of the QR decomposition of a U(0, 1) (d_in x r) matrix,
    so its r rows are orthonormal."""
    q, _ = torch.linalg.qr(torch.rand(d_in, rank))
    return q.t().contiguous().to(device)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official ``_KD_loss``: cross-entropy of ``log_softmax(student/T)`` against ``softmax(teacher/T)``,
    summed over classes and averaged over the batch (no T^2 factor, the teacher is not detached)."""
    log_p = torch.log_softmax(student.float() / temperature, dim=1)
    q = torch.softmax(teacher.float() / temperature, dim=1)
    return -(q * log_p).sum() / student.shape[0]


def orthogonality_loss(previous: list[torch.Tensor], current: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The official ``compute_orthogonality_loss``: mean over ``previous`` of ``|cos|`` between flattened
    tensors (norms plus ``eps``)."""
    cur = current.flatten() / (current.norm() + eps)
    total = current.new_zeros(())
    for prev in previous:
        total = total + torch.abs(torch.sum(prev.flatten() / (prev.norm() + eps) * cur))
    return total / max(1, len(previous))


def reassignment_weights(teacher_B: torch.Tensor) -> torch.Tensor:
    """Row weights of the gradient reassignment: the teacher's up-projection row norms scaled to mean 1
    (official ``len(w) * w / sum(w)``). All-zero rows (an untrained teacher) give weight 1 everywhere
    rather than the official division by zero."""
    norms = teacher_B.float().norm(dim=1)
    total = norms.sum()
    if float(total) <= 0:
        return torch.ones_like(norms)
    return len(norms) * norms / total


class _ScaleRows(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient's rows by ``w`` (gradient reassignment)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(w)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        (w,) = ctx.saved_tensors
        return grad * w.to(grad.dtype).unsqueeze(1), None


class CosineHead(nn.Module):
    """The official ``CosineLinearFeature``: ``sigma * normalize(f) @ normalize(W)^T``, no bias, learnable
    ``sigma`` starting at 1, ``W`` drawn from U(-1/sqrt(d), 1/sqrt(d))."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, num_classes
        bound = 1.0 / in_features ** 0.5
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).uniform_(-bound, bound))
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.linear(F.normalize(f, dim=1), F.normalize(self.weight, dim=1))


class _Selector:
    """Which task's specific adapters the backbone runs with (shared by the model and its branches)."""

    def __init__(self) -> None:
        self.task = 0


class SharedBranch(LoRABranch):
    """A task-shared branch: fixed orthonormal ``A``, trained ``B``, plus the teacher's ``B`` (a buffer
    holding ``B`` at the end of the previous task) and two switches used only by the KD forward."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__(d_in, d_out, rank, scale=1.0)
        self.register_buffer("teacher_B", torch.zeros(d_out, rank))
        self.use_teacher = False
        self.grad_rows: torch.Tensor | None = None  # reassignment weights while the student KD pass runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_teacher:
            B = self.teacher_B
        elif self.grad_rows is not None:
            B = _ScaleRows.apply(self.B, self.grad_rows)
        else:
            B = self.B
        return (x @ self.A.t()) @ B.t()


class SpecificBranch(LoRABranch):
    """Task ``task``'s specific branch, scaled by its block weight ``weights[task][row, col]``; it adds
    nothing unless the selector names its task (so one forward pass runs one task's adapters)."""

    def __init__(self, d_in: int, d_out: int, rank: int, slot: tuple[int, int, int],
                 weights: nn.ParameterList, selector: _Selector) -> None:
        super().__init__(d_in, d_out, rank, scale=1.0)
        self.task, self.row, self.col = slot  # its task, and its block weight's row and column
        object.__setattr__(self, "_weights", weights)  # owned by the model, not a submodule of the branch
        object.__setattr__(self, "_selector", selector)

    def block_weight(self) -> torch.Tensor:
        return self._weights[self.task][self.row, self.col]

    def effective_B(self) -> torch.Tensor:
        return self.B * self.block_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor | float:
        if self._selector.task != self.task:
            return 0.0  # broadcasts in LoRASite / AdaptedLinear sums; costs nothing
        return ((x @ self.A.t()) @ self.B.t()) * self.block_weight()


class CLLoRAModel(CLModel):
    """A :class:`CLModel` around the same backbone with cosine heads, one block-weight tensor per task and
    task-selected specific adapters: ``forward(x, head=j)`` runs task j's adapters and head j;
    ``forward(x)`` is the official inference (one pass per task, logits concatenated)."""

    def __init__(self, base: CLModel) -> None:
        super().__init__(base.backbone, base.image_size, base.in_chans, base.mean.flatten().tolist(),
                         base.std.flatten().tolist())
        self.heads = base.heads
        self.block_weights = nn.ParameterList()
        self.selector = _Selector()
        self.live_task = 0  # the task whose specific adapters train (features() uses it)

    def add_head(self, num_classes: int) -> CosineHead:
        head = CosineHead(self.feature_dim, num_classes).to(self.mean.device)
        self.heads.append(head)
        return head

    def task_features(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Pooled features with the shared adapters and task ``task``'s specific adapters."""
        self.selector.task = task
        try:
            return self.backbone(x)
        finally:
            self.selector.task = self.live_task

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.task_features(x, self.live_task)

    def forward(self, x: torch.Tensor, head: int | None = None) -> torch.Tensor:
        if head is not None:
            return self.heads[head](self.task_features(x, head))
        return torch.cat([h(self.task_features(x, j)) for j, h in enumerate(self.heads)], -1)


def _autocast(ctx) -> Any:
    """The loop's compute-dtype context (bf16 autocast on CUDA), or a no-op."""
    return ctx.autocast() if ctx.autocast is not None else contextlib.nullcontext()


def shared_blocks_features(backbone: nn.Module, x: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    """The official ``forward_general_cls`` path: embeddings, only the given blocks (in order), the final
    norm and the pooled class token of a timm ViT."""
    bb = getattr(backbone, "_orig_mod", backbone)
    x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
    for j in blocks:
        x = bb.blocks[j](x)
    return bb.forward_head(bb.norm(x), pre_logits=True)


# ----------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------


class CLLoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(10, ge=1, description="rank of every shared and specific adapter ('ffn_num'; official "
                                            "10, CIFAR-100 config 8)")
    targets: list[str] = Field(["q", "v"], min_length=1, description="adapted attention maps among q, k, v "
                                                                     "(official 'msa' [1, 0, 1] = q and v)")
    shared_blocks: list[int] | None = Field(None, description="blocks with the task-shared adapters "
                                                              "('general_pos'; default: the first half)")
    specific_blocks: list[int] | None = Field(None, description="blocks with task-specific adapters "
                                                                "('specfic_pos'; default: the second half)")
    distillation: bool = Field(True, description="KD of the shared adapters from the previous task "
                                                 "('use_distillation')")
    kd_weight: float = Field(5.0, ge=0, description="weight of the KD loss (official 5)")
    kd_temperature: float = Field(2.0, gt=0, description="KD temperature (official 2)")
    gradient_reassignment: bool = Field(True, description="scale the KD gradient of each shared up-projection "
                                                          "row by the teacher's row norm (official: on)")
    block_weights: bool = Field(True, description="learnable block-wise weights of the specific adapters "
                                                  "('use_block_weight'); off: weight 1, no orthogonality loss")
    block_weight_init: tuple[float, float] = Field((0.5, 1.5), description="U(low, high) initialisation of "
                                                                           "each task's block weights")
    orth_weight: float = Field(1e-4, ge=0, description="weight of the block-weight orthogonality loss "
                                                       "(official 1e-4)")

    def check_against(self, backbone: BackboneFacts) -> list[str]:
        """Both block lists name blocks the backbone has; the rank fits every adapted attention map (the
        down-projections are rank x d_in)."""
        problems = [backbone.blocks_problem(f, getattr(self, f)) for f in ("shared_blocks", "specific_blocks")]
        return [p for p in (*problems, backbone.rank_problem(self.rank, self.targets)) if p]

    @model_validator(mode="after")
    def _check(self) -> CLLoRAParams:
        bad = [t for t in self.targets if t not in ATTN_SLICES]
        if bad or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must be distinct names among {list(ATTN_SLICES)} (got {self.targets})")
        lo, hi = self.block_weight_init
        if not lo <= hi:
            raise ValueError(f"block_weight_init must be (low, high) with low <= high, got {self.block_weight_init}")
        return self


class CLLoRA(Method):
    name = "cllora"
    aliases = ("cl-lora",)
    paper = ("He, Duan & Zhu, CL-LoRA: Continual Low-Rank Adaptation for Rehearsal-Free Class-Incremental "
             "Learning, CVPR 2025")
    code = "github.com/JiangpengHe/CL-LoRA"
    Params = CLLoRAParams
    backbones = ("image",)
    backbones_note = ("its model replaces the ViT's forward (shared and task-specific blocks, then the class "
                      "token's cosine head and prototypes); CL-LoRA has no language form")

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.model: CLLoRAModel | None = None
        self.shared: dict[str, SharedBranch] = {}
        self.specific_sites: dict[str, LoRASite] = {}
        self.shared_block_ids: list[int] = []
        self.specific_block_ids: list[int] = []
        self.tasks_done = 0
        self._shared_before: dict[str, torch.Tensor] = {}
        self._task_update: dict[str, LowRank] = {}

    # -- structure ---------------------------------------------------------------------------------
    def _blocks(self, depth: int) -> tuple[list[int], list[int]]:
        p = self.params
        shared = sorted(p.shared_blocks) if p.shared_blocks is not None else list(range(depth // 2))
        specific = sorted(p.specific_blocks) if p.specific_blocks is not None else list(range(depth // 2, depth))
        bad = [b for b in shared + specific if not 0 <= b < depth]
        if bad:
            raise ClbenchError(f"cllora: blocks {bad} do not exist; the backbone has blocks 0..{depth - 1} "
                               "(fix params.shared_blocks / params.specific_blocks)")
        if set(shared) & set(specific):
            raise ClbenchError(f"cllora: blocks {sorted(set(shared) & set(specific))} are both shared and "
                               "specific; give disjoint params.shared_blocks and params.specific_blocks")
        if not specific:
            raise ClbenchError("cllora: no task-specific blocks (params.specific_blocks is empty)")
        return shared, specific

    @hookimpl
    def configure_model(self, model, ctx):
        p = self.params
        self.shared_block_ids, self.specific_block_ids = self._blocks(len(model.backbone.blocks))
        self.model = CLLoRAModel(model)
        shared_sites = inject(model.backbone, p.targets, self.shared_block_ids) if self.shared_block_ids else {}
        self.specific_sites = inject(model.backbone, p.targets, self.specific_block_ids)
        self.shared = {}
        for name, site in shared_sites.items():
            branch = SharedBranch(site.d_in, site.d_out, p.rank).to(site.weight.device)
            with torch.no_grad():
                branch.A.copy_(random_orthonormal(p.rank, site.d_in))
            branch.A.requires_grad_(False)
            site.branches.append(branch)
            self.shared[name] = branch
        return self.model

    def _add_task(self, task: int, trainable: bool) -> None:
        """Task ``task``'s block-weight tensor and specific branches (random orthonormal A, zero B)."""
        p, model = self.params, self.model
        lo, hi = p.block_weight_init
        device = model.mean.device
        if p.block_weights:
            w = torch.empty(3, len(self.specific_block_ids)).uniform_(lo, hi)
        else:
            w = torch.ones(3, len(self.specific_block_ids))
        model.block_weights.append(nn.Parameter(w.to(device), requires_grad=trainable and p.block_weights))
        for name, site in self.specific_sites.items():
            block = int(name.split(".")[1])
            row, col = ATTN_SLICES.index(name.rsplit(".", 1)[1]), self.specific_block_ids.index(block)
            branch = SpecificBranch(site.d_in, site.d_out, p.rank, (task, row, col), model.block_weights,
                                    model.selector).to(site.weight.device)
            with torch.no_grad():
                branch.A.copy_(random_orthonormal(p.rank, site.d_in))
            branch.requires_grad_(trainable)
            site.branches.append(branch)

    def _current_specific(self) -> list[SpecificBranch]:
        return [s.branches[-1] for s in self.specific_sites.values()]

    # -- lifecycle ---------------------------------------------------------------------------------
    @hookimpl
    def before_task(self, model, ctx):
        for site in self.specific_sites.values():
            site.branches.requires_grad_(False)
        for w in model.block_weights:
            w.requires_grad_(False)
        self._add_task(ctx.task, trainable=True)
        model.live_task = model.selector.task = ctx.task
        self._shared_before = {n: b.B.detach().clone() for n, b in self.shared.items()}

    @hookimpl
    def param_groups(self, model, ctx):
        params = [b.B for b in self.shared.values()]
        for b in self._current_specific():
            params += [b.A, b.B]
        if self.params.block_weights:
            params.append(model.block_weights[ctx.task])
        return [{"params": params, "name": "cllora"}]

    def _kd(self, model: CLLoRAModel, x: torch.Tensor, ctx) -> torch.Tensor:
        """KD of the shared blocks' head outputs from the previous task's shared adapters (teacher)."""
        head, blocks = model.heads[ctx.task], self.shared_block_ids
        with torch.no_grad(), _autocast(ctx):
            for b in self.shared.values():
                b.use_teacher = True
            try:
                f_teacher = shared_blocks_features(model.backbone, x, blocks)
            finally:
                for b in self.shared.values():
                    b.use_teacher = False
        for b in self.shared.values():
            b.grad_rows = reassignment_weights(b.teacher_B) if self.params.gradient_reassignment else None
        try:
            with _autocast(ctx):
                f_student = shared_blocks_features(model.backbone, x, blocks)
        finally:
            for b in self.shared.values():
                b.grad_rows = None
        # the teacher's logits go through the current (trainable) head, as in the official forward_kd
        return kd_loss(head(f_student.float()), head(f_teacher.float()), self.params.kd_temperature)

    @hookimpl
    def loss_terms(self, model, ctx, step: StepBatch):
        if ctx.task == 0:
            return None
        p, terms = self.params, {}
        if p.distillation and self.shared and p.kd_weight > 0:
            terms["kd"] = p.kd_weight * self._kd(model, step.batch[0], ctx)
        if p.block_weights and p.orth_weight > 0:
            terms["orth"] = p.orth_weight * orthogonality_loss(list(model.block_weights[: ctx.task]),
                                                               model.block_weights[ctx.task])
        return terms

    @torch.no_grad()
    def prototypes(self, model: CLLoRAModel, ctx) -> torch.Tensor:
        """Class means (num_classes x d) of this task's training features with its specific adapters."""
        sums = torch.zeros(ctx.num_classes, model.feature_dim, dtype=torch.float64, device=ctx.device)
        counts = torch.zeros(ctx.num_classes, dtype=torch.float64, device=ctx.device)
        for xb, yb in ctx.loader():
            with _autocast(ctx):
                f = model.task_features(xb, ctx.task)
            sums.index_add_(0, yb, f.double())
            counts += torch.bincount(yb, minlength=ctx.num_classes).double()
        return (sums / counts.clamp_min(1).unsqueeze(1)).float()

    @hookimpl
    def after_task(self, model, ctx):
        was_training = model.training
        model.eval()
        protos = self.prototypes(model, ctx)
        model.train(was_training)
        head = model.heads[ctx.task]
        with torch.no_grad():
            head.weight.copy_(protos.to(head.weight))
            head.sigma.fill_(1.0)
        head.requires_grad_(False)
        self._task_update = {n: LowRank((b.B.detach() - self._shared_before[n]).float(), b.A.detach().float())
                             for n, b in self.shared.items()}
        self._task_update.update({n: s.branches[-1].lowrank() for n, s in self.specific_sites.items()})
        for b in self.shared.values():  # the next task's teacher
            b.teacher_B.copy_(b.B.detach())
        self.tasks_done = ctx.task + 1

    @hookimpl
    def task_updates(self, model, ctx):
        return self._task_update

    # -- checkpoints -------------------------------------------------------------------------------
    @hookimpl
    def method_state(self, ctx):
        # everything else (specific branches, block weights, teachers, prototype heads) is in the model
        return {"tasks_done": self.tasks_done}

    @hookimpl
    def load_method_state(self, model, state, ctx):
        done = int(state.get("tasks_done", ctx.task + 1))
        if done != ctx.task + 1:
            raise ClbenchError(f"checkpoint: cllora state says {done} finished tasks, the loop {ctx.task + 1}; "
                               "run again with --restart")
        for t in range(done):
            self._add_task(t, trainable=False)
        self.tasks_done = done


def register_methods(register):
    register(CLLoRA)
