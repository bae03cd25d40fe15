"""Training on samples of earlier tasks: the typed data of the rehearsal hooks and the loop's use of them.

A method that rehearses (experience replay, DER, GDumb, joint training) hands the loop :class:`Samples`: raw
uint8 images as the stream stores them, their stream-wide labels, and a loss *scope* that says which logits the
sample's cross-entropy runs over:

* ``"task"``: its own task's head only (the protocol's loss: what every current-task sample gets);
* ``"seen"``: the concatenated heads of every task seen so far (every seen class competes);
* ``"none"``: no cross-entropy; the sample is only forwarded, and the method scores it itself in ``loss_terms``
  through the ``replayed`` argument (DER's logit matching).

Where they come from (``clbench.methods.hookspecs``): ``training_set`` replaces a task's training set (joint training,
GDumb), ``replay_batch`` adds samples to every step (ER, DER), ``replay_buffer`` reports what the method keeps
(``cost/buffer_images``). ``TaskContext.task_samples(j)`` gives the raw training samples of a seen task j.

A *stream index* names training samples without copying them: a ``torch.long`` tensor of shape ``N x 2``
whose rows are ``(task, row)``, ``row`` the sample's position in task ``task``'s training set as
``ctx.task_samples(task)`` returns it (the stream's stored order, fixed by the suite's seed). The stream is
deterministic, so an index is enough to get the same uint8 images back (:func:`gather`; a method calls
``ctx.stream_samples(index)``): a method keeps and checkpoints indices (ER's buffer: 16 bytes a sample instead of
the image) and decodes them when it needs pixels. A :class:`Samples` may carry its own (``index``):
``ctx.task_samples(j)`` and :func:`gather` set it, ``take`` and ``with_scope`` keep it.

Which stored rows a step trains on: the step hooks (``replay_batch``, ``loss_terms``, ``before_optimizer_step``,
``after_optimizer_step``) receive ``rows``, the stream index of the step's training rows (a CPU tensor), so
``ctx.stream_samples(rows)`` gives back their raw uint8 images and labels, before augmentation. With a replaced
training set, its samples' ``index`` provides the rows (``(-1, -1)`` where a part carries none). This is how a
method inserts the step's samples into its buffer during training (DER, DER++).

Scope names and codes: ``SCOPES = ("task", "seen", "none")``; in :class:`Replayed` (tensors on the device) a
row's scope is its position in ``SCOPES`` (``SCOPE_TASK`` 0, ``SCOPE_SEEN`` 1, ``SCOPE_NONE`` 2).

The loop keeps its own single-head path untouched when no method rehearses; :class:`Step` holds a step's rows
and runs the forward pass and the loss when rehearsal added some.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from clbench.data.batching import Draw
from clbench.data.imagecache import IndexedImages
from clbench.errors import ClbenchError

Scope = Literal["task", "seen", "none"]
SCOPES: tuple[str, ...] = get_args(Scope)
_CODE = {s: i for i, s in enumerate(SCOPES)}
SCOPE_TASK, SCOPE_SEEN, SCOPE_NONE = (_CODE[s] for s in SCOPES)  # the codes in Replayed.scope


@dataclass(frozen=True)
class Samples:
    """Labelled training samples a method gives the loop.

    ``x``: uint8 images ``N x C x H x W`` as the stream stores them (a tensor, or the stream's lazy
    ``IndexedImages`` view); the loop moves them to the device, applies the stream's training augmentation and
    preprocesses them, exactly as it does the task's own batches. ``y``: long labels in the stream's class order,
    i.e. the sample's logit in the concatenated heads (task j owns ``ctx.seen_classes`` range of its head).
    ``scope``: see the module docstring. ``index``: optional, the samples' stream index (``N x 2`` long rows of
    ``(task, row)``, module docstring), which ``ctx.task_samples`` sets and ``take`` / ``with_scope`` keep; the
    loop reports it as the step hooks' ``rows`` when these samples replace a task's training set.
    """

    x: torch.Tensor | IndexedImages
    y: torch.Tensor
    scope: Scope = "task"
    index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ClbenchError(f"Samples.scope: '{self.scope}' is not one of {list(SCOPES)}")
        if not isinstance(self.y, torch.Tensor) or self.y.ndim != 1 or self.y.dtype != torch.long:
            raise ClbenchError("Samples.y: must be a 1-d torch.long tensor of stream-wide labels")
        if self.x.dtype != torch.uint8 or len(self.x.shape) != 4 or len(self.x) != len(self.y):
            raise ClbenchError(f"Samples.x: must be uint8 N x C x H x W with N = len(y) = {len(self.y)}, got "
                               f"{tuple(self.x.shape)} {self.x.dtype}")
        if self.index is not None and (self.index.dtype != torch.long or tuple(self.index.shape) != (len(self.y), 2)):
            raise ClbenchError(f"Samples.index: must be a torch.long tensor of (task, row) pairs, shape "
                               f"({len(self.y)}, 2), or None; got {tuple(self.index.shape)} {self.index.dtype}")

    def __len__(self) -> int:
        return len(self.y)

    def with_scope(self, scope: Scope) -> Samples:
        return replace(self, scope=scope)

    def take(self, index: torch.Tensor) -> Samples:
        """The rows ``index`` (a long tensor), materialised as a tensor (with their stream index, if any)."""
        return Samples(self.x[index], self.y[index], self.scope, None if self.index is None else self.index[index])


def stream_rows(task: int, n: int) -> torch.Tensor:
    """The stream index of task ``task``'s whole training set of ``n`` rows: ``(task, 0) ... (task, n - 1)``."""
    return torch.stack([torch.full((n,), task, dtype=torch.long), torch.arange(n)], 1)


