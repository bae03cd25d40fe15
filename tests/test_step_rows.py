"""The step hooks' ``rows`` (issue 34, item 2): the stream index ``(task, row)`` of the step's training rows, so a
method can insert the step's samples into a buffer during training (DER). Pinned here: the rows give back the
batch's images and labels through ``ctx.task_samples``, an epoch visits every row once, the same rows on a second
run, the same rows in all four step hooks, and, when ``training_set`` replaced the data, the rows index the
first rows of ``replayed`` (``(-1, -1)`` for samples without a stream index). The rehearsal types are public."""

from __future__ import annotations

import pytest
import torch

import clbench
from clbench import ClbenchError, Method, Samples, hookimpl
from clbench.testing import run_method, tiny_stream


class Spy(Method):
    """Records what the step hooks receive."""

    name = "spy"

    def __init__(self, replace_with=None):
        super().__init__()
        self.replace_with = replace_with  # training_set(ctx) -> samples, or None
        self.steps: list[dict] = []

    @hookimpl
    def configure_model(self, model):
        model.backbone.requires_grad_(False)

    @hookimpl
    def training_set(self, ctx):
        return None if self.replace_with is None or ctx.task == 0 else self.replace_with(ctx)

    @hookimpl
    def replay_batch(self, rows):
        self.steps.append({"replay": rows.clone()})

    @hookimpl
    def loss_terms(self, model, batch, logits, ctx, replayed, rows):
        raw = ctx.task_samples(ctx.task).take(rows[:, 1]) if len(batch[1]) else None
        self.steps[-1].update(task=ctx.task, loss=rows.clone(), x=batch[0].detach().clone(), y=batch[1].clone(),
                              raw=raw, replayed=replayed, offset=ctx.class_offset,
                              pre=None if raw is None else model.preprocess(raw.x))

    @hookimpl
    def before_optimizer_step(self, rows):
        self.steps[-1]["before"] = rows.clone()

    @hookimpl
    def after_optimizer_step(self, rows):
        self.steps[-1]["after"] = rows.clone()


def _stream():
    return tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8)


def test_rows_give_back_the_batch_and_an_epoch_visits_every_row_once():
    stream = _stream()
    assert stream.augment is None  # so the batch is the stored rows, preprocessed
    spy = Spy()
    run_method(spy, stream=stream, epochs=2, batch_size=5)
    for task in (0, 1):
        steps = [s for s in spy.steps if s["task"] == task]
        n = len(stream.tasks[task].train_y)
        per_epoch = -(-n // 5)
        assert len(steps) == 2 * per_epoch
        for epoch in range(2):
            rows = torch.cat([s["loss"] for s in steps[epoch * per_epoch:(epoch + 1) * per_epoch]])
            assert (rows[:, 0] == task).all() and sorted(rows[:, 1].tolist()) == list(range(n))
        for s in steps:
            assert s["loss"].dtype == torch.long and s["loss"].device.type == "cpu"
            assert torch.equal(s["replay"], s["loss"]) and torch.equal(s["before"], s["loss"])
            assert torch.equal(s["after"], s["loss"])
            assert torch.equal(s["pre"], s["x"])  # the rows' raw images are the batch's
            assert torch.equal(s["raw"].y, s["y"] + s["offset"])  # stream-wide labels vs labels within the task
    again = Spy()
    run_method(again, stream=stream, epochs=2, batch_size=5)
    assert all(torch.equal(a["loss"], b["loss"]) for a, b in zip(spy.steps, again.steps, strict=True))


def test_with_a_replaced_training_set_rows_index_the_first_replayed_rows():
    stream = _stream()
    joint = Spy(lambda ctx: [ctx.task_samples(j).with_scope("seen") for j in range(ctx.task + 1)])
    run_method(joint, stream=stream, batch_size=6)
    later = [s for s in joint.steps if s["task"] == 1]
    assert later
    seen = torch.cat([s["loss"] for s in later])
    assert set(seen[:, 0].tolist()) == {0, 1}  # rows of both tasks, each from its own training set
    for s in later:
        assert len(s["y"]) == 0 and s["replayed"] is not None
        rows, replayed = s["loss"], s["replayed"]
        labels = torch.stack([stream.tasks[int(t)].train_y[int(r)] for t, r in rows])
        assert torch.equal(replayed.y[:len(rows)].cpu(), labels)
        assert (replayed.scope[:len(rows)] == clbench.SCOPE_SEEN).all()

    # a part without a stream index (a buffer built from bare tensors) reads (-1, -1)
    bare = Spy(lambda ctx: Samples(ctx.task_samples(0).x[:6], ctx.task_samples(0).y[:6], "seen"))
    run_method(bare, stream=stream, batch_size=6)
    assert all((s["loss"] == -1).all() for s in bare.steps if s["task"] == 1)


def test_samples_keep_their_index_and_refuse_a_malformed_one():
    stream = _stream()
    x, y = stream.tasks[0].train_x, stream.tasks[0].train_y
    s = Samples(x, y, index=torch.stack([torch.zeros_like(y), torch.arange(len(y))], 1))
    took = s.with_scope("none").take(torch.tensor([3, 1]))
    assert took.scope == "none" and took.index.tolist() == [[0, 3], [0, 1]]
    with pytest.raises(ClbenchError, match=r"Samples.index: must be a torch.long tensor of \(task, row\) pairs"):
        Samples(x, y, index=torch.zeros(len(y), dtype=torch.long))


def test_the_rehearsal_types_and_scope_names_are_public():
    from clbench.methods import rehearsal

    assert clbench.Samples is rehearsal.Samples and clbench.Replayed is rehearsal.Replayed
    assert clbench.SCOPES == ("task", "seen", "none")
    assert [clbench.SCOPES[c] for c in (clbench.SCOPE_TASK, clbench.SCOPE_SEEN, clbench.SCOPE_NONE)] == \
        ["task", "seen", "none"]


def test_contributing_rehearsal_section_matches_the_types_and_the_derpp_example():
    import dataclasses
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    guide = (root / "CONTRIBUTING.md").read_text()
    section = guide[guide.index("### Rehearsal: `Samples`"):guide.index("### Hook author's guide")]
    tables = re.split(r"\*\*`Replayed`\*\*", section)
    for cls, text in ((Samples, tables[0]), (clbench.Replayed, tables[1])):
        documented = re.findall(r"^\| `(\w+)` \|", text, flags=re.M)
        assert documented == [f.name for f in dataclasses.fields(cls)], (cls, documented)
    example = (root / "examples" / "clbench-derpp" / "clbench_derpp.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2 and all(block in example for block in blocks)
