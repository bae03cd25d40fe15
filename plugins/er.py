"""Experience replay (``er``) with a reservoir buffer: the standard rehearsal baseline.

A buffer of fixed capacity (``per_class`` x the stream's number of classes, 20 per class by default, or
``buffer_size``) is filled by reservoir sampling (Vitter's algorithm R) over the stream of training samples:
the n-th sample seen enters with probability capacity / n, replacing a uniformly chosen slot, so at any time
the buffer is a uniform sample of everything seen. Each training step draws ``replay_ratio`` x batch-size
samples uniformly from the buffer (without replacement) and adds them to the step's batch; the loss is the
mean cross-entropy over the combined batch, every sample scored over every seen head and every seen head
training (as ER in Mammoth's class-incremental setting). ``current_scope: task`` keeps the protocol's
current-head loss for the current task's samples instead (``training_set`` is how ER widens it: the task's own
samples with scope ``"seen"``), ``replay_scope: task`` scores replayed samples on their own head only. The
trained part is LoRA adapters as the ``lora`` baseline's (``trainable: lora``, default) or the whole backbone
(``trainable: full``).

References: Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", arXiv 1902.10486, 2019
(ER with reservoir sampling); Buzzega et al., "Dark Experience for General Continual Learning", NeurIPS 2020,
arXiv 2004.07211, github.com/aimagelab/mammoth (``models/er.py``, ``utils/buffer.py``).

Deviations from Mammoth's ER: (1) the buffer is updated at the end of each task, with that task's samples
presented once in a seeded random order, rather than with every minibatch during training (Mammoth adds each
batch again in every epoch, so a sample can enter twice); so during task t the buffer holds only tasks < t and
every replayed sample is an earlier task's. (2) The number replayed per step is ``replay_ratio`` x the suite's
batch size (Mammoth's ``minibatch_size``, default the batch size), also on a task's short last batch. Images are
the stream's uint8 and augmented like the batch when replayed, as Mammoth augments its stored non-augmented
images on replay. (3) The buffer *is* a stream index (``clbench.methods.rehearsal``: one ``(task, row)`` pair per slot):
the stream is deterministic, so the checkpoint keeps 16 bytes a slot (kilobytes, whatever the image size) and
the images are decoded from the stream into memory when the buffer fills and again when a run resumes
(``ctx.stream_samples``); Mammoth's buffer and its checkpoints hold the images.

Measured on the quickstart (mnist5k, 5 tasks): with ``current_scope: task`` ER's class-incremental accuracy after
task 2 was no better than sequential LoRA's (52.75 vs 52.50; TIL 91.75): earlier heads are never trained against
the current task's samples, so they fire on them. Scoring everything over all seen heads is what rehearsal needs.
"""

from __future__ import annotations

from typing import Literal

import torch
from clbench_plugins._trained_part import PartParams, TrainedPart, seen_heads
from pydantic import Field

from clbench import ClbenchError, Method, Samples, hookimpl


class ERParams(PartParams):
    per_class: int = Field(20, ge=1, description="buffer capacity per class of the stream (capacity = per_class x "
                                                 "number of classes), unless buffer_size is set")
    buffer_size: int | None = Field(None, ge=1, description="total buffer capacity in images (overrides per_class)")
    replay_ratio: float = Field(1.0, gt=0, description="replayed samples per step, as a multiple of the batch size")
    current_scope: Literal["seen", "task"] = Field("seen", description="cross-entropy of the current task's samples "
                                                   "over every seen head (seen) or only their own head (task)")
    replay_scope: Literal["seen", "task"] = Field("seen", description="cross-entropy of replayed samples over every "
                                                  "seen head (seen) or only their own task's head (task)")
    trainable: Literal["lora", "full"] = Field("lora", description="what trains: LoRA adapters (lora) or every "
                                               "backbone parameter (full)")


