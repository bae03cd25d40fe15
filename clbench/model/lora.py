"""The shared low-rank adapter: branches ``scale * B diag(gain) A`` attached to linear maps of a timm ViT.

Vocabulary used by every method plugin:

* a **site** (:class:`LoRASite`) is one adapted linear map: a whole ``nn.Linear`` (``proj``, ``fc1``,
  ``fc2``) or one of the q/k/v slices of timm's fused ``qkv`` projection. Sites are named like
  ``blocks.3.attn.k`` and hold any number of **branches**;
* a **branch** (:class:`LoRABranch`) computes ``scale * B diag(gain) A x`` with ``A`` (r x d_in, the
  down-projection) and ``B`` (d_out x r, the up-projection); ``gain`` is optional (a learnable scalar or
  vector, as in EBLoRA);
* :class:`LowRank` is a factored update ``delta W = B @ A`` handed to the spectra code;
* :class:`AdapterParams` / :class:`LoRAParams` are the params every adapter method shares (rank, targets,
  blocks; alpha, dropout), so a typo in a suite's ``targets`` fails validation with one line;
* ``clbench.methods.probes.TaskUpdateProbe`` is the harness's default ``task_updates``: the change of every site's branches
  across the task, so a method need not compute its own update to report spectra.

Merging a branch adds its dense update into the frozen base weight (slice) and removes the branch, so
evaluation after merging runs at the bare backbone's cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from torch import nn

ATTN_SLICES = ("q", "k", "v")
Target = Literal["q", "k", "v", "qkv", "proj", "fc1", "fc2", "o"]  # o: a language backbone's output projection
TARGETS: tuple[str, ...] = get_args(Target)


@dataclass(frozen=True)
class LowRank:
    """A factored update ``delta W = B @ A``; B is (d_out x r), A is (r x d_in). Scales live in B."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def __sub__(self, other: LowRank) -> LowRank:
        """``B1 A1 - B0 A0 = [B1, -B0] [A1; A0]`` as factors of rank r1 + r0."""
        return LowRank(torch.cat([self.B, -other.B], 1), torch.cat([self.A, other.A], 0))

    @staticmethod
    def sum(parts: Iterable[LowRank]) -> LowRank | None:
        """Sum of factored updates as one factored update (ranks add)."""
        parts = list(parts)
        if not parts:
            return None
        return LowRank(torch.cat([p.B for p in parts], 1), torch.cat([p.A for p in parts], 0))


