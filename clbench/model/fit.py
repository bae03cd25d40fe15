"""Whether a method's params fit the backbone, asked of the params themselves before any run exists.

:class:`BackboneFacts` is what a params model may check itself against: the backbone's depth and the width of
every map an adapter could sit on, read from a weightless copy on the meta device (:func:`backbone_facts`:
milliseconds, no download). A params model declares its checks by defining ``check_against(backbone) ->
list[str]`` (one ``"<field>: <what is wrong and how to fix it>"`` line per problem): ``clbench.AdapterParams``
checks ``blocks`` and ``rank`` against the maps ``targets`` x ``blocks`` adapts, ``clbench.NoParams`` every field
named ``blocks`` or ``*_blocks`` and a field named ``rank`` (:func:`checks_by_field_name`), which is also what a
params model that declares nothing gets (a third party's plain pydantic model). The preflight
(``clbench.run.preflight.method_problems``) asks every method entry and names the first problem's key path.

A rank above ``min(d_in, d_out)`` of an adapted map cannot raise the update's rank (beyond it InfLoRA's and
CL-LoRA's down-projections do not fit: a shape error after the run started); a block index the backbone lacks is
a KeyError in the middle of ``configure_model``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BackboneFacts:
    """The shape of the suite's backbone as params check themselves against it (``check_against``)."""

    name: str  # backbone.name of the suite
    depth: int  # transformer blocks, numbered 0..depth-1
    skeleton: Any = field(repr=False)  # the backbone's modules on the meta device (no weights)
    _narrow: dict = field(default_factory=dict, repr=False)
    _targets: dict = field(default_factory=dict, repr=False)

    def narrowest_map(self, targets: list[str] | None = None,
                      blocks: list[int] | None = None) -> tuple[str, int, int] | None:
        """(name, d_out, d_in) of the narrowest map that ``targets`` (default q, v) x ``blocks`` (default all)
        adapt; None when they adapt nothing. Computed once per distinct pair (a 10,000-entry suite repeats a
        handful)."""
        from clbench.model.lora import TARGETS, inject

        targets = [t for t in (targets or ["q", "v"]) if t in TARGETS] or ["q", "v"]
        key = (tuple(targets), tuple(blocks) if isinstance(blocks, list) else None)
        if key not in self._narrow:
            try:
                sites = inject(copy.deepcopy(self.skeleton), list(key[0]),
                               list(key[1]) if key[1] is not None else None)
            except ValueError as exc:  # a target this backbone lacks: targets_problem says so
                sites, self._targets[key] = {}, str(exc)
            narrow = min(sites.items(), key=lambda kv: min(kv[1].d_in, kv[1].d_out)) if sites else None
            self._narrow[key] = (narrow[0], narrow[1].d_out, narrow[1].d_in) if narrow else None
        return self._narrow[key]

    def targets_problem(self, targets: list[str], blocks: Any = None, name: str = "targets") -> str | None:
        """Every target names a map of this backbone (a ViT's ``proj``, ``fc1``, ``fc2`` and fused ``qkv``; a
        language backbone's ``o``; both have ``q``, ``k``, ``v``); found by the same injection as the rank check."""
        self.narrowest_map(targets, blocks if isinstance(blocks, list) else None)
        key = (tuple(targets), tuple(blocks) if isinstance(blocks, list) else None)
        return f"{name}: {self._targets[key]}" if self._targets.get(key) else None

    def blocks_problem(self, name: str, blocks: Any) -> str | None:
        """``blocks`` (the value of field ``name``; None = the default) names blocks the backbone has, each once."""
        if not isinstance(blocks, list) or not all(isinstance(b, int) for b in blocks):
            return None
        bad = [b for b in blocks if not 0 <= b < self.depth]
        if bad:
            return (f"{name}: block {bad[0]} does not exist; the backbone has {self.depth} blocks, numbered "
                    f"0..{self.depth - 1}")
        twice = sorted({b for b in blocks if blocks.count(b) > 1})
        if twice:
            return f"{name}: block(s) {twice} listed twice; list each block once"
        return None

    def rank_problem(self, rank: Any, targets: list[str] | None = None, blocks: Any = None,
                     name: str = "rank") -> str | None:
        """``rank`` (field ``name``) is at most the smallest ``min(d_in, d_out)`` of the maps ``targets`` x
        ``blocks`` adapt, the largest rank a low-rank update of them can have."""
        if not isinstance(rank, int):
            return None
        narrow = self.narrowest_map(targets, blocks if isinstance(blocks, list) else None)
        if narrow is None:
            return None
        site, d_out, d_in = narrow
        limit = min(d_in, d_out)
        if rank <= limit:
            return None
        return (f"{name}: {rank} exceeds what the adapted maps can hold: {site} is {d_out} x {d_in}, so a "
                f"low-rank update of it has rank at most {limit}; choose {name} <= {limit}")


def checks_by_field_name(params: Any, backbone: BackboneFacts) -> list[str]:
    """The checks of a params model that declares none: every field named ``blocks`` or ``*_blocks`` (a list of
    block indices), then a field named ``rank`` against the maps ``targets`` x ``blocks`` adapt (unless a field
    ``trainable`` says the backbone itself trains)."""
    fields = list(type(params).model_fields)
    problems = [backbone.blocks_problem(f, getattr(params, f, None)) for f in fields
                if f == "blocks" or f.endswith("_blocks")]
    if "rank" in fields and getattr(params, "trainable", "lora") == "lora":  # trainable: full has no rank to fit
        problems.append(backbone.rank_problem(params.rank, getattr(params, "targets", None),
                                              getattr(params, "blocks", None)))
    return [p for p in problems if p]


def check_params(params: Any, backbone: BackboneFacts) -> list[str]:
    """What ``params`` says is wrong with it on ``backbone``: its own ``check_against``, or the checks by field
    name when it declares none."""
    check = getattr(params, "check_against", None)
    return list(check(backbone)) if callable(check) else checks_by_field_name(params, backbone)


def backbone_facts(cfg: Any) -> BackboneFacts | None:
    """The facts of the backbone ``cfg`` (a ``clbench.suite.BackboneConfig``) names, from its modules without
    weights (meta device): no download, no memory. None when clbench cannot build it here (an unknown name: the
    backbone checks report that) or it has no ``blocks``."""
    import torch

    try:
        with torch.device("meta"):
            from clbench.model.backbones import TINY
            from clbench.model.lm import is_language_backbone, language_skeleton

            if is_language_backbone(cfg.name):
                skeleton = language_skeleton(cfg.name)
            elif cfg.name in TINY:
                from timm.models.vision_transformer import VisionTransformer

                skeleton = VisionTransformer(img_size=cfg.image_size, in_chans=cfg.in_chans or 1, num_classes=0,
                                             **TINY[cfg.name])
            else:
                import timm

                kwargs = {"in_chans": cfg.in_chans} if cfg.in_chans else {}
                skeleton = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    except Exception:  # noqa: BLE001 - not a ViT clbench can shape-check; the run reports its own errors
        return None
    blocks = getattr(skeleton, "blocks", None)
    return None if blocks is None else BackboneFacts(cfg.name, len(blocks), skeleton)
