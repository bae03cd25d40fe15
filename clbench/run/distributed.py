"""One run on several GPUs (or CPU processes): data parallelism under ``torchrun``.

``torchrun --nproc-per-node N -m clbench.cli run SUITE ...`` starts N copies of ``clbench run``. Every rank builds
the same model from the same seed and runs the same loop; only rank 0 talks to MLflow, writes checkpoints and
prints progress. Ranks above 0 *follow* rank 0: they receive its decisions (which runs are finished, whether a run's
lock was taken) and, at the start of every run, its loop state (so a run resumed from rank 0's checkpoint is
resumed identically on every rank).

Why not ``DistributedDataParallel``: methods add adapters and change which parameters train at every task, and
project or retract gradients in hooks; DDP would have to be rebuilt every task and averages per-rank means
(wrong for a last batch that does not split evenly). Instead the loop all-reduces the gradients of the optimizer's
parameters right after ``backward`` and before ``before_optimizer_step``: each rank contributes
``n_local * grad`` and the sum is divided by the global batch size, so every rank holds exactly the gradient of the
whole batch (as one process would compute it, up to the order of float additions), then every rank runs the same
hooks and optimizer step on the same values, so parameters stay identical without broadcasting them. The cost:
one flat all-reduce per step that does not overlap with backward; trainable parameters of low-rank methods are
small (a few MB), so it is cheap next to the forward and backward of the frozen backbone.

Sharding: each global batch of ``batch_size`` (from the same shuffled index list on every rank) is split across
ranks (rank r takes rows r, r + N, ...), so the global batch size, the number of steps and the learning-rate
schedule are those of a one-process run. Training augmentation draws from a per-rank generator seeded from the
shared one, so the shuffles stay identical across ranks. Evaluation is sharded the same way and the correct counts
are summed: the accuracy matrix is exact.

Method statistics (InfLoRA's input covariances, EBLoRA's gradients in ``before_task``, anything a method computes
through ``ctx.loader``) are computed on every rank over the full task data: identical on every rank, no
communication, but that phase is not sped up by more GPUs. After every task (after ``merge_task``) rank 0's
model parameters and buffers are broadcast to all ranks, which removes any drift from non-deterministic kernels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import torch

_STATE: dict[str, Any] = {}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    """True under torchrun with more than one process."""
    return world_size() > 1


def is_follower() -> bool:
    return active() and rank() > 0


def init() -> None:
    """Join the process group once (env:// rendezvous set up by torchrun); on CUDA, bind this rank's GPU."""
    import torch.distributed as dist

    if not active() or dist.is_initialized():
        return
    # Avalanche must be imported before this point (it refuses to create loggers on ranks > 0 once a process
    # group exists): clbench.run.runner.run_suite calls clbench.data.streams.load_avalanche() before any collective.
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=os.environ.get("CLBENCH_DIST_BACKEND", backend))




def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity in a single process)."""
    if not active():
        return obj
    import torch.distributed as dist

    init()
    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def announce(decision: Any) -> Any:
    """Rank 0 tells the followers a decision it took alone (finished runs, a run's lock); returns it."""
    return broadcast(decision)


def reduce_gradients(params: Sequence[torch.nn.Parameter], n_local: int,
                     loss: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
    """Replace each parameter's gradient by the gradient of the whole global batch; return the global batch
    size and the global mean loss. A parameter that got no gradient on any rank keeps ``grad = None`` (as in
    one process, so optimizers skip it)."""
    if not active():
        return n_local, loss
    import torch.distributed as dist

    device = next((p.device for p in params), torch.device("cpu"))
    parts, has = [], []
    for p in params:
        g = p.grad
        has.append(0.0 if g is None else 1.0)
        parts.append((torch.zeros_like(p) if g is None else g.detach() * n_local).reshape(-1).float())
    lsum = (loss.detach().float() * n_local).reshape(1) if loss is not None and n_local else torch.zeros(1)
    flat = torch.cat([*parts, torch.tensor([float(n_local), *has], device=device), lsum.to(device)])
    dist.all_reduce(flat)
    n_global = int(round(flat[-len(params) - 2].item()))
    offset = 0
    for i, p in enumerate(params):
        size = p.numel()
        if flat[-len(params) - 1 + i] > 0:
            g = (flat[offset:offset + size] / max(1, n_global)).view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        else:
            p.grad = None
        offset += size
    return n_global, (flat[-1] / max(1, n_global))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (counts of correct predictions)."""
    if active():
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def sync_model(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (once per task)."""
    if not active():
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


# --- the loop's view: a communicator object (clbench.run.loop reads as single-process code) -------------------------

class Communicator(Protocol):
    """What the training loop asks of its process group. ``shard`` is (rank, world size), or None in one process."""

    shard: tuple[int, int] | None

    def broadcast(self, obj: Any) -> Any: ...

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter], n_local: int,
                         loss: torch.Tensor | None) -> tuple[int, torch.Tensor | None]: ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def sync_model(self, model: torch.nn.Module) -> None: ...


class SingleProcess:
    """One process: every collective is the identity (the loop's default)."""

    shard: tuple[int, int] | None = None

    def broadcast(self, obj: Any) -> Any:
        return obj

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter], n_local: int,
                         loss: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
        return n_local, loss

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sync_model(self, model: torch.nn.Module) -> None:
        return None


class TorchrunGroup:
    """The torchrun process group (joined on creation): the module's collectives above."""

    def __init__(self) -> None:
        init()
        self.shard: tuple[int, int] | None = (rank(), world_size())

    def broadcast(self, obj: Any) -> Any:
        return broadcast(obj)

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter], n_local: int,
                         loss: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
        return reduce_gradients(params, n_local, loss)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t)

    def sync_model(self, model: torch.nn.Module) -> None:
        sync_model(model)


SINGLE_PROCESS = SingleProcess()


def communicator() -> Communicator:
    """This process's communicator: the torchrun group when there is one with more than one process."""
    return TorchrunGroup() if active() else SINGLE_PROCESS
