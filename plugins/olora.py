"""O-LoRA: orthogonal subspace learning for continual learning, applied to a ViT.

Paper: Xiao Wang, Tianze Chen, Qiming Ge, Han Xia, Rong Bao, Rui Zheng, Qi Zhang, Tao Gui, Xuanjing Huang,
"Orthogonal Subspace Learning for Language Model Continual Learning", EMNLP 2023 Findings, arXiv 2310.14152.
Official code: github.com/cmnfriend/O-LoRA (``src/peft/tuners/lora.py``, ``src/uie_trainer_lora.py``), NLP only.

The rule (docs/METHODS.md section 4, "olora"), per adapted layer and task t:

* a fresh LoRA branch ``(alpha / r) B_t A_t`` (A Kaiming-uniform, B zero) is trained; the branches of tasks
  0..t-1 stay in the forward pass as frozen low-rank branches (not merged), so the model needs no task id.
  As in the official code, they are stored as one frozen branch of rank ``r * t`` whose A and B are the
  row / column concatenations of the earlier tasks' factors (``merge_task`` appends the finished task's
  factors), so a step at task 10 runs two branches per site, not ten;
* loss = task loss + ``lambda1 * sum_layers || A_prev A_t^T ||_1`` (entrywise L1 of the inner products between
  the rows of all earlier tasks' down-projections ``A_prev`` and the new one) + ``lambda2 * sum ||theta||_F``
  over the new A and B of every layer (unsquared Frobenius norms). The two terms are logged as
  ``train/olora_orth`` and ``train/olora_l2`` (already multiplied by their lambdas, as they enter the loss).

The task's update reported for spectra is its new branch ``(alpha / r) B_t A_t``; the harness computes it
(``clbench.methods.probes.TaskUpdateProbe``: the frozen earlier branches do not change during the task).

ViT-specific choices (there is no official ViT version):

* sites are the q and v slices of timm's fused ``qkv`` projection of every block (the PEFT/T5 default of the
  official code is q and v too); r = 8, alpha = 32 (scale 4) as in the official scripts;
* per-task linear heads and cross-entropy on the current task's logits (the harness protocol) replace the
  generated label text of the official code;
* the orthogonality term is computed once per step for all sites that share a shape, as one batched matrix
  product ``(S, r_prev, d_in) x (S, d_in, r)``; this equals the official per-layer loop exactly.

Deviations from the official code:

* ``dropout`` defaults to 0 (official: ``lora_dropout = 0.1``) so that the training settings match the naive
  LoRA baseline of the ViT suites (the ViT continual-LoRA protocols use no LoRA dropout);
* with dropout > 0 the frozen branch and the new one draw separate dropout masks (the official code applies one
  ``lora_dropout`` to the input of both); at the default dropout 0 this changes nothing;
* ``merge_frozen: true`` (off by default, a speed option the official code does not have) folds each finished
  task's branch into the frozen base weight; the earlier A's are kept in the method state so the
  orthogonality term is unchanged, and outputs are identical up to float rounding;
* the official code adds the penalties to the loss even when a lambda is 0; here a term whose lambda is 0 (and
  the orthogonality term of the first task, which is 0) is not computed, which changes nothing in the loss;
* ``lambda1`` / ``lambda2`` may be per-task lists, as in the official long-sequence script
  (``logs_and_outputs/long_olora/hyparam.sh``), which sets them per task by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from clbench import ClbenchError, LoRABranch, LoRAParams, LoRASite, Method, TaskContext, hookimpl, inject


class OLoRAParams(LoRAParams):
    rank: int = Field(8, ge=1, description="rank r of each task's LoRA")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; every branch is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input (official: 0.1)")
    lambda1: float | list[float] = Field(
        0.5, description="weight of the orthogonality term sum |A_prev A_t^T|; a number or one value per task")
    lambda2: float | list[float] = Field(
        0.0, description="weight of the unsquared Frobenius norms of the new A and B; a number or one per task")
    merge_frozen: bool = Field(False, description="fold each finished task's branch into the base weights "
                                                  "(faster; the old A's are kept for the orthogonality term)")

    @field_validator("lambda1", "lambda2")
    @classmethod
    def _non_negative(cls, v: float | list[float]) -> float | list[float]:
        if min(v if isinstance(v, list) else [v], default=0.0) < 0:
            raise ValueError("must be >= 0 (a negative weight would reward overlap)")
        return v


def _per_task(value: float | list[float], task: int) -> float:
    return float(value[task]) if isinstance(value, list) else float(value)


class OLoRA(Method):
    name = "olora"
    paper = "Wang et al., Orthogonal Subspace Learning for Language Model Continual Learning, EMNLP Findings 2023"
    code = "github.com/cmnfriend/O-LoRA"
    Params = OLoRAParams

    def __init__(self, params: OLoRAParams | dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.sites: dict[str, LoRASite] = {}
        # Per site: the down-projections of every finished task, (r_sum x d_in), kept apart from the model so
        # that the orthogonality term survives merging; this is the method's state for checkpoints.
        self.old_A: dict[str, torch.Tensor] = {}
        self.tasks_done = 0
        self._new: dict[str, LoRABranch] = {}
        self._groups: list[tuple[list[str], torch.Tensor]] = []  # (site names, stacked old A's) per shape

    # -- structure --------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.params.scale

    def _add_branches(self) -> dict[str, LoRABranch]:
        p = self.params
        return {n: s.add_branch(p.rank, scale=self.scale, dropout=p.dropout) for n, s in self.sites.items()}

    def _freeze_all(self) -> None:
        for site in self.sites.values():
            for b in site.branches:
                b.requires_grad_(False)
                for p in b.parameters():
                    p.grad = None  # a stale gradient from the branch's own task would linger otherwise

    def _build_groups(self) -> None:
        """Stack the old A's of sites with equal shapes once per task, so a step costs one bmm per shape."""
        by_shape: dict[tuple, list[str]] = {}
        for n in sorted(self.sites):
            A = self.old_A.get(n)
            if A is not None and A.shape[0] > 0:
                by_shape.setdefault((tuple(A.shape), A.device, A.dtype), []).append(n)
        self._groups = [(names, torch.stack([self.old_A[n] for n in names])) for names in by_shape.values()]

    # -- hooks ------------------------------------------------------------------------------------
    @hookimpl
    def configure_model(self, model: nn.Module, ctx: TaskContext) -> None:
        for key in ("lambda1", "lambda2"):
            value = getattr(self.params, key)
            if isinstance(value, list) and len(value) < ctx.num_tasks:
                raise ClbenchError(f"olora: params.{key} lists {len(value)} value(s) but the stream has "
                                   f"{ctx.num_tasks} tasks; give one value per task or a single number")
        self.sites = inject(model.backbone, self.params.targets, self.params.blocks)

    @hookimpl
    def before_task(self, model: nn.Module, ctx: TaskContext) -> None:
        self._freeze_all()
        self._new = self._add_branches()
        self._build_groups()

    @hookimpl
    def param_groups(self, model: nn.Module, ctx: TaskContext) -> list[dict[str, Any]]:
        return [{"params": [p for b in self._new.values() for p in b.parameters()], "name": "olora"}]

    @hookimpl
    def loss_terms(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], logits: torch.Tensor,
                   ctx: TaskContext) -> dict[str, torch.Tensor] | None:
        terms: dict[str, torch.Tensor] = {}
        lam1, lam2 = _per_task(self.params.lambda1, ctx.task), _per_task(self.params.lambda2, ctx.task)
        if lam1 != 0 and self._groups:
            orth = sum(self.orthogonality(names, prev) for names, prev in self._groups)
            terms["olora_orth"] = lam1 * orth
        if lam2 != 0:
            factors = [f for b in self._new.values() for f in (b.A, b.B)]
            terms["olora_l2"] = lam2 * torch.stack([f.norm() for f in factors]).sum()
        return terms

    def orthogonality(self, names: list[str], prev: torch.Tensor) -> torch.Tensor:
        """``sum_sites || A_prev A_t^T ||_1`` for sites sharing one shape; ``prev`` is (S, r_sum, d_in)."""
        new = torch.stack([self._new[n].A for n in names])  # (S, r, d_in)
        return torch.bmm(prev, new.transpose(1, 2)).abs().sum()

    @hookimpl
    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        self._freeze_all()
        for n, b in self._new.items():
            A = b.A.detach().clone()
            self.old_A[n] = A if n not in self.old_A else torch.cat([self.old_A[n], A], 0)
        self.tasks_done = ctx.task + 1

    @hookimpl
    def merge_task(self, model: nn.Module, ctx: TaskContext) -> None:
        if self.params.merge_frozen:
            self.merge_frozen()
        else:
            self.concatenate_frozen()

    def concatenate_frozen(self) -> None:
        """Replace a site's frozen branches by one frozen branch of their concatenated factors (same output)."""
        for site in self.sites.values():
            if len(site.branches) < 2:
                continue
            parts = list(site.branches)
            joined = LoRABranch(site.d_in, site.d_out, sum(b.rank for b in parts), scale=self.scale,
                                dropout=self.params.dropout).to(parts[0].A.device)
            with torch.no_grad():
                joined.A.copy_(torch.cat([b.A for b in parts], 0))
                joined.B.copy_(torch.cat([b.B for b in parts], 1))
            joined.requires_grad_(False)
            site.branches = torch.nn.ModuleList([joined])

    def merge_frozen(self) -> None:
        """Fold every frozen branch into its site's base weight (the old A's stay in ``old_A``)."""
        for site in self.sites.values():
            frozen = [i for i, b in enumerate(site.branches) if not any(p.requires_grad for p in b.parameters())]
            site.merge(frozen)


    @hookimpl
    def method_state(self, ctx: TaskContext) -> dict[str, Any]:
        return {"old_A": {n: A.cpu() for n, A in self.old_A.items()}, "tasks_done": self.tasks_done,
                "merged": self.params.merge_frozen}

    @hookimpl
    def load_method_state(self, model: nn.Module, state: dict[str, Any], ctx: TaskContext) -> None:
        if not self.sites:
            self.sites = inject(model.backbone, self.params.targets, self.params.blocks)
        if bool(state["merged"]) != self.params.merge_frozen:
            raise ClbenchError("olora: the checkpoint was written with merge_frozen="
                               f"{state['merged']} but the run sets merge_frozen={self.params.merge_frozen}; "
                               "resume with the same params")
        missing = sorted(set(self.sites) - set(state["old_A"]))
        if state["tasks_done"] and missing:
            raise ClbenchError(f"olora: the checkpoint has no adapter state for {missing[0]}; "
                               "resume with the same targets and blocks")
        device = next(model.parameters()).device
        self.old_A = {n: A.to(device) for n, A in state["old_A"].items() if n in self.sites}
        self.tasks_done = int(state["tasks_done"])
        if not self.params.merge_frozen and self.tasks_done and not any(len(s.branches) for s in self.sites.values()):
            # The frozen branch of the finished tasks (rank r * tasks) so the checkpointed state dict loads.
            for site in self.sites.values():
                site.add_branch(self.params.rank * self.tasks_done, scale=self.scale, dropout=self.params.dropout)
            self._freeze_all()


def register_methods(register: Callable[[type], None]) -> None:
    register(OLoRA)