def stream_index(parts: Sequence[Samples]) -> torch.Tensor:
    """The stream index of :func:`concat`'s rows: each part's ``index``, or ``(-1, -1)`` rows for a part without."""
    return torch.cat([p.index if p.index is not None else torch.full((len(p), 2), -1, dtype=torch.long)
                      for p in parts])


def gather(samples_of: Callable[[int], Samples], index: torch.Tensor) -> Samples:
    """The samples a stream index names (module docstring), in its row order, as one materialised
    :class:`Samples` (scope ``"task"``). ``samples_of`` is ``ctx.task_samples``: a task after the current one
    is refused there, so an index cannot peek ahead."""
    index = torch.as_tensor(index, dtype=torch.long)
    if index.ndim != 2 or index.shape[1] != 2:
        raise ClbenchError(f"stream index: must be a long tensor of (task, row) pairs, N x 2; got shape "
                           f"{tuple(index.shape)}")
    x: torch.Tensor | None = None
    y = torch.empty(len(index), dtype=torch.long)
    for task in index[:, 0].unique().tolist():
        where = (index[:, 0] == task).nonzero()[:, 0]
        part = samples_of(int(task)).take(index[where, 1])
        if x is None:
            x = torch.empty((len(index), *part.x.shape[1:]), dtype=torch.uint8)
        x[where], y[where] = part.x, part.y
    if x is None:
        raise ClbenchError("stream index: empty; keep None instead of an empty index")
    return Samples(x, y, index=index.clone())


@dataclass(frozen=True)
class Replayed:
    """The method-supplied rows of one step, after the forward pass (``step.replayed`` in ``loss_terms``).

    ``x`` preprocessed (augmented, normalised) on the device; ``y`` stream-wide labels (the column of the
    sample's class in ``logits``); ``scope`` one code per row (its position in ``SCOPES``: ``SCOPE_TASK`` 0,
    ``SCOPE_SEEN`` 1, ``SCOPE_NONE`` 2); ``logits`` the rows' logits over every seen class (the concatenated
    heads, ``len(ctx.seen_classes)`` columns), from the step's one forward pass, with their graph (a term built
    on them trains the model). Rows come in this order: when ``training_set`` replaced the task's data, first
    the step's batch of that set (``batch`` is then empty, and the step hooks' ``rows`` index these first
    ``len(rows)`` rows), then ``replay_batch``'s samples, in the order it returned them (a list: part by
    part). Under torchrun each rank holds its share of the rows."""

    x: torch.Tensor
    y: torch.Tensor
    scope: torch.Tensor
    logits: torch.Tensor


def concat(parts: Sequence[Samples]) -> tuple[torch.Tensor | IndexedImages, torch.Tensor]:
    """One image array and a ``(label, scope code)`` table over ``parts``; views of one memory-mapped cache
    stay one lazy view (joint training over a large stream never loads it whole)."""
    if not parts:
        raise ClbenchError("training_set: returned no samples; return None to train on the task's own data")
    xs = [p.x for p in parts]
    if all(isinstance(x, IndexedImages) for x in xs) and len({id(x.base) for x in xs}) == 1:
        x = IndexedImages(xs[0].base, np.concatenate([v.index for v in xs]))
    else:
        x = torch.cat([v if isinstance(v, torch.Tensor) else v[torch.arange(len(v))] for v in xs])
    table = torch.cat([torch.stack([p.y, torch.full_like(p.y, _CODE[p.scope])], 1) for p in parts])
    return x, table


