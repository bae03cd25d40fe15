"""Prompting a frozen timm ViT: the shared machinery of the prompt methods (L2P, DualPrompt, CODA-Prompt).

Beside ``clbench.model.lora`` (which changes weights), this module changes the *inputs* of attention:

* **prompt tokens** (prompt-tuning, original L2P): learned tokens inserted right after the prefix tokens
  ([CLS] and any register tokens), before the first block, so every block attends to them;
* **prefix keys and values** (prefix-tuning, DualPrompt / CODA-Prompt / the L2P++ of the CODA-Prompt code):
  per block, learned key and value rows concatenated in front of the attention's own keys and values, so the
  sequence length (and so the output) does not grow;
* a **query pass**: the same backbone with every prompt switched off, whose pooled [CLS] feature selects or
  weights the prompts.

Where timm offers a public API, this module uses it: ``forward_features`` / ``forward_head(pre_logits=True)``
for the passes, a forward hook on ``norm_pre`` (the module timm applies right after the position embedding) for
the tokens, so the private ``_pos_embed`` is never called. timm has **no** public API to extend the keys and
values of its ``Attention``; :class:`PrefixAttention` therefore replaces ``blocks[i].attn`` with a module that
holds the *same* submodules under the *same* names (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj``, ...;
parameter names and objects unchanged, so LoRA sites and the contract's frozen-weight check still see them) and
re-implements timm's attention forward, with the prefixes concatenated after the key normalisation (as the
CODA-Prompt code does).

Prompts are passed per forward through :meth:`PromptSlots.active`, a context manager that switches them on and
always off again, so a query pass can never see the prompts of another pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from clbench.errors import ClbenchError
from clbench.methods.hookspecs import StepBatch, hookimpl
from clbench.model.backbones import CLModel

Prefix = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (B, L, dim) in the attention's q/k/v space


class PrefixAttention(nn.Module):
    """timm's ``Attention`` with optional prefix keys and values (prefix-tuning).

    Holds the wrapped attention's submodules under their own names, so ``blocks.i.attn.qkv.weight`` stays the
    same parameter object with the same state-dict key. With no prefix set, the output equals timm's.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        for name in ("qkv", "q_norm", "k_norm", "norm", "proj", "attn_drop", "proj_drop"):
            if not hasattr(attn, name):
                raise ClbenchError(f"prompts: the backbone's attention ({type(attn).__name__}) has no '{name}'; "
                                   "prefix-tuning needs a timm VisionTransformer attention")
            setattr(self, name, getattr(attn, name))
        self.gate = getattr(attn, "gate", None)
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", self.num_heads * self.head_dim)
        self.prefix: Prefix | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        B, N, _ = x.shape
        H, hd = self.num_heads, self.head_dim
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.prefix is not None:
            if attn_mask is not None or is_causal:
                raise ClbenchError("prompts: prefix-tuning with an attention mask is not supported")
            pk, pv = self.prefix
            k = torch.cat([pk.to(k.dtype).reshape(B, -1, H, hd).transpose(1, 2), k], 2)
            v = torch.cat([pv.to(v.dtype).reshape(B, -1, H, hd).transpose(1, 2), v], 2)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class PromptSlots:
    """The places of one backbone where prompts can go: prefix slots in chosen blocks, tokens after [CLS].

    Create once per backbone (:func:`attach`); pass prompts per forward with :meth:`active`.
    """

    def __init__(self, backbone: nn.Module, prefix_blocks: list[int], tokens: bool) -> None:
        blocks = getattr(backbone, "blocks", None)
        if blocks is None or not hasattr(backbone, "norm_pre"):
            raise ClbenchError("prompts: the backbone is not a timm VisionTransformer (no blocks / norm_pre)")
        bad = [i for i in prefix_blocks if not 0 <= i < len(blocks)]
        if bad:
            raise ClbenchError(f"prompts: blocks {bad} out of range; the backbone has {len(blocks)} blocks")
        self.backbone = backbone
        self.attn: dict[int, PrefixAttention] = {}
        for i in prefix_blocks:
            if not isinstance(blocks[i].attn, PrefixAttention):
                blocks[i].attn = PrefixAttention(blocks[i].attn)
            self.attn[i] = blocks[i].attn
        self.tokens: torch.Tensor | None = None
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 1))
        if tokens:
            backbone.norm_pre.register_forward_hook(self._insert_tokens)

    def _insert_tokens(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:
            return output
        n = self.num_prefix_tokens
        return torch.cat([output[:, :n], self.tokens.to(output.dtype), output[:, n:]], 1)

    @contextlib.contextmanager
    def active(self, prefixes: dict[int, Prefix] | None = None, tokens: torch.Tensor | None = None
               ) -> Iterator[None]:
        """Switch prompts on for the forward passes inside the block; always switched off on exit."""
        unknown = set(prefixes or {}) - set(self.attn)
        if unknown:
            raise ClbenchError(f"prompts: no prefix slot in blocks {sorted(unknown)}")
        try:
            for i, p in (prefixes or {}).items():
                self.attn[i].prefix = p
            self.tokens = tokens
            yield
        finally:
            for a in self.attn.values():
                a.prefix = None
            self.tokens = None


def fit_blocks(wanted: list[int] | None, official: list[int], depth: int, what: str) -> list[int]:
    """The blocks to prompt: ``wanted`` if given (each must exist), else the official blocks that the backbone
    has (a shallower backbone than ViT-B keeps the official blocks below its depth, at least its last block)."""
    if wanted is not None:
        bad = [b for b in wanted if not 0 <= b < depth]
        if bad:
            raise ClbenchError(f"{what}: blocks {bad} out of range; the backbone has {depth} blocks")
        return list(wanted)
    return [b for b in official if b < depth] or [depth - 1]


def attach(backbone: nn.Module, prefix_blocks: list[int] = (), tokens: bool = False) -> PromptSlots:
    """Install prefix slots in ``prefix_blocks`` and (with ``tokens``) the token insertion after [CLS]."""
    return PromptSlots(backbone, list(prefix_blocks), tokens)


@torch.no_grad()
def query(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The query of the prompt methods: the pooled pre-logit feature ([CLS] after the final norm) of the
    backbone with prompts off. Call it outside :meth:`PromptSlots.active`."""
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)


class PromptModel(CLModel):
    """A :class:`CLModel` around the *same* backbone and heads whose ``features`` runs a query pass, lets the
    method turn the query into prompts (:meth:`select`), then runs the prompted pass.

    Subclasses hold the method's prompt parameters and implement :meth:`select`. ``task`` is the training task
    (set by the method in ``before_task``): methods that pick prompts by task identity in training (DualPrompt)
    use it only while ``self.training``; at evaluation the choice depends on each image's own query only.
    """

    def __init__(self, base: CLModel, slots: PromptSlots, pool: str = "head") -> None:
        nn.Module.__init__(self)
        self.backbone, self.heads = base.backbone, base.heads
        self.image_size, self.in_chans = base.image_size, base.in_chans
        self.register_buffer("mean", base.mean, persistent=False)
        self.register_buffer("std", base.std, persistent=False)
        self.slots, self.pool = slots, pool
        self.task = 0

    def select(self, q: torch.Tensor) -> tuple[dict[int, Prefix], torch.Tensor | None, dict[str, torch.Tensor]]:
        """(prefixes per block, tokens or None, aux values for ``loss_terms``) for queries ``q`` (B x D)."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q = query(self.backbone, x)
        prefixes, tokens, aux = self.select(q)
        with self.slots.active(prefixes, tokens):
            h = self.backbone.forward_features(x)
        if self.pool == "prompts":  # original L2P: the mean of the prompt tokens' outputs
            n = self.slots.num_prefix_tokens
            return h[:, n:n + tokens.shape[1]].mean(1), aux
        return self.backbone.forward_head(h, pre_logits=True), aux


def uniform_prompt(*shape: int) -> nn.Parameter:
    """A prompt or key tensor initialised uniform in [0, 1), as ``tensor_prompt`` of the CODA-Prompt code."""
    return nn.Parameter(torch.rand(*shape))


def cosine(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query (B x D) with every key (K x D): B x K."""
    return F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).T


def pick(pool: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``pool[idx]``: the prompts (rows of ``pool``) at the long tensor ``idx`` (any shape), with a gradient that is
    the same bits at every thread count.

    Plain indexing ``pool[idx]`` differentiates through ``index_put_(accumulate=True)``, which on the CPU, with more
    than one thread and at least 32,768 gradient elements (L2P++: batch 64 x top-5 x length 20 x width 64), adds the
    rows with parallel atomic float additions: the order of the additions, hence the low bits of the prompts'
    gradient, change from run to run (an uninterrupted and a resumed run drift apart at two threads, while one
    thread takes a serial path). ``index_select`` differentiates through ``index_add_``, which adds the selected rows
    in index order whatever the thread count; the forward is the same copy."""
    return pool.index_select(0, idx.reshape(-1)).reshape(*idx.shape, *pool.shape[1:])


def split_prefix(p: torch.Tensor) -> Prefix:
    """A prompt of length L (B x ... x L x D) as prefix keys (first L/2 rows) and values (last L/2), each
    flattened to B x n x D, as the CODA-Prompt code splits ``Ek = P[..., :L/2, :]``, ``Ev = P[..., L/2:, :]``."""
    half = p.shape[-2] // 2
    B, D = p.shape[0], p.shape[-1]
    return p[..., :half, :].reshape(B, -1, D), p[..., half:, :].reshape(B, -1, D)


class PromptMethod:
    """Hooks shared by the prompt methods (mixed in before ``clbench.methods.method.Method``).

    The backbone is frozen, the method's :class:`PromptModel` (from :meth:`build`) replaces the model, its
    ``task`` follows the training task, the ``aux`` value ``key_match`` (if any) is the key-query matching
    loss times ``params.key_weight``, and there is no low-rank weight update (``task_updates`` returns None).
    Every prompt tensor exists from ``configure_model`` on, so a checkpoint loads without rebuilding."""

    low_rank_updates = False
    backbones = ("image",)
    backbones_note = ("its prompts are prefixed into a timm ViT's attention and chosen by the ViT's class token "
                      "(clbench.methods.prompts); the prompt methods have no language form")
    model: PromptModel | None = None

    def build(self, model: CLModel, ctx) -> PromptModel:
        raise NotImplementedError

    @hookimpl
    def configure_model(self, model: CLModel, ctx) -> PromptModel:
        model.backbone.requires_grad_(False)
        self.model = self.build(model, ctx)
        return self.model

    @hookimpl
    def before_task(self, model: PromptModel, ctx) -> None:
        model.task = ctx.task

    @hookimpl
    def loss_terms(self, step: StepBatch) -> dict[str, torch.Tensor] | None:
        weight = getattr(self.params, "key_weight", 0.0)
        if "key_match" not in step.aux or weight == 0:
            return None
        return {"key_match": weight * step.aux["key_match"]}

    @hookimpl
    def task_updates(self, model, ctx) -> None:
        return None

    @hookimpl
    def load_method_state(self, model: PromptModel, state, ctx) -> None:
        model.task = ctx.task
