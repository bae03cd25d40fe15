"""clbench: a benchmark suite for continual low-rank adaptation of pre-trained models.

The public API of a method plugin lives here, in one place::

    from clbench import ClbenchError, LoRAParams, LowRank, Method, TaskContext, hookimpl, inject

Names are loaded on first use (PEP 562), so ``import clbench`` stays cheap: torch is imported only when a
name that needs it (``TaskContext``, ``LowRank``, ``inject``, ...) is first used, and Avalanche never.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "CONTRACT_VERSION": "clbench.method",
    "ClbenchError": "clbench.errors",
    "hookimpl": "clbench.hookspecs",
    "Method": "clbench.method",
    "TaskContext": "clbench.context",
    "AdapterParams": "clbench.lora",
    "LoRAParams": "clbench.lora",
    "LoRASite": "clbench.lora",
    "LowRank": "clbench.lora",
    "find_sites": "clbench.lora",
    "inject": "clbench.lora",
}
__all__ = ["AdapterParams", "CONTRACT_VERSION", "ClbenchError", "LoRAParams", "LoRASite", "LowRank", "Method", "TaskContext",
           "find_sites", "hookimpl", "inject"]  # == sorted(_PUBLIC); tests/test_plugins.py checks it

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from clbench.context import TaskContext
    from clbench.errors import ClbenchError
    from clbench.hookspecs import hookimpl
    from clbench.lora import AdapterParams, LoRAParams, LoRASite, LowRank, find_sites, inject
    from clbench.method import CONTRACT_VERSION, Method


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'clbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