def prepare(parts: Sequence[Samples], n_seen: int, model, device: torch.device,
            draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
    """``replay_batch``'s samples as the loop's batches are: on the device, augmented (``draw.augment`` with
    ``draw.generator``), preprocessed; under torchrun each rank takes its share of the rows (``draw.shard``).
    Returns (x, (label, scope code) table)."""
    x, table = concat(parts)
    check_labels(table[:, 0], n_seen, "replay_batch")  # on the host: no device synchronisation
    sel = torch.arange(len(table))
    if draw.shard is not None:
        sel = sel[draw.shard[0]::draw.shard[1]]
    xb = x[sel].to(device, non_blocking=True)
    with torch.no_grad():
        if draw.augment is not None:
            xb = draw.augment(xb, model.image_size, draw.generator)
        xb = model.preprocess(xb)
    return xb, table[sel].to(device, non_blocking=True)


@dataclass
class Step:
    """One training step's rows: the task's own batch (labels within the task) and the rows rehearsal added
    (images preprocessed on the device, a ``(label, scope code)`` table)."""

    own: tuple[torch.Tensor, torch.Tensor]
    extra: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, xb: torch.Tensor, yb: torch.Tensor, replaced: bool) -> Step:
        """The loader's batch: the task's own rows, or, from a replaced training set, added rows only."""
        return cls((xb[:0], yb[:0, 0]), (xb, yb)) if replaced else cls((xb, yb))

    def add(self, parts: Sequence[Samples], n_seen: int, model, device: torch.device, draw: Draw) -> None:
        """Append ``replay_batch``'s samples (see :func:`prepare`)."""
        if not parts:
            return
        x, table = prepare(parts, n_seen, model, device, draw)
        self.extra = (x, table) if self.extra is None else (torch.cat([self.extra[0], x]),
                                                              torch.cat([self.extra[1], table]))

    def __len__(self) -> int:
        return len(self.own[1]) + (0 if self.extra is None else len(self.extra[1]))

    def forward(self, model, ctx, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Replayed | None]:
        """With added rows: (the current head's logits on the own rows, the mean cross-entropy over every scored
        row, the added rows for ``loss_terms``). One forward pass over all rows and every seen head; the own rows
        are scored on the current head (the protocol), the added ones per their scope. ``offsets`` (on the
        device) is the cumulative class count per task."""
        assert self.extra is not None, "the loop runs the protocol's step itself when nothing was added"
        lo, n_seen = ctx.class_offset, len(ctx.seen_classes)
        x, table, n_own = self.extra[0], self.extra[1], len(self.own[1])
        with ctx.autocast():
            logits = model(torch.cat([self.own[0], x]) if n_own else x)[:, :n_seen]
        y = torch.cat([self.own[1] + lo, table[:, 0]])
        scope = torch.cat([torch.full_like(self.own[1], _CODE["task"]), table[:, 1]])
        loss = scoped_loss(logits, y, scope, offsets)
        return logits[:n_own, lo:n_seen], loss, Replayed(x, table[:, 0], table[:, 1], logits[n_own:])


def scoped_loss(logits: torch.Tensor, y: torch.Tensor, scope: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows whose scope has one: ``"task"`` rows over their own task's logits,
    ``"seen"`` rows over all of ``logits`` (every seen class). ``offsets`` is the cumulative class count per task
    (task j's logits are ``offsets[j]:offsets[j+1]``), on the logits' device."""
    logits = logits.float()
    scored = scope != _CODE["none"]
    if not bool(scored.any()):
        return logits.sum() * 0.0
    logits, y, scope = logits[scored], y[scored], scope[scored]
    task = torch.bucketize(y, offsets[1:], right=True)  # the task that owns each label
    cols = torch.arange(logits.shape[1], device=logits.device)
    own = (cols >= offsets[task, None]) & (cols < offsets[task + 1, None])
    allowed = own | (scope == _CODE["seen"])[:, None]
    return F.cross_entropy(logits.masked_fill(~allowed, float("-inf")), y)


def check_labels(y: torch.Tensor, n_seen: int, hook: str) -> None:
    """Rehearsal rows may only carry labels of seen classes (no peeking at later tasks); ``y`` on the host."""
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_seen):
        raise ClbenchError(f"{hook}: a sample's label {int(y.max())} is outside the seen classes 0..{n_seen - 1}; "
                           "rehearsal may only use samples of tasks seen so far")


def as_list(result: Any, hook: str) -> list[Samples]:
    """A hook's Samples, a list of them, or None, as a flat list (pluggy collects one result per plugin)."""
    out: list[Samples] = []
    for item in result if isinstance(result, (list, tuple)) else [result]:
        if item is None:
            continue
        if isinstance(item, (list, tuple)):
            out += as_list(item, hook)
        elif isinstance(item, Samples):
            out.append(item)
        else:
            raise ClbenchError(f"{hook}: must return clbench.methods.rehearsal.Samples (or a list of them), got "
                               f"{type(item).__name__}")
    return out
