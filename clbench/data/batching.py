"""Batches: rows of in-memory uint8 image tensors moved to the device and preprocessed there, drawn as a
:class:`Draw` says (the training loop's batches, a hook's ``ctx.loader``, rehearsal's added rows)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Draw:
    """How rows are drawn into batches: ``shuffle`` with ``generator``; a uniformly spaced ``fraction`` of the
    rows (deterministic); at most ``limit`` batches; ``augment(x, size, generator)`` (the stream's training
    augmentation) on the device before preprocessing; ``shard=(rank, world)`` under torchrun
    (clbench.run.distributed): this rank's rows of every global batch, possibly empty."""

    shuffle: bool = False
    generator: torch.Generator | None = None
    fraction: float = 1.0
    limit: int | None = None
    augment: Callable | None = None
    shard: tuple[int, int] | None = None
    drop_last: bool = False  # no last partial (global) batch
    positions: bool = False  # yield (x, y, pos): pos the batch's row numbers in x (a CPU long tensor)


IN_ORDER = Draw()  # evaluation: every row, in order, no augmentation


def _take(x: torch.Tensor, sel: torch.Tensor | slice, pin: bool) -> torch.Tensor:
    """Rows ``sel`` of ``x`` on the host; with ``pin``, gathered straight into page-locked memory (one copy, not
    a gather and then a pinning copy), so the device copy can run asynchronously."""
    if not pin:
        return x[sel]
    if isinstance(x, torch.Tensor) and isinstance(sel, torch.Tensor):
        out = torch.empty((len(sel), *x.shape[1:]), dtype=x.dtype, pin_memory=True)
        return torch.index_select(x, 0, sel, out=out)
    return x[sel].pin_memory()


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device, model: Any,
            draw: Draw = IN_ORDER) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches of ``(x, y)`` on ``device``, preprocessed for ``model`` (a ``CLModel``), drawn as ``draw`` says."""
    shuffle, generator, fraction, shard = draw.shuffle, draw.generator, draw.fraction, draw.shard
    n = len(x)
    if fraction < 1.0:  # a uniformly spaced subset, deterministic
        idx = torch.linspace(0, n - 1, max(1, int(round(fraction * n)))).round().long()
    else:
        idx = torch.arange(n)
    if shuffle:
        idx = idx[torch.randperm(len(idx), generator=generator)]
    if shard is not None and draw.augment is not None and generator is not None:  # [distributed] same shuffles
        aug_seed = int(torch.randint(2**62, (1,), generator=generator)) + shard[0]  # on every rank, own crops
        generator = torch.Generator().manual_seed(aug_seed)
    pin = device.type == "cuda"
    in_order = fraction >= 1.0 and not shuffle  # evaluation: plain slices, no gather copy
    ends = len(idx) - batch_size + 1 if draw.drop_last else len(idx)
    for b, start in enumerate(range(0, max(ends, 0), batch_size)):
        if draw.limit is not None and b >= draw.limit:
            break
        sel = slice(start, start + batch_size) if in_order else idx[start:start + batch_size]
        if shard is not None:  # [distributed] rows rank, rank + world, ... of the global batch
            sel = (slice(start + shard[0], min(start + batch_size, len(idx)), shard[1]) if in_order
                   else sel[shard[0]::shard[1]])
        xb, yb = _take(x, sel, pin), _take(y, sel, pin)
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        with torch.no_grad():
            if draw.augment is not None:
                xb = draw.augment(xb, model.image_size, generator)
            xb = model.preprocess(xb)
        if draw.positions:
            yield xb, yb, torch.arange(n)[sel] if isinstance(sel, slice) else sel
        else:
            yield xb, yb
