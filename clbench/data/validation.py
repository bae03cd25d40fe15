"""The validation split: hyperparameters are chosen on held-out training data, never on a test image.

A suite's ``validation: {fraction: F, seed: S}`` (``clbench.suite.ValidationConfig``) holds out, in every task
and for every class, ``round(F * n)`` of the class's ``n`` training images (at least one, and at least one left
to train on), drawn with ``S`` (default: the run's seed). A validation run (``Suite.for_validation()``, what
``clbench sweep`` runs) trains on the rest and evaluates on the held-out images exactly as a test run evaluates
on the test split; its metrics go under ``val/`` (``clbench.keys.for_split``) and it is tagged
``clbench.split=validation``. The test split is not built for it (``build_stream(..., with_test=False)``): no
test image is read, decoded or copied, and the placeholders left in its place raise if anything touches them.

The real image streams cache training images at ``resolution * 256 / 224`` (room for random resized crops)
and test images as Resize + CenterCrop(resolution); held-out images are centre-cropped to ``resolution`` when
read, so they are preprocessed exactly as test images are.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from clbench.data.imagecache import IndexedImages
from clbench.data.registry import stream_spec
from clbench.data.streams import Stream, TaskData, build_stream
from clbench.errors import ClbenchError
from clbench.seeds import derive_seed
from clbench.suite import Suite


class Withheld:
    """Stands in for a test split a validation run must not see: any use of it raises."""

    def __init__(self, what: str) -> None:
        self._what = what

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self._what}: a validation run touched the test split (clbench.data.validation)")

    __len__ = __getitem__ = __iter__ = __array__ = _refuse

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        self._refuse()


class CenterCropped:
    """A uint8 ``N x C x H x W`` image source read through a central ``size x size`` crop (see the module doc)."""

    def __init__(self, x: Any, size: int) -> None:
        self.x, self.size = x, size

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.x), self.x.shape[1], self.size, self.size)

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def __getitem__(self, sel: Any) -> torch.Tensor:
        rows = self.x[sel]
        h, w = rows.shape[-2:]
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return rows[..., top:top + self.size, left:left + self.size].contiguous()


def held_out_rows(y: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) row indices of labels ``y``: per class a seeded draw of round(fraction * n) rows, at
    least 1 and at most n - 1; both sorted. A class with a single image cannot be split and is refused."""
    labels = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    rng = np.random.RandomState(seed)
    keep, held = [], []
    for c in np.unique(labels):  # sorted: the draw depends on the seed only, not on the order of the rows
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            raise ClbenchError(f"validation: class {int(c)} has {len(rows)} training image(s); a held-out split "
                               "needs at least 2 per class (one to train on, one to validate on)")
        k = min(len(rows) - 1, max(1, int(np.floor(fraction * len(rows) + 0.5))))  # half up, not to even
        drawn = rng.permutation(rows)
        held.append(drawn[:k])
        keep.append(drawn[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _take(x: Any, rows: np.ndarray) -> Any:
    """Rows of a task's training images, as the same kind of object (a lazy view stays lazy)."""
    if isinstance(x, IndexedImages):
        return IndexedImages(x.base, x.index[rows])
    return x[torch.from_numpy(rows)]


def holdout(stream: Stream, fraction: float, seed: int, crop: int | None = None) -> Stream:
    """``stream`` with each task's held-out training images as its evaluation split (``test_x`` / ``test_y``)
    and the rest as its training data; the original test split is dropped without being read. ``crop``:
    centre-crop the held-out images to this size (the image streams' test preprocessing)."""
    tasks = []
    for t, task in enumerate(stream.tasks):
        # a different draw per task (their classes differ anyway), reproducible from (seed, task)
        keep, held = held_out_rows(task.train_y, fraction, derive_seed(seed, t))
        val_x = _take(task.train_x, held)
        tasks.append(TaskData(task.classes, _take(task.train_x, keep), task.train_y[torch.from_numpy(keep)],
                              CenterCropped(val_x, crop) if crop else val_x,
                              task.train_y[torch.from_numpy(held)]))
    meta = {**stream.meta, "split": "validation", "validation_fraction": str(fraction),
            "validation_seed": str(seed)}
    return replace(stream, tasks=tasks, meta=meta)


def build_run_stream(suite: Suite, seed: int) -> Stream:
    """The stream a run of ``suite`` with ``seed`` trains and evaluates on: the suite's stream (test runs), or
    its validation split with the test split never built (validation runs)."""
    if suite.split != "validation":
        return build_stream(suite.stream, seed)
    stream = build_stream(suite.stream, seed, with_test=False)
    if not hasattr(stream, "class_order"):  # a text stream (clbench.data.text): no held-out split of it yet
        raise ClbenchError(f"stream.name: {suite.stream.name} is a text stream, and clbench cannot hold out a "
                           "validation split of a text stream yet (clbench sweep); run it on its test split")
    for t, task in enumerate(stream.tasks):  # the placeholders: touching them is an error, not a leak
        task.test_x, task.test_y = Withheld(f"task {t} test_x"), Withheld(f"task {t} test_y")
    v = suite.validation
    # cached streams keep training images larger than the test images (room for random crops)
    crop = suite.stream.resolution if stream_spec(suite.stream.name).images == "cached" else None
    return holdout(stream, v.fraction, seed if v.seed is None else v.seed, crop)


def stream_cache_key(suite: Suite, seed: int) -> tuple:
    """What makes two runs' built streams the same object (executors reuse a built stream across runs)."""
    import json

    v = suite.validation.model_dump() if suite.split == "validation" else None
    return (seed, json.dumps(suite.stream.model_dump(mode="json"), sort_keys=True), suite.split,
            json.dumps(v, sort_keys=True))
