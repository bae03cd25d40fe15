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
    "CONTRACT_VERSION": "clbench.method",
    "ClbenchError": "clbench.errors",
    "hookimpl": "clbench.hookspecs",
    "Method": "clbench.method",
    "NoParams": "clbench.method",
    "TaskContext": "clbench.context",
    "CLModel": "clbench.backbones",
    "Replayed": "clbench.rehearsal",
    "Samples": "clbench.rehearsal",
    "SCOPES": "clbench.rehearsal",
    "SCOPE_NONE": "clbench.rehearsal",
    "SCOPE_SEEN": "clbench.rehearsal",
    "SCOPE_TASK": "clbench.rehearsal",
    "Scope": "clbench.rehearsal",
    "ATTN_SLICES": "clbench.lora",
    "TARGETS": "clbench.lora",
    "AdaptedLinear": "clbench.lora",
    "AdapterParams": "clbench.lora",
    "BlockList": "clbench.lora",
    "LoRABranch": "clbench.lora",
    "LoRAParams": "clbench.lora",
    "LoRASite": "clbench.lora",
    "LowRank": "clbench.lora",
    "Target": "clbench.lora",
    "find_sites": "clbench.lora",
    "inject": "clbench.lora",
    "backbone_maps": "clbench.dense",
    "snapshot_maps": "clbench.dense",
    "task_changes": "clbench.dense",
    "reshape_spectrum": "clbench.spectra",
    "PromptMethod": "clbench.prompts",
    "PromptModel": "clbench.prompts",
    "attach": "clbench.prompts",
    "cosine": "clbench.prompts",
    "fit_blocks": "clbench.prompts",
    "pick": "clbench.prompts",
    "split_prefix": "clbench.prompts",
    "uniform_prompt": "clbench.prompts",
}
__all__ = [
    "ATTN_SLICES", "AdaptedLinear", "AdapterParams", "BlockList", "CLModel", "CONTRACT_VERSION", "ClbenchError",
    "LoRABranch", "LoRAParams", "LoRASite", "LowRank", "Method", "NoParams", "PromptMethod", "PromptModel",
    "Replayed", "SCOPES", "SCOPE_NONE", "SCOPE_SEEN", "SCOPE_TASK", "Samples", "Scope", "TARGETS", "Target",
    "TaskContext", "attach", "backbone_maps", "cosine", "find_sites", "fit_blocks", "hookimpl", "inject", "pick",
    "reshape_spectrum", "snapshot_maps", "split_prefix", "task_changes", "uniform_prompt"
]  # == sorted(_PUBLIC)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from clbench.backbones import CLModel
    from clbench.context import TaskContext
    from clbench.dense import backbone_maps, snapshot_maps, task_changes
    from clbench.errors import ClbenchError
    from clbench.hookspecs import hookimpl
    from clbench.lora import (
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
    from clbench.method import CONTRACT_VERSION, Method, NoParams
    from clbench.prompts import (
        PromptMethod,
        PromptModel,
        attach,
        cosine,
        fit_blocks,
        pick,
        split_prefix,
        uniform_prompt,
    )
    from clbench.rehearsal import SCOPE_NONE, SCOPE_SEEN, SCOPE_TASK, SCOPES, Replayed, Samples, Scope
    from clbench.spectra import reshape_spectrum


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'clbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
