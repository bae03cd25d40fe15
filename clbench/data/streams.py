"""Continual streams built through Avalanche: benchmark name -> tasks with a fixed class order (data only).

Every stream is materialised once as uint8 tensors (N x C x H x W) per task so that the training loop can
feed a device from memory and do resizing/normalisation on the device (``CLModel.preprocess``). Labels are
remapped to the position of their class in the class order, so task t owns the contiguous label range of
its head.

Each stream is one module of ``clbench.data.sources`` that registers a ``StreamSpec`` (``clbench.data.registry``:
its name, class count, builder, preflight check, default augmentation); this module holds what the builders share:
the class order, the in-memory and file-backed task splits, the augmentation and test transform the suite asks for.

Real image streams carry a device augmentation (``Stream.augment``: random resized crop + flip, as InfLoRA)
that the loop applies to training batches only, and record the checksum of the split they used in
``Stream.meta["split_sha256"]`` (the runner logs ``Stream.meta`` as tags).

Only this module imports Avalanche's benchmark API, and only inside functions (its import costs seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clbench.data.imagecache import IndexedImages
from clbench.data.registry import stream_spec
from clbench.errors import ClbenchError


@dataclass
class TaskData:
    classes: tuple[int, ...]  # remapped (contiguous) labels of this task
    train_x: torch.Tensor | IndexedImages  # uint8 N x C x H x W (or a lazy view of a memmap)
    train_y: torch.Tensor
    test_x: torch.Tensor | IndexedImages
    test_y: torch.Tensor


@dataclass
class Stream:
    name: str
    tasks: list[TaskData]
    class_order: list[int]  # original class ids in stream order
    meta: dict = field(default_factory=dict)  # strings worth a tag: split_sha256, split_source, ...
    # applied by the loop to training batches on the device: (uint8 batch, output size, generator) -> float [0, 1]
    augment: Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor] | None = None
    # applied by the loop to test batches on the device (same signature; None: the model's resize only)
    test_transform: Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_order)


def class_order_for(num_classes: int, seed: int, shuffle: bool, explicit: list[int] | str | None,
                    stream_name: str = "") -> list[int]:
    """The stream's class order (original class ids in stream order): ``explicit`` when a list, an official
    repository's rule when a name (``official_class_order``), else numpy's permutation of the seed when
    ``shuffle`` (PILOT's rule) or the ids in order."""
    if isinstance(explicit, str):
        return official_class_order(explicit, num_classes, seed, stream_name)
    if explicit is not None:
        if sorted(explicit) != list(range(num_classes)):
            raise ClbenchError(f"stream.class_order: must be a permutation of 0..{num_classes - 1}")
        return list(explicit)
    if not shuffle:
        return list(range(num_classes))
    return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]


def official_class_order(rule: str, num_classes: int, seed: int, stream_name: str) -> list[int]:
    """An official repository's class order for ``seed``, in clbench's class ids.

    ``pilot``: PILOT's ``utils/data_manager.py`` (CL-LoRA, SD-LoRA): ``np.random.seed(seed)``, then
    ``np.random.permutation(num_classes)`` (their ImageNet-R ids are ImageFolder's sorted wnids, as ours).
    ``coda_prompt``: CODA-Prompt's ``trainer.py``: ``arange`` shuffled by Python's ``random.shuffle`` after
    ``random.seed(seed)``, and only when ``seed > 0`` (seed 0 keeps the ids in order). Its ImageNet-R class ids are
    the ``targets`` of ``dataloaders/splits/imagenet-r_*.yaml`` (a permutation of the wnids, shipped as
    ``clbench/splits/coda_prompt_imagenet_r_targets.txt``), mapped here to ours (sorted wnids)."""
    import random

    if rule == "pilot":
        return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]
    from clbench.data.registry import stream_names

    known = [n for n in stream_names() if stream_spec(n).coda_prompt_ids]
    if stream_name not in known:
        raise ClbenchError(f"stream.class_order: coda_prompt's class ids are known for {' and '.join(known)}, "
                           f"not {stream_name}; give an explicit order")
    order = list(range(num_classes))
    if seed > 0:
        random.Random(seed).shuffle(order)  # the same draws as random.seed(seed); random.shuffle(order)
    if stream_name == "imagenet_r":
        from clbench.data.datasets.splitfiles import class_list, read_pinned

        ours = {w: i for i, w in enumerate(class_list("imagenet_r"))}
        theirs = (read_pinned("coda_prompt_imagenet_r_targets.txt") or b"").decode().split()
        if sorted(theirs) != sorted(ours):
            raise ClbenchError("clbench/splits/coda_prompt_imagenet_r_targets.txt is missing or not the 200 "
                               "ImageNet-R wnids; reinstall clbench")
        order = [ours[theirs[k]] for k in order]
    return order


def split_tasks(num_classes: int, num_tasks: int, where: str = "stream.num_tasks") -> None:
    if num_tasks < 1 or num_classes % num_tasks:
        raise ClbenchError(f"{where}: {num_tasks} tasks do not divide the {num_classes} classes evenly; "
                           f"choose a divisor of {num_classes}")


