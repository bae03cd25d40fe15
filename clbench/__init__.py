"""clbench: a benchmark suite for continual low-rank adaptation of pre-trained models.

The public API of a method plugin lives here, in one place::

    from clbench import ClbenchError, LoRAParams, LowRank, Method, Samples, TaskContext, hookimpl, inject

Names are loaded on first use (PEP 562), so ``import clbench`` stays cheap: torch is imported only when a
name that needs it (``TaskContext``, ``LowRank``, ``inject``, ...) is first used, and Avalanche never.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it. A plugin (plugins/, examples/, a third party's package) imports
# only these names (`from clbench import ...`): the import contract in pyproject.toml holds it for the
# built-ins, tests/test_plugins.py for the examples. Every type a hook spec mentions is here.
_PUBLIC = {
    "CONTRACT_VERSION": "clbench.methods.method",
    "ClbenchError": "clbench.errors",
    "hookimpl": "clbench.methods.hookspecs",
    "StepBatch": "clbench.methods.hookspecs",
    "Method": "clbench.methods.method",
    "NoParams": "clbench.methods.method",
    "TaskContext": "clbench.methods.context",
    "CLModel": "clbench.model.backbones",
    "BackboneFacts": "clbench.model.fit",
    "Replayed": "clbench.methods.rehearsal",
    "Samples": "clbench.methods.rehearsal",
    "SCOPES": "clbench.methods.rehearsal",
    "SCOPE_NONE": "clbench.methods.rehearsal",
    "SCOPE_SEEN": "clbench.methods.rehearsal",
    "SCOPE_TASK": "clbench.methods.rehearsal",
    "Scope": "clbench.methods.rehearsal",
    "ATTN_SLICES": "clbench.model.lora",
    "TARGETS": "clbench.model.lora",
    "AdaptedLinear": "clbench.model.lora",
    "AdapterParams": "clbench.model.lora",
    "BlockList": "clbench.model.lora",
    "LoRABranch": "clbench.model.lora",
    "LoRAParams": "clbench.model.lora",
    "LoRASite": "clbench.model.lora",
    "LowRank": "clbench.model.lora",
    "Target": "clbench.model.lora",
    "find_sites": "clbench.model.lora",
    "inject": "clbench.model.lora",
    "backbone_maps": "clbench.model.dense",
    "snapshot_maps": "clbench.model.dense",
    "task_changes": "clbench.model.dense",
    "reshape_spectrum": "clbench.model.spectra",
    "PromptMethod": "clbench.methods.prompts",
    "PromptModel": "clbench.methods.prompts",
    "attach": "clbench.methods.prompts",
    "cosine": "clbench.methods.prompts",
    "fit_blocks": "clbench.methods.prompts",
    "pick": "clbench.methods.prompts",
    "split_prefix": "clbench.methods.prompts",
    "uniform_prompt": "clbench.methods.prompts",
}
__all__ = [
    "ATTN_SLICES", "AdaptedLinear", "AdapterParams", "BackboneFacts", "BlockList", "CLModel", "CONTRACT_VERSION",
    "ClbenchError", "LoRABranch", "LoRAParams", "LoRASite", "LowRank", "Method", "NoParams", "PromptMethod", "PromptModel",
    "Replayed", "SCOPES", "SCOPE_NONE", "SCOPE_SEEN", "SCOPE_TASK", "Samples", "Scope", "StepBatch", "TARGETS", "Target",
    "TaskContext", "attach", "backbone_maps", "cosine", "find_sites", "fit_blocks", "hookimpl", "inject", "pick",
    "reshape_spectrum", "snapshot_maps", "split_prefix", "task_changes", "uniform_prompt"
]  # == sorted(_PUBLIC)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from clbench.errors import ClbenchError
    from clbench.methods.context import TaskContext
    from clbench.methods.hookspecs import StepBatch, hookimpl
    from clbench.methods.method import CONTRACT_VERSION, Method, NoParams
    from clbench.methods.prompts import (
        PromptMethod,
        PromptModel,
        attach,
        cosine,
        fit_blocks,
        pick,
        split_prefix,
        uniform_prompt,
    )
    from clbench.methods.rehearsal import SCOPE_NONE, SCOPE_SEEN, SCOPE_TASK, SCOPES, Replayed, Samples, Scope
    from clbench.model.backbones import CLModel
    from clbench.model.dense import backbone_maps, snapshot_maps, task_changes
    from clbench.model.fit import BackboneFacts
    from clbench.model.lora import (
        ATTN_SLICES,
        TARGETS,
        AdaptedLinear,
        AdapterParams,
        BlockList,
        LoRABranch,
        LoRAParams,
        LoRASite,
        LowRank,
        Target,
        find_sites,
        inject,
    )
    from clbench.model.spectra import reshape_spectrum


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'clbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
