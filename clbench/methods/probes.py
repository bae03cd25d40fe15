"""The harness's own hook implementations, registered beside a run's method by ``clbench.methods.registry.run_manager``.

:class:`TaskUpdateProbe` reports a task's low-rank update from the ``clbench.model.lora`` sites for methods that do not
implement ``task_updates`` themselves, so the simplest spectra-reporting method needs two hooks.
"""

from __future__ import annotations

import torch
from torch import nn

from clbench.methods.hookspecs import hookimpl
from clbench.model.lora import LoRABranch, LowRank, find_sites


class TaskUpdateProbe:
    """The harness's ``task_updates`` for methods that do not implement it (registered by
    ``clbench.methods.registry.run_manager``, last in line, so a method's own non-None result wins).

    At ``before_task`` (before the method's own, which may add branches) it records every site's branches and
    their factors; at ``after_task`` (after the method's own, before ``merge_task``) a site's update is the sum
    over its live branches of ``now - before`` for a branch that existed and changed, and ``now`` for a branch
    added during the task; unchanged branches contribute nothing and sites without change are left out. For
    one trained branch this is ``[B_t, -B_(t-1)] [A_t; A_(t-1)]``, the change of B A across the task. A
    method that merges or replaces branches before ``merge_task`` must report its own update.
    """

    def __init__(self) -> None:
        self._before: dict[str, list[tuple[LoRABranch, LowRank]]] = {}
        self._updates: dict[str, LowRank] = {}

    @hookimpl(tryfirst=True)
    def before_task(self, model: nn.Module) -> None:
        self._before = {n: [(b, b.lowrank()) for b in s.branches] for n, s in find_sites(model).items()}
        self._updates = {}

    @hookimpl(trylast=True)
    def after_task(self, model: nn.Module) -> None:
        self._updates = {}
        for name, site in find_sites(model).items():
            before = {id(b): low for b, low in self._before.get(name, [])}
            parts = []
            for branch in site.branches:
                now, old = branch.lowrank(), before.get(id(branch))
                if old is None:
                    parts.append(now)
                elif not (torch.equal(now.B, old.B) and torch.equal(now.A, old.A)):
                    parts.append(now - old)
            if parts:
                self._updates[name] = LowRank.sum(parts)

    @hookimpl(trylast=True)
    def task_updates(self) -> dict[str, LowRank] | None:
        return self._updates or None