def load_avalanche() -> None:
    """Import Avalanche's benchmark package now. Under torchrun this must happen before the process group
    exists (Avalanche creates loggers at import and refuses to on ranks > 0 afterwards); the caller that joins
    the group calls this first, so that ``clbench.run.distributed`` need not import Avalanche itself."""
    import avalanche.benchmarks  # noqa: F401


Rows = tuple[Any, torch.Tensor]  # (images, labels) of one split


def _from_tensors(name: str, train: Rows, test: Rows, num_tasks: int, order: list[int]) -> Stream:
    """A stream over in-memory images (uint8, or floats in [0, 1] stored as uint8)."""
    split_tasks(len(order), num_tasks)
    return _build_tasks(name, (_as_uint8(train[0]), train[1]), (_as_uint8(test[0]), test[1]), num_tasks, order,
                        take=lambda x, idx: x[torch.from_numpy(idx)])


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else (x.float().clamp(0, 1) * 255).round().to(torch.uint8)


def materialise(name: str, train_stream, test_stream, order: list[int], with_test: bool = True) -> Stream:
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    tasks = []
    for tr, te in zip(train_stream, test_stream):
        classes = sorted(int(position[c]) for c in tr.classes_in_this_experience)
        xs = []
        for split in (tr.dataset, te.dataset) if with_test else (tr.dataset,):
            x, y = _collect(split)
            xs += [x, position[y]]
        if not with_test:  # placeholder test split: the training tensors, never copied
            xs += xs[:2]
        tasks.append(TaskData(tuple(classes), *xs))
    return Stream(name, tasks, order)


def _collect(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=2048, shuffle=False, num_workers=0)
    xs, ys = [], []
    for batch in loader:
        x, y = batch[0], batch[1]
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        xs.append(x)
        ys.append(y.long())
    return torch.cat(xs), torch.cat(ys)