class LoRABranch(nn.Module):
    """``delta(x) = scale * B diag(gain) A x``.

    Default initialisation is LoRA's (Hu et al.; PEFT): A Kaiming-uniform with a = sqrt(5), B zero, so the
    branch starts as the identity update. ``gain`` is None (no gain), ``"scalar"`` (shape (1,)) or
    ``"vector"`` (shape (r,)); it starts at 1 (a method sets its own start in place, as EBLoRA's s).
    """

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float = 1.0, gain: str | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.rank, self.scale = rank, float(scale)
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if gain is None:
            self.gain = None
        else:
            self.gain = nn.Parameter(torch.ones((1,) if gain == "scalar" else (rank,)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def effective_B(self) -> torch.Tensor:
        """B with the scale and gain folded in, so that delta W = effective_B() @ A."""
        B = self.B * self.scale
        return B * self.gain if self.gain is not None else B

    def lowrank(self) -> LowRank:
        """The branch's update as float factors: a snapshot, not a view of the parameters (``A.float()`` of a
        float32 A would be the parameter itself, and the optimizer would change it later)."""
        return LowRank(self.effective_B().detach().float(), self.A.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x) @ self.A.t()
        if self.gain is not None:
            h = h * self.gain
        return (h @ self.B.t()) * self.scale


class LoRASite(nn.Module):
    """One adapted linear map with its branches; ``merge`` folds branches into the base weight slice.

    ``combine`` (None by default) replaces the plain sum of the branches' outputs in ``forward``: a function
    ``combine(site, x)`` that computes the same sum another way, for a method whose many live branches would
    otherwise cost one pair of matmuls each (SD-LoRA folds its frozen pairs into one). A module-level function,
    so copies and pickles of the model keep it; whatever it caches stays out of the state dict.

    ``fold_weight`` (None by default) lets a method add part of a site's update into the base weight for one
    call instead: ``fold_weight(site, x)`` returns None (use ``forward``) or ``(delta_W, rest)``, with
    ``delta_W`` (d_out x d_in, may carry gradients) added to the site's rows of the base weight for this call,
    and ``rest`` (the output of the branches not in ``delta_W``, or None) added to the output. One dense matmul
    per token then serves any number of branches; :class:`AdaptedLinear` computes those rows on their own, so
    the weight gradient it costs covers the site's rows only.
    """

    combine: Callable[[LoRASite, torch.Tensor], torch.Tensor] | None = None
    fold_weight: Callable[[LoRASite, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None] | None] | None = None

    def __init__(self, name: str, d_in: int, d_out: int, owner: AdaptedLinear, rows: slice) -> None:
        super().__init__()
        self.name, self.d_in, self.d_out, self.rows = name, d_in, d_out, rows
        self.branches = nn.ModuleList()
        object.__setattr__(self, "_owner", owner)  # not a submodule: avoids a cycle in the module tree

    @property
    def owner(self) -> AdaptedLinear:
        """The wrapped linear map this site is a row range of (the q, k and v sites of a block share one)."""
        return self._owner

    @property
    def base_weight(self) -> nn.Parameter:
        """The whole frozen pre-trained weight parameter the site's rows live in (the fused qkv for q/k/v)."""
        return self._owner.base.weight

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight of this site (a view into the fused weight for q/k/v)."""
        return self.base_weight[self.rows]

    def add_branch(self, rank: int, **kwargs: Any) -> LoRABranch:
        w = self.base_weight
        branch = LoRABranch(self.d_in, self.d_out, rank, **kwargs).to(device=w.device)
        self.branches.append(branch)
        return branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.combine is not None:
            return self.combine(self, x)
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return out

    def update(self) -> LowRank | None:
        """The sum of all live branches as one factored update."""
        return LowRank.sum(b.lowrank() for b in self.branches)

    @torch.no_grad()
    def merge(self, indices: Iterable[int] | None = None) -> None:
        """Add the chosen branches (default: all) into the base weight and remove them."""
        chosen = set(range(len(self.branches)) if indices is None else indices)
        w = self.base_weight
        for i in sorted(chosen):
            b = self.branches[i]
            w[self.rows] += (b.effective_B().float() @ b.A.float()).to(w.dtype)
        self.branches = nn.ModuleList(b for i, b in enumerate(self.branches) if i not in chosen)


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus sites over row ranges of its output."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.sites = nn.ModuleDict()

    def add_site(self, key: str, name: str, rows: slice) -> LoRASite:
        if key not in self.sites:
            d_out = len(range(*rows.indices(self.base.out_features)))
            self.sites[key] = LoRASite(name, self.base.in_features, d_out, self, rows)
        return self.sites[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        live = [s for s in self.sites.values() if len(s.branches)]
        folds = {}
        for s in live:
            if s.fold_weight is not None:
                fold = s.fold_weight(s, x)
                if fold is not None:
                    folds[s.name] = fold
        if folds:
            return self._forward_folded(x, live, folds)
        y = self.base(x)
        if not live:
            return y
        if len(live) == 1 and live[0].d_out == self.base.out_features:
            return y + live[0](x)
        parts, cursor = [], 0
        for site in sorted(live, key=lambda s: s.rows.start or 0):
            start, stop = site.rows.start or 0, site.rows.stop
            if start > cursor:
                parts.append(y[..., cursor:start])
            parts.append(y[..., start:stop] + site(x))
            cursor = stop
        if cursor < y.shape[-1]:
            parts.append(y[..., cursor:])
        return torch.cat(parts, -1)

    def _forward_folded(self, x: torch.Tensor, live: list[LoRASite],
                        folds: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """The output row range by row range: a site with a fold as ``x (W0 + delta_W)^T + rest``, another site as
        ``x W0^T + site(x)``, rows without a site as ``x W0^T`` (one matmul per range, so a weight gradient
        covers the folded rows only)."""
        W, bias = self.base.weight, self.base.bias

        def linear(start: int, stop: int, delta: torch.Tensor | None = None) -> torch.Tensor:
            w = W[start:stop] if delta is None else W[start:stop] + delta.to(W.dtype)
            return nn.functional.linear(x, w, None if bias is None else bias[start:stop])

        parts, cursor = [], 0
        for site in sorted(live, key=lambda s: s.rows.start or 0):
            start, stop = site.rows.start or 0, site.rows.stop
            if start > cursor:
                parts.append(linear(cursor, start))
            if site.name in folds:
                delta, rest = folds[site.name]
                out = linear(start, stop, delta)
                parts.append(out if rest is None else out + rest)
            else:
                parts.append(linear(start, stop) + site(x))
            cursor = stop
        if cursor < W.shape[0]:
            parts.append(linear(cursor, W.shape[0]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def _adapted(parent: nn.Module, attr: str) -> AdaptedLinear:
    layer = getattr(parent, attr)
    if isinstance(layer, AdaptedLinear):
        return layer
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{attr} is {type(layer).__name__}, not nn.Linear")
    wrapped = AdaptedLinear(layer)
    setattr(parent, attr, wrapped)
    return wrapped


def inject(backbone: nn.Module, targets: Iterable[str], blocks: Iterable[int] | None = None) -> dict[str, LoRASite]:
    """Wrap the target linear maps of every (chosen) transformer block of a timm ViT; return the sites.

    ``targets`` names: ``q``, ``k``, ``v`` (slices of the fused qkv), ``qkv`` (the whole fused map), ``proj``,
    ``fc1``, ``fc2``. The base weights are frozen. Calling it again returns the existing sites. A language
    backbone (``clbench.model.lm.TextBackbone``: it has ``attention_linears``) takes ``q``, ``k``, ``v``, ``o``,
    its attention projections, one site per projection and attention (T5's decoder blocks: two).
    """
    targets = list(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {list(TARGETS)}")
    chosen = set(range(len(backbone.blocks))) if blocks is None else set(blocks)
    sites: dict[str, LoRASite] = {}
    if hasattr(backbone, "attention_linears"):  # a language backbone (clbench.model.lm.TextBackbone) names its maps
        for i in range(len(backbone.blocks)):
            if i not in chosen:
                continue
            for t in targets:
                for name, parent, attr in backbone.attention_linears(i, t):
                    lin = _adapted(parent, attr)
                    sites[name] = lin.add_site(t, name, slice(0, lin.base.out_features))
        for p in backbone.parameters():
            p.requires_grad_(False)
        return sites
    if "o" in targets:
        raise ValueError("LoRA target 'o' is a language backbone's attention output; a ViT's is 'proj'")
    for i, block in enumerate(backbone.blocks):
        if i not in chosen:
            continue
        for t in targets:
            if t in ATTN_SLICES or t == "qkv":
                lin = _adapted(block.attn, "qkv")
                d = lin.base.out_features // 3
                rows = slice(0, 3 * d) if t == "qkv" else slice(ATTN_SLICES.index(t) * d, (ATTN_SLICES.index(t) + 1) * d)
                name = f"blocks.{i}.attn.{t}"
            elif t == "proj":
                lin, rows, name = _adapted(block.attn, "proj"), slice(0, None), f"blocks.{i}.attn.proj"
            else:
                lin, rows, name = _adapted(block.mlp, t), slice(0, None), f"blocks.{i}.mlp.{t}"
            if rows.stop is None:
                rows = slice(0, lin.base.out_features)
            sites[name] = lin.add_site(t, name, rows)
    for p in backbone.parameters():
        p.requires_grad_(False)
    return sites


def find_sites(module: nn.Module) -> dict[str, LoRASite]:
    """All sites inside ``module``, by name."""
    return {m.name: m for m in module.modules() if isinstance(m, LoRASite)}


def merge_all(module: nn.Module) -> None:
    for site in find_sites(module).values():
        site.merge()


# ----------------------------------------------------------------------------------------------------
# Shared params and the default task update
# ----------------------------------------------------------------------------------------------------

def _block_list(blocks: list[int]) -> list[int]:
    """A list of adapted blocks names each block once, from 0 up; whether the backbone has it is checked once
    the backbone's depth is known (``check_against``, asked by ``clbench.run.preflight.method_problems`` before any run exists)."""
    if not blocks:
        raise ValueError("[] adapts no block, so only the heads would train; list block indices (0 is the first) "
                         "or leave blocks unset to adapt every block")
    negative = [b for b in blocks if b < 0]
    if negative:
        raise ValueError(f"block {negative[0]} does not exist; blocks count from 0 (the first block) up")
    twice = sorted({b for b in blocks if blocks.count(b) > 1})
    if twice:
        raise ValueError(f"block(s) {twice} listed twice; list each block once")
    return blocks


# The ``blocks`` param of every adapter method (AdapterParams, SD-LoRA): null = all blocks.
BlockList = Annotated[list[int], AfterValidator(_block_list)]


class AdapterParams(BaseModel):
    """Params of every method that adapts ``clbench.model.lora`` sites; subclasses redeclare a field only to change
    its default or description (docs/METHODS.md gives each method's defaults and where they come from)."""

    model_config = ConfigDict(extra="forbid")  # a typo in a suite's params must fail, not be ignored
    rank: int = Field(10, ge=1, description="LoRA rank r")
    targets: list[Target] = Field(["q", "v"], min_length=1, description="adapted maps: " + ", ".join(TARGETS))
    blocks: BlockList | None = Field(None, description="adapted transformer blocks, counted from 0 (default: all)")

    def check_against(self, backbone: Any) -> list[str]:
        """``blocks`` names blocks the backbone has, and ``rank`` fits the narrowest map ``targets`` x ``blocks``
        adapts; ``backbone`` is a ``clbench.BackboneFacts`` (``clbench.model.fit``, which builds on this module's
        sites; the preflight calls this before any run exists). A subclass with more
        block lists or ranks extends it."""
        problems = (backbone.targets_problem(list(self.targets), self.blocks),
                    backbone.blocks_problem("blocks", self.blocks),
                    backbone.rank_problem(self.rank, list(self.targets), self.blocks))
        return [p for p in problems if p]


class LoRAParams(AdapterParams):
    """:class:`AdapterParams` plus LoRA's scaling and dropout: ``delta W = (alpha / r) B A``."""

    alpha: float | None = Field(None, gt=0, description="scaling alpha (delta W = alpha/r B A); default alpha = r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")

    @property
    def scale(self) -> float:
        """``alpha / r`` (1 when alpha is not set)."""
        return (self.alpha or self.rank) / self.rank
