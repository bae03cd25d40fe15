"""Dense weight changes of methods that train the backbone itself, reported in the vocabulary of the adapters.

A method that fine-tunes pre-trained weights (``trains_backbone``) has no factors to report for spectra; its
task's update of a linear map is the dense change ``W_t - W_(t-1)``. :func:`backbone_maps` names the same
maps the adapters use (``blocks.3.attn.q`` is the q rows of block 3's fused qkv weight, ``blocks.3.mlp.fc1``
...), so spectra of fine-tuning and of LoRA methods line up layer by layer, and :func:`factor_change` turns a
dense change into ``LowRank`` factors by an exact SVD, kept to its numerical rank or to its top k directions.
"""

from __future__ import annotations

import torch
from torch import nn

from clbench.model.lora import ATTN_SLICES, LowRank

MAPS = ("q", "k", "v", "proj", "fc1", "fc2")
REL_TOL = 1e-6  # as clbench.model.spectra: singular values below REL_TOL * s1 are rounding, not change


def _linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` itself, or the frozen base of an adapter wrapping it."""
    return module.base if hasattr(module, "base") and isinstance(module.base, nn.Linear) else module


def backbone_maps(backbone: nn.Module, maps: tuple[str, ...] = MAPS) -> dict[str, tuple[nn.Parameter, slice]]:
    """Every linear map of every transformer block of a timm ViT: name -> (weight parameter, output rows); of a
    language backbone, its attention projections q, k, v, o (the names of their LoRA sites)."""
    out: dict[str, tuple[nn.Parameter, slice]] = {}
    if hasattr(backbone, "attention_linears"):  # a language backbone (clbench.model.lm): its attention projections
        for i in range(len(backbone.blocks)):
            for m in ("q", "k", "v", "o"):
                for name, parent, attr in backbone.attention_linears(i, m):
                    w = _linear(getattr(parent, attr)).weight
                    out[name] = (w, slice(0, w.shape[0]))
        return out
    for i, block in enumerate(backbone.blocks):
        qkv = _linear(block.attn.qkv).weight
        d = qkv.shape[0] // 3
        for m in maps:
            if m in ATTN_SLICES:
                k = ATTN_SLICES.index(m)
                out[f"blocks.{i}.attn.{m}"] = (qkv, slice(k * d, (k + 1) * d))
            elif m == "proj":
                w = _linear(block.attn.proj).weight
                out[f"blocks.{i}.attn.proj"] = (w, slice(0, w.shape[0]))
            else:
                w = _linear(getattr(block.mlp, m)).weight
                out[f"blocks.{i}.mlp.{m}"] = (w, slice(0, w.shape[0]))
    return out


def snapshot_maps(maps: dict[str, tuple[nn.Parameter, slice]]) -> dict[str, torch.Tensor]:
    """A copy of every map's weight rows (on their device), to diff against after the task."""
    return {n: w.detach()[rows].clone() for n, (w, rows) in maps.items()}


@torch.no_grad()
def factor_change(delta: torch.Tensor, rank: int | None = None) -> LowRank:
    """``delta ~= B @ A`` from an exact SVD of ``delta`` (computed in float32 on its device, returned on the
    host): ``B = U_k diag(S_k)``, ``A = V_k^T`` with k the numerical rank (singular values above
    ``REL_TOL * s1``), capped at ``rank`` when given. With ``rank=None`` the factors reproduce ``delta`` up to
    float32 rounding; with a cap they are its best rank-k approximation (Eckart-Young)."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = int((S > REL_TOL * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    k = max(1, min(k, rank) if rank is not None else k)  # an unchanged map reports one zero direction
    return LowRank((U[:, :k] * S[:k]).cpu(), Vh[:k].cpu())


def task_changes(maps: dict[str, tuple[nn.Parameter, slice]], before: dict[str, torch.Tensor],
                 rank: int | None = None) -> dict[str, LowRank]:
    """Every map's change since ``before`` as factors (see :func:`factor_change`)."""
    return {n: factor_change(w.detach()[rows].float() - before[n].float(), rank) for n, (w, rows) in maps.items()}
