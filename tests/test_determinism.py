"""The determinism policy (README, "Same command, same numbers"): on the CPU a run is bit-reproducible at a given
thread count, uninterrupted or resumed. The prompt methods' prompt selection once broke it at two threads: plain
indexing of a prompt pool differentiates through parallel atomic float additions (clbench.methods.prompts.pick)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from clbench.methods.prompts import pick
from clbench.methods.registry import discover
from clbench.testing import assert_resumes


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block (the tests run at one: tests/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_pick_gradient_is_the_same_bits_on_every_run_at_two_threads():
    """L2P++'s shape (pool 30, length 20, top-5 of a batch of 64): 204,800 gradient elements, far above the size
    where plain indexing's backward goes parallel."""
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(30, 20, 32, generator=g).requires_grad_()
    idx = torch.randint(0, 30, (64, 5), generator=g)
    upstream = torch.randn(64, 5, 20, 32, generator=g)
    assert torch.equal(pick(pool, idx), pool[idx])  # the same forward as plain indexing
    grads = []
    with threads(2):
        for _ in range(20):
            pool.grad = None
            pick(pool, idx).backward(upstream)
            grads.append(pool.grad.clone())
    with threads(1):
        pool.grad = None
        pool[idx].backward(upstream)  # one thread: plain indexing's serial path, in index order
    assert all(torch.equal(gr, grads[0]) for gr in grads)
    assert torch.equal(grads[0], pool.grad)  # and the same order of additions as the serial path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["l2p", "dualprompt", "codaprompt"])
def test_prompt_methods_resume_bit_exactly_at_two_threads(name):
    """`clbench check NAME`'s resume step at torch's default thread count of a 2-core machine (the default test
    run covers the op that broke it: test_pick_gradient_is_the_same_bits_on_every_run_at_two_threads)."""
    cls = discover(strict=False).methods[name].cls
    with threads(2):
        assert_resumes(cls, after=1, num_tasks=3)


def test_runtime_deterministic_switches_torch_to_deterministic_kernels_and_back(monkeypatch):
    """runtime.deterministic (outside the suite hash: tests/test_protocols.py) turns on torch's deterministic
    algorithms and cuBLAS's fixed workspace for a run, and a run without it leaves torch's defaults."""
    from clbench.run.runner import deterministic_algorithms

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        deterministic_algorithms(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        pool = torch.rand(30, 20, 32, requires_grad=True)
        pool[torch.zeros(64, 5, dtype=torch.long)].sum().backward()  # a CPU op with a deterministic path
    finally:
        deterministic_algorithms(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
