"""The frozen per-task context handed to every hook: what a method may know about the run and the task."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from clbench.methods.rehearsal import Samples


@dataclass(frozen=True)
class TaskContext:
    """Read-only facts about the current task.

    ``loader(batch_size=None, fraction=1.0, shuffle=False, generator=None, augmented=False)`` yields ``(x, y)``
    batches of this task's training data on ``device``, preprocessed for the backbone, with ``y`` the label
    *within the task* (0..n-1), which is what the current head predicts. ``fraction`` takes a uniformly spaced
    subset (deterministic). ``augmented=True`` applies the stream's training augmentation (the random resized
    crop + flip of ``stream.augment``; a no-op for streams without one), as a method's statistics pass over the
    *training loader* does in official code (InfLoRA's covariance passes); each augmented call draws its own
    crops from a generator seeded by (seed, task, call number), so runs and resumed runs repeat them, and the
    training batches' draws are untouched. The loader never changes the model's train/eval mode: a method sets
    it (InfLoRA runs its passes in eval mode, as the official code).

    ``task_samples(j)`` (j <= ``task``, default this task) is task j's raw training set as
    ``clbench.methods.rehearsal.Samples`` (uint8 images as stored, stream-wide labels): what a rehearsal method keeps
    or trains on. Later tasks are refused. ``stream_samples(index)`` gives the samples of a stream index
    (``(task, row)`` pairs into those sets) in one call.
    """

    task: int
    num_tasks: int
    classes: tuple[int, ...]
    seen_classes: tuple[int, ...]
    device: torch.device
    seed: int
    loader: Callable[..., Iterator[tuple[torch.Tensor, torch.Tensor]]]
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    steps_per_epoch: int = 0
    autocast: Callable[[], Any] = field(default=None)  # type: ignore[assignment]
    samples_of: Callable[[int], Samples] | None = None

    def task_samples(self, task: int | None = None) -> Samples:
        """The raw training samples of seen task ``task`` (default: this one), scope ``"task"``."""
        from clbench.errors import ClbenchError

        j = self.task if task is None else task
        if not 0 <= j <= self.task or self.samples_of is None:
            raise ClbenchError(f"task_samples({j}): only tasks 0..{self.task} are seen at task {self.task}")
        return self.samples_of(j)

    def stream_samples(self, index: torch.Tensor) -> Samples:
        """The seen samples a *stream index* names: an ``N x 2`` long tensor of ``(task, row)`` pairs, ``row``
        the position in ``task_samples(task)`` (``clbench.methods.rehearsal``); materialised, in the index's order. What
        a method that keeps indices instead of images (ER's buffer) decodes them with."""
        from clbench.methods.rehearsal import gather

        return gather(self.task_samples, index)

    @property
    def class_offset(self) -> int:
        """Index of this task's first logit in the concatenated heads."""
        return len(self.seen_classes) - len(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)
