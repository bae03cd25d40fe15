"""Tests of the lora_l2 plugin: the clbench contract, then the properties that make it lora_l2.

Run after ``pip install -e .`` (or with this folder on PYTHONPATH): ``pytest tests``.
"""

from __future__ import annotations

import numpy as np
import torch
from clbench_lora_l2 import LoRAL2

from clbench import contract
from clbench.testing import builtin_method, run_method, tiny_stream


def test_contract():
    contract.check_method(LoRAL2)


def test_penalty_is_strength_times_squared_distance():
    stream = tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8)
    run = run_method(LoRAL2({"rank": 2, "strength": 0.5}), stream, max_steps_per_epoch=1)
    method = run.method
    ctx = type("Ctx", (), {"task": 1})()
    method.before_task(run.model, ctx)  # anchor = the current factors
    assert method.loss_terms(run.model, ctx, None)["l2"].item() == 0.0
    q, _ = method._anchor[0]
    with torch.no_grad():
        q.add_(0.1)  # move one factor by 0.1 in every entry
    got = method.loss_terms(run.model, ctx, None)["l2"].item()
    assert np.isclose(got, 0.5 * q.numel() * 0.1**2, rtol=1e-4)


def test_no_pull_on_the_first_task_and_a_positive_pull_after():
    run = run_method(
        LoRAL2({"rank": 2}), tiny_stream(samples_per_class=8), batch_size=8, max_steps_per_epoch=2
    )  # two steps: the second one has moved off the anchor
    assert "l2" not in run.results[0].loss_terms
    assert run.results[1].loss_terms["l2"] > 0


def _drift(strength: float) -> float:
    """Frobenius norm of the task-1 update after several plain SGD steps."""
    run = run_method(
        LoRAL2({"rank": 4, "strength": strength}),
        tiny_stream(samples_per_class=24),
        optimizer="sgd",
        momentum=0.0,
        lr=0.05,
        batch_size=8,
        max_steps_per_epoch=6,
    )
    return sum(float(u.dense().norm()) for u in run.results[1].updates.values())


def test_the_pull_keeps_factors_near_the_previous_task():
    # With SGD and lr * 2 * strength = 1, every step lands back on the anchor minus one gradient step,
    # so six steps drift no further than one; without the pull the six steps accumulate.
    free, pulled = _drift(0.0), _drift(1 / (2 * 0.05))
    assert pulled < 0.5 * free, (pulled, free)


def test_zero_strength_is_sequential_lora():
    lora = builtin_method("lora")
    stream = tiny_stream(samples_per_class=8)
    a = run_method(LoRAL2({"rank": 3, "strength": 0.0}), stream, max_steps_per_epoch=2)
    b = run_method(lora({"rank": 3}), stream, max_steps_per_epoch=2)
    assert np.array_equal(a.R, b.R, equal_nan=True)
    for name, u in a.results[1].updates.items():
        assert torch.equal(u.dense(), b.results[1].updates[name].dense())
