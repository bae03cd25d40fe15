"""Tests of the lora_ewc plugin: the clbench contract and resume, then the properties that make it EWC.

Run after ``pip install -e .`` (or with this folder on PYTHONPATH): ``pytest tests``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from clbench_lora_ewc import LoRAEWC

from clbench import contract
from clbench.testing import assert_resumes, builtin_method, run_method, tiny_stream

FAST = dict(batch_size=8, max_steps_per_epoch=2)


def _run(params: dict, num_tasks: int = 2):
    return run_method(LoRAEWC({"rank": 2, "fisher_batch_size": 4, **params}),
                      tiny_stream(num_tasks=num_tasks, num_classes=2 * num_tasks, samples_per_class=8), **FAST)


def _value(method) -> float:
    return float(method.penalty().detach())


def test_contract():
    contract.check_method(LoRAEWC)


def test_resume_with_two_fishers_matches_an_uninterrupted_run():
    """Stopped after task 2 of 3 (two Fishers and anchors in method_state), checkpointed through the runner's
    path, reloaded weights_only into a fresh instance: the third task trains bit-identically."""
    done = assert_resumes(LoRAEWC, {"rank": 2, "ewc_lambda": 1e4, "fisher_batch_size": 4}, after=2, num_tasks=3)
    assert len(done.checkpoint["method"]["fisher"]) == 2
    assert done.resumed[0].loss_terms["ewc"] > 0  # the resumed task was penalised, from the restored state


def test_penalty_is_zero_at_the_anchor_and_quadratic_in_the_fisher_weighted_distance():
    run = _run({"ewc_lambda": 3.0})
    method = run.method
    assert _value(method) > 0  # task 0's anchor is behind: its quadratic pulls
    method.fisher, method.anchor = method.fisher[-1:], method.anchor[-1:]
    assert _value(method) == 0.0  # the factors are where the last task left them: its anchor
    factors = method.factors()
    name, q = next(iter(factors.items()))
    # known Fisher weights: F on the chosen factor (zero elsewhere)
    weights = torch.rand_like(q) + 0.5
    method.fisher = [{k: (weights if k == name else torch.zeros_like(v)) for k, v in factors.items()}]
    delta = torch.randn_like(q) * 0.01
    with torch.no_grad():
        q.add_(delta)
    one = _value(method)
    assert np.isclose(one, 3.0 / 2 * float((weights * delta.pow(2)).sum()), rtol=1e-5)
    with torch.no_grad():
        q.add_(delta)  # twice the distance: four times the penalty
    assert np.isclose(_value(method), 4 * one, rtol=1e-5)
    method.fisher = [{k: 2 * v for k, v in f.items()} for f in method.fisher]  # twice the weights: twice it
    assert np.isclose(_value(method), 8 * one, rtol=1e-5)
    # an entry the Fisher says does not matter moves for free
    method.fisher[0][name] = torch.zeros_like(q)
    assert _value(method) == 0.0


def test_one_penalty_per_finished_task():
    run = _run({"ewc_lambda": 5.0}, num_tasks=3)
    method = run.method
    assert len(method.fisher) == len(method.anchor) == 3
    assert run.results[0].loss_terms == {} and run.results[1].loss_terms["ewc"] > 0
    # the penalty is the sum of the per-task quadratics
    live = method.factors()
    parts = [sum((f[k] * (q - a[k]).pow(2)).sum() for k, q in live.items())
             for f, a in zip(method.fisher, method.anchor)]
    assert torch.allclose(method.penalty(), 5.0 / 2 * sum(parts))
    assert all(v.grad_fn is None and not v.requires_grad for f in method.fisher for v in f.values())  # detached


def test_fisher_is_the_mean_squared_per_sample_gradient():
    """With fisher_batch_size 1 the estimate is E[(d log p(y|x) / d theta)^2] over the task's images, computed
    here independently, one image at a time."""
    stream = tiny_stream(num_tasks=2, num_classes=4, samples_per_class=4)
    run = run_method(LoRAEWC({"rank": 2, "fisher_batch_size": 1, "fisher_fraction": 0.5}), stream, **FAST)
    method, model = run.method, run.model
    task = stream.tasks[1]
    live = method.factors()
    idx = torch.linspace(0, len(task.train_y) - 1, round(0.5 * len(task.train_y))).round().long()  # evenly spaced
    expected = {k: torch.zeros_like(q) for k, q in live.items()}
    model.eval()
    for i in idx:
        x = model.preprocess(task.train_x[i: i + 1])
        y = torch.as_tensor(task.train_y[i: i + 1]) - min(task.classes)
        grads = torch.autograd.grad(-F.log_softmax(model(x, head=1), -1)[0, y[0]], list(live.values()))
        for k, g in zip(live, grads):
            expected[k] += g.pow(2) / len(idx)
    # the method's estimate after task 1 was taken with these very factors (the anchor of task 1)
    for k in live:
        assert torch.equal(live[k].detach(), method.anchor[1][k])
        assert torch.allclose(method.fisher[1][k], expected[k], rtol=1e-4, atol=1e-12), k
    assert any(float(f.sum()) > 0 for f in method.fisher[1].values())


def test_zero_lambda_is_sequential_lora():
    lora = builtin_method("lora")
    stream = tiny_stream(samples_per_class=8)
    a = run_method(LoRAEWC({"rank": 3, "ewc_lambda": 0.0}), stream, max_steps_per_epoch=2)
    b = run_method(lora({"rank": 3}), stream, max_steps_per_epoch=2)
    assert np.array_equal(a.R, b.R, equal_nan=True)
    for name, u in a.results[1].updates.items():
        assert torch.equal(u.dense(), b.results[1].updates[name].dense())