def _fixed_split(y: np.ndarray, test_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A per-class train/test split that does not depend on the run's seed (a pinned split)."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test += idx[:test_per_class].tolist()
        train += idx[test_per_class:].tolist()
    return np.sort(train), np.sort(test)


def synthetic_tensors(num_classes: int, per_class: int, size: int = 16, seed: int = 0, noise: float = 0.25):
    """Each class is a random binary 4x4 block pattern (dark/bright, smoothed); samples add noise; uint8."""
    g = torch.Generator().manual_seed(1000 + seed)
    protos = 0.2 + 0.6 * (torch.rand(num_classes, 1, 4, 4, generator=g) > 0.5).float()
    protos = torch.nn.functional.interpolate(protos, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = protos[y] + noise * torch.randn(len(y), 1, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def build_stream(cfg, seed: int, with_test: bool = True) -> Stream:
    """``cfg`` is a ``clbench.suite.StreamConfig``; the class order comes from ``seed`` unless fixed. The stream's
    registered builder (``clbench.data.registry``) makes the tasks; the suite's augmentation and test transform are
    added here.

    ``with_test=False`` (validation runs, clbench.data.validation): no test image is read, decoded or copied; every
    task's ``test_x`` / ``test_y`` is then a placeholder that the caller replaces (its held-out split)."""
    return _with_augment(stream_spec(cfg.name).build(cfg, seed, with_test), cfg)


def tensor_stream(cfg, seed: int, with_test: bool, x: torch.Tensor, y: torch.Tensor, test_per_class: int) -> Stream:
    """A stream over in-memory images ``x`` (uint8 N x C x H x W) with labels ``y`` (0..K-1), split into train and
    test by a fixed per-class draw of ``test_per_class`` test images (independent of the run's seed)."""
    tr, te = _fixed_split(y.numpy(), test_per_class=test_per_class)
    order = class_order_for(int(y.max()) + 1, seed, cfg.shuffle_classes, cfg.class_order, cfg.name)
    if not with_test:  # the training rows stand in for the test split, which is never indexed
        te = tr
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return _from_tensors(cfg.name, (x[tr], y[tr]), (x[te], y[te]), cfg.num_tasks, order)


def _with_augment(stream: Stream, cfg) -> Stream:
    kind = getattr(cfg, "augment", "none")
    if kind == "auto":
        kind = stream_spec(cfg.name).augment
    if kind != "none":
        import functools

        from clbench.data.augment import AUGMENTS

        scale = tuple(getattr(cfg, "crop_scale", (0.08, 1.0)))
        stream.augment = AUGMENTS[kind]
        if scale != (0.08, 1.0):
            stream.augment = functools.partial(AUGMENTS[kind], scale=scale)
            stream.meta["crop_scale"] = f"{scale[0]:g}-{scale[1]:g}"
    stream.meta["augment"] = kind
    if getattr(cfg, "test_transform", "auto") == "resize_center_crop":
        from clbench.data.augment import resize_center_crop

        stream.test_transform = resize_center_crop
        stream.meta["test_transform"] = "resize_center_crop"
    return stream


def data_root(cfg) -> Path:
    from clbench.paths import data_dir

    return Path(cfg.root).expanduser() if cfg.root else data_dir()


def image_stream(cfg, seed: int, with_test: bool, dataset: tuple[Path, Any, list[str]]) -> Stream:
    """A stream of image files (ImageNet-R, DomainNet): ``dataset`` is (image folder, pinned split, class list)
    from ``clbench.data.datasets``; decode-once memmap cache -> Avalanche class-incremental stream."""
    from clbench.data import imagecache
    from clbench.data.datasets.splitfiles import pinned_sums

    folder, split, classes = dataset
    num_classes = len(classes)
    split_tasks(num_classes, cfg.num_tasks)
    order = class_order_for(num_classes, seed, cfg.shuffle_classes, cfg.class_order, cfg.name)
    sha = split.sha256
    say = lambda msg: print(msg, flush=True)  # noqa: E731 - decoding a real dataset takes minutes
    train_size = int(round(cfg.resolution * 256 / 224))  # room for random resized crops to resolution
    xtr, _ = imagecache.load_or_build(imagecache.ImageSet(cfg.name, "train", train_size, "center", sha),
                                      [folder / p for p, _ in split.train], cfg.cache, progress=say)
    ytr = torch.tensor([y for _, y in split.train], dtype=torch.long)
    if with_test:
        xte, _ = imagecache.load_or_build(imagecache.ImageSet(cfg.name, "test", cfg.resolution, "resize_center", sha),
                                          [folder / p for p, _ in split.test], cfg.cache, progress=say)
        yte = torch.tensor([y for _, y in split.test], dtype=torch.long)
    else:  # the training rows stand in for the test split: no test image is decoded
        xte, yte = xtr, ytr
    stream = _from_index(cfg.name, (xtr, ytr), (xte, yte), cfg.num_tasks, order)
    stream.meta.update(split_sha256=sha, split_source=split.source,
                       classes_sha256=pinned_sums()[f"{cfg.name}_classes.txt"])
    return stream


def _from_index(name: str, train: Rows, test: Rows, num_tasks: int, order: list[int]) -> Stream:
    """A stream over (memmapped) image arrays; a task holds lazy views, images stay where they are."""
    return _build_tasks(name, train, test, num_tasks, order, take=IndexedImages)


class _Rows(torch.utils.data.TensorDataset):
    """(row index, label) pairs with the ``targets`` that Avalanche's public ``as_classification_dataset`` reads."""

    def __init__(self, y: torch.Tensor) -> None:
        super().__init__(torch.arange(len(y)), y)
        self.targets = y.tolist()


def _build_tasks(name: str, train: Rows, test: Rows, num_tasks: int, order: list[int],
                 take: Callable[[Any, np.ndarray], Any]) -> Stream:
    """The one TaskData builder: Avalanche's class-incremental split of the sample rows (public API:
    ``as_classification_dataset``, ``class_incremental_benchmark``), then ``take(x, rows)`` per task and split.
    Labels are remapped so that class ``order[k]`` becomes ``k``."""
    from avalanche.benchmarks.scenarios import class_incremental_benchmark
    from avalanche.benchmarks.utils.utils import as_classification_dataset

    (xtr, ytr), (xte, yte) = train, test
    bases = {"train": _Rows(ytr), "test": _Rows(yte)}
    bm = class_incremental_benchmark({k: as_classification_dataset(b) for k, b in bases.items()},
                                     class_order=order, num_experiences=num_tasks)
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    tasks = []
    for tr, te in zip(bm.train_stream, bm.test_stream):
        classes = sorted(int(position[c]) for c in tr.classes_in_this_experience)
        parts = []
        for exp, x, y, base in ((tr, xtr, ytr, bases["train"]), (te, xte, yte, bases["test"])):
            idx = _experience_indices(exp.dataset, base)
            parts += [take(x, idx), position[y[torch.from_numpy(idx)]]]
        tasks.append(TaskData(tuple(classes), *parts))
    return Stream(name, tasks, order)


def _experience_indices(dataset, base) -> np.ndarray:
    """Row indices of an experience's samples in the base dataset, in the experience's order.

    Avalanche 0.6 has no public accessor for a subset's indices; the fast path reads the private
    ``_flat_data._datasets`` / ``_indices`` and checks a few rows against the public item access, falling back
    to iterating the experience (public, slower) if the internals differ."""
    flat = getattr(dataset, "_flat_data", None)
    datasets = getattr(flat, "_datasets", None)
    if datasets is not None and len(datasets) == 1 and datasets[0] is base and flat._indices is not None:
        idx = np.fromiter(flat._indices, dtype=np.int64, count=len(dataset))
        probe = np.linspace(0, len(idx) - 1, min(len(idx), 8)).astype(int)  # internals changed? check a few
        if all(int(dataset[int(i)][0]) == idx[i] for i in probe):
            return idx
    loader = torch.utils.data.DataLoader(dataset, batch_size=4096, shuffle=False, num_workers=0)
    return torch.cat([batch[0] for batch in loader]).numpy().astype(np.int64)