class ExperienceReplay(TrainedPart, Method):
    name = "er"
    aliases = ("replay",)
    paper = ("Chaudhry et al., On Tiny Episodic Memories in Continual Learning, arXiv 1902.10486, 2019; "
             "Buzzega et al., DER, NeurIPS 2020")
    code = "github.com/aimagelab/mammoth (models/er.py)"
    Params = ERParams
    backbones = ("image",)
    backbones_note = ("its buffer stores and replays image samples (training_set, after_task), and the loop "
                      "defines no rehearsal for a language model")

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.trains_backbone = self.params.trainable == "full"  # per instance: it depends on the params
        self.index = torch.zeros(0, 2, dtype=torch.long)  # the buffer: (task, row) per slot, capacity once full
        self.buf_x: torch.Tensor | None = None  # the slots' uint8 images, decoded from the stream (not checkpointed)
        self.buf_y = torch.zeros(0, dtype=torch.long)  # the slots' labels, likewise
        self.seen = 0  # samples presented to the reservoir so far
        self._draw: torch.Generator | None = None

    def capacity(self, ctx) -> int:
        return self.params.buffer_size or self.params.per_class * ctx.num_tasks * len(ctx.classes)

    @hookimpl
    def configure_model(self, model, ctx):
        self.configure_part(model, self.params.trainable)

    @hookimpl
    def training_set(self, ctx):
        # the task's own samples, scored over every seen head (on task 0 that is the protocol's loss)
        return [ctx.task_samples().with_scope("seen")] if self.params.current_scope == "seen" and ctx.task else None

    @hookimpl
    def before_task(self, model, ctx):
        super().before_task(model, ctx)
        self._draw = torch.Generator().manual_seed(ctx.seed * 7_919 + ctx.task)  # per task: resumes exactly

    @hookimpl
    def param_groups(self, model, ctx):
        groups = [{"params": self.part_parameters(model), "name": self.params.trainable}]
        if "seen" in (self.params.replay_scope, self.params.current_scope) and ctx.task > 0:
            groups.append({"params": seen_heads(model, ctx.task), "name": "seen_heads"})
        return groups

    @hookimpl
    def replay_batch(self, ctx):
        if not len(self.buf_y):
            return None
        n = min(len(self.buf_y), max(1, round(self.params.replay_ratio * ctx.batch_size)))
        idx = torch.randperm(len(self.buf_y), generator=self._draw)[:n]
        return Samples(self.buf_x[idx], self.buf_y[idx], self.params.replay_scope)

    @hookimpl
    def after_task(self, model, ctx):
        super().after_task(model, ctx)
        self._reservoir(ctx.task_samples(), ctx.task, self.capacity(ctx),
                        torch.Generator().manual_seed(ctx.seed * 104_729 + ctx.task))

    def _reservoir(self, data: Samples, task: int, capacity: int, g: torch.Generator) -> None:
        """Algorithm R over task ``task``'s samples ``data`` in a seeded random order."""
        order = torch.randperm(len(data), generator=g)
        free = max(0, capacity - len(self.buf_y))
        fill, rest = order[:free], order[free:]
        if len(fill):
            new = data.take(fill)
            self.index = torch.cat([self.index, torch.stack([torch.full_like(fill, task), fill], 1)])
            self.buf_x = new.x if self.buf_x is None else torch.cat([self.buf_x, new.x])
            self.buf_y = torch.cat([self.buf_y, new.y])
            self.seen += len(fill)
        if len(rest):
            # the n-th sample seen (1-based) replaces slot j ~ U{0..n-1} when j < capacity
            n = self.seen + 1 + torch.arange(len(rest))
            slot = (torch.rand(len(rest), generator=g, dtype=torch.float64) * n).long()
            keep = slot < capacity
            # later samples overwrite earlier ones in the same slot, as in the sequential algorithm
            chosen, slots = rest[keep], slot[keep]
            last = {int(s): int(c) for s, c in zip(slots, chosen)}
            if last:
                where, rows = torch.tensor(list(last.keys())), torch.tensor(list(last.values()))
                new = data.take(rows)
                self.buf_x[where], self.buf_y[where] = new.x, new.y
                self.index[where] = torch.stack([torch.full_like(rows, task), rows], 1)
            self.seen += len(rest)

    @hookimpl
    def replay_buffer(self, ctx):
        return None if self.buf_x is None else Samples(self.buf_x, self.buf_y)

    @hookimpl
    def method_state(self, ctx):
        # the index only: images and labels are the stream's, decoded again on resume
        return {"index": self.index.clone(), "seen": self.seen}

    @hookimpl
    def load_method_state(self, model, state, ctx):
        if "index" not in state:
            raise ClbenchError("checkpoint: this ER checkpoint holds decoded images (an older format); run again "
                               "with --restart")
        self.seen = int(state.get("seen", 0))
        self.index = state["index"].clone()
        self.buf_x, self.buf_y = None, torch.zeros(0, dtype=torch.long)
        if len(self.index):
            kept = ctx.stream_samples(self.index)
            self.buf_x, self.buf_y = kept.x, kept.y


def register_methods(register):
    register(ExperienceReplay)
