"""``loss_terms`` in both forms: ``loss_terms(model, ctx, step)`` with a ``clbench.StepBatch``, and contract 3's form
that names the step's parts as arguments (``batch``, ``logits``, ``replayed``, ``aux``, ``rows``). A method written
either way sees the same step and trains to the same numbers; an unknown argument name is still refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clbench_plugins.lora import NaiveLoRA

from clbench import ClbenchError, StepBatch, hookimpl
from clbench.methods.registry import run_manager, validate_hooks
from clbench.testing import run_method, tiny_stream


class Bundled(NaiveLoRA):
    name = "bundled"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple] = []

    @hookimpl
    def loss_terms(self, model, ctx, step: StepBatch):
        self.seen.append((ctx.task, step.batch[1].tolist(), step.rows.tolist(), step.replayed, dict(step.aux)))
        return {"l2": 1e-3 * step.logits.pow(2).mean()}


class ByPart(NaiveLoRA):
    name = "bypart"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple] = []

    @hookimpl
    def loss_terms(self, batch, logits, ctx, replayed, aux, rows):
        self.seen.append((ctx.task, batch[1].tolist(), rows.tolist(), replayed, dict(aux)))
        return {"l2": 1e-3 * logits.pow(2).mean()}


def test_both_forms_see_the_same_step_and_train_to_the_same_numbers():
    stream = tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8)
    runs = {}
    for cls in (Bundled, ByPart):
        method = cls(cls.Params(rank=2))
        runs[cls.name] = (method, run_method(method, stream=stream, max_steps_per_epoch=2))
    (a, ra), (b, rb) = runs["bundled"], runs["bypart"]
    assert a.seen and a.seen == b.seen  # same tasks, labels, rows, no replay, empty aux
    assert [r.loss_terms for r in ra.results] == [r.loss_terms for r in rb.results]
    assert np.array_equal(ra.R, rb.R, equal_nan=True)
    sa, sb = ra.model.state_dict(), rb.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_by_part_form_goes_through_one_adapter_and_a_wrong_name_is_refused():
    pm = run_manager(ByPart(ByPart.Params(rank=2)))
    [impl] = pm.hook.loss_terms.get_hookimpls()
    assert impl.argnames == ("model", "ctx", "step")  # the adapter, registered under the method's name
    assert impl.plugin_name == "method:bypart:loss_terms"
    validate_hooks(ByPart, "bypart")
    validate_hooks(Bundled, "bundled")

    class Typo(NaiveLoRA):
        name = "typo"

        @hookimpl
        def loss_terms(self, batch, logitz):
            return None

    with pytest.raises(ClbenchError, match="logitz"):
        validate_hooks(Typo, "typo")
