"""DER++'s defining properties, on clbench's real loop (CPU, tiny ViT, seconds):

* samples enter the buffer *during training*, through the step hooks' ``rows``, with the logits of the step that
  trained on them (not logits computed later), and keep those logits until their slot is overwritten;
* the logit-matching term is the MSE between the replayed samples' current logits and the logits stored at
  insertion, and it is not zero once the network has moved;
* the buffer is a reservoir (algorithm R): the first ``capacity`` samples fill it in order, afterwards every sample
  presented so far is in it with the same probability capacity / n;
* the clbench contract holds and a run stopped after a task resumes bit-exactly.
"""

from __future__ import annotations

import torch
from clbench_derpp import DERpp, reservoir_slots

from clbench import contract, hookimpl
from clbench.testing import assert_resumes, run_method, tiny_stream

SMALL = {"rank": 2, "buffer_size": 24, "minibatch_size": 4}


class Recording(DERpp):
    """DER++ that records, per step, the rows and logits the loop handed it and the terms it returned."""

    name = "derpp_recording"

    def __init__(self, params=None):
        super().__init__(params)
        self.steps: list[dict] = []

    @hookimpl
    def loss_terms(self, batch, logits, ctx, replayed, rows):
        terms = super().loss_terms(batch, logits, ctx, replayed, rows)
        rows_, step_logits = self._pending
        self.steps.append({"task": ctx.task, "rows": rows_.clone(), "logits": step_logits.clone(), "terms": {k: v.detach() for k, v in (terms or {}).items()},
                           "draws": [d.clone() for d in self._draws],
                           "stored": self.logits.clone(), "width": self.width.clone(),
                           "mse_now": None if not self._draws else replayed.logits.detach().float().cpu()})
        return terms


def _stream():
    return tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8)


def test_samples_enter_during_training_with_the_logits_of_their_step():
    # capacity above what one epoch presents: every trained row enters, in order, with that step's logits
    method = Recording({**SMALL, "buffer_size": 64})
    run_method(method, stream=_stream(), batch_size=8, max_steps_per_epoch=2)
    first = [s for s in method.steps if s["task"] == 0]
    rows = torch.cat([s["rows"] for s in first])
    assert len(first) == 2 and (rows[:, 0] == 0).all()
    assert torch.equal(method.index[:len(rows)], rows)  # inserted during task 0, step by step
    assert torch.equal(method.logits[:len(rows), :2], torch.cat([s["logits"] for s in first]))
    # task 1's rows entered with logits over both tasks' classes, task 0's kept their two-class logits
    later = torch.cat([s["logits"] for s in method.steps if s["task"] == 1])
    assert later.shape[1] == 4 and torch.equal(method.logits[len(rows):len(rows) + len(later)], later)
    assert method.width[:len(rows)].tolist() == [2] * len(rows) and method.seen == len(rows) + len(later)
    assert torch.equal(method.logits[:len(rows), 2:], torch.zeros(len(rows), 2))


def test_the_matching_term_uses_the_logits_stored_at_insertion():
    method = Recording(SMALL)
    run_method(method, stream=_stream(), batch_size=8, max_steps_per_epoch=3)
    replaying = [s for s in method.steps if s["draws"]]
    assert replaying and all("der_mse" in s["terms"] for s in replaying)
    for s in replaying:
        slots = s["draws"][0]
        stored, width = s["stored"][slots], s["width"][slots]
        own = 0 if s["task"] == 0 else len(s["rows"])
        current = s["mse_now"][own:own + len(slots)]
        mask = torch.arange(stored.shape[1])[None, :] < width[:, None]
        expected = method.params.der_alpha * ((current[:, :stored.shape[1]] - stored).pow(2) * mask).sum() / mask.sum()
        assert torch.allclose(s["terms"]["der_mse"], expected, rtol=1e-5, atol=1e-7)
    # once the network has moved, the stored logits are not the current ones: the term is not zero
    assert max(float(s["terms"]["der_mse"]) for s in replaying if s["task"] == 1) > 0


def test_reservoir_fills_in_order_then_keeps_every_sample_with_equal_probability():
    g = torch.Generator().manual_seed(0)
    assert reservoir_slots(0, 5, 8, g) == [0, 1, 2, 3, 4]
    capacity, n, trials = 6, 30, 4000
    counts = torch.zeros(n)
    for _ in range(trials):
        buffer = [-1] * capacity
        for k, slot in enumerate(reservoir_slots(0, n, capacity, g)):
            if slot >= 0:
                buffer[slot] = k
        counts[torch.tensor(buffer)] += 1
    freq = counts / trials
    assert (freq - capacity / n).abs().max() < 0.03, freq  # each ~0.2; binomial std ~0.006


def test_contract_and_resume():
    contract.check_method(DERpp, SMALL)
    assert_resumes(DERpp, SMALL, after=1, num_tasks=3)
