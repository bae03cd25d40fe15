"""derpp: Dark Experience Replay++ on LoRA adapters, a reference rehearsal plugin built on clbench's step-hook data.

DER++ keeps a reservoir buffer of training samples *together with the logits the network gave them when they
entered the buffer*. Every step it adds two draws from the buffer to the batch: on the first it matches the current
logits to the stored ones (``der_alpha`` x mean squared error, the "dark knowledge" of the past network), on the
second it takes the cross-entropy of the stored labels (``der_beta`` x CE). Samples enter the buffer *during
training*, step by step, with the logits of the step's forward pass, by reservoir sampling (Vitter's algorithm R:
the n-th sample presented enters with probability capacity / n, into a uniformly chosen slot).

Paper: Buzzega, Boschini, Porrello, Abati and Calderara, "Dark Experience for General Continual Learning: a
Strong, Simple Baseline", NeurIPS 2020, arXiv 2004.07211. Official code: github.com/aimagelab/mammoth
(``models/derpp.py``, ``utils/buffer.py``); default weights from its ``models/config/derpp.yaml`` (seq-cifar100,
buffer 500: alpha 0.3, beta 0.5).

How it uses clbench's contract (the point of this example; see CONTRIBUTING, "Rehearsal"):

* the step hooks' ``rows`` is the stream index ``(task, row)`` of the step's training samples: the buffer stores
  those pairs, never the images (``ctx.stream_samples(index)`` decodes them when they are replayed), and
  the logits of that step (``loss_terms``), inserting after the optimizer step (``after_optimizer_step``) as
  Mammoth does;
* ``replay_batch`` returns a list of two ``Samples`` with scope ``"none"``: the loop forwards them with the batch
  but scores neither, and ``loss_terms`` computes both DER++ terms from ``replayed``;
* from the second task on, ``training_set`` hands the loop the task's own samples with scope ``"seen"`` (as ``er``
  does), so the batch's cross-entropy runs over every seen class, as Mammoth's class-incremental loss does; the
  batch's rows are then the first ``len(rows)`` rows of ``replayed``, with their logits over every seen class.

Deviations from the official code:

1. The trained part is one LoRA branch per adapted site (as clbench's ``lora``) plus every seen head, not the
   whole network: the benchmark compares adapter methods on a frozen pre-trained backbone.
2. Heads are per task (the protocol), so a sample's stored logits cover the classes seen when it entered; the
   logit matching compares those columns only (the mean squared error over the stored entries). Mammoth's network
   has every class's output from the start, and its MSE runs over all of them.
3. On the first task the batch's cross-entropy is the protocol's (its own head, which is every seen class then).
4. Random draws come from torch generators seeded per task from the run's seed (Mammoth: numpy's global RNG), so a
   resumed run repeats them; the buffer's state is the stream index, the stored logits and the count of samples
   presented (the images are the stream's).
5. Single process: under torchrun every rank would insert its own share of the batch into its own buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clbench import SCOPE_NONE, LoRAParams, LoRASite, Method, Samples, TaskContext, hookimpl, inject


class DERppParams(LoRAParams):
    # rank, alpha (LoRA's scale), targets, blocks and dropout come from clbench's LoRAParams
    buffer_size: int = Field(500, ge=1, description="buffer capacity in samples (Mammoth's --buffer_size)")
    der_alpha: float = Field(0.3, ge=0, description="DER++'s alpha: weight of the logit-matching MSE on the first draw")
    der_beta: float = Field(0.5, ge=0, description="DER++'s beta: weight of the cross-entropy on the second draw")
    minibatch_size: int | None = Field(None, ge=1, description="samples per buffer draw (Mammoth's --minibatch_size); "
                                                               "default: the suite's batch size")


def reservoir_slots(seen: int, n: int, capacity: int, generator: torch.Generator) -> list[int]:
    """Algorithm R for ``n`` samples presented after ``seen``: each one's buffer slot, or -1 when it does not enter
    (Mammoth's ``reservoir``). The k-th sample overall (0-based) fills slot k while the buffer is not full; after
    that it enters with probability capacity / (k + 1), into a uniformly chosen slot. Later samples of the same
    call overwrite earlier ones, in order."""
    draws = torch.rand(n, generator=generator, dtype=torch.float64)
    slots = []
    for i in range(n):
        k = seen + i
        if k < capacity:
            slots.append(k)
        else:
            r = int(draws[i] * (k + 1))  # uniform on 0..k
            slots.append(r if r < capacity else -1)
    return slots


class DERpp(Method):
    name = "derpp"
    paper = ("Buzzega et al., Dark Experience for General Continual Learning: a Strong, Simple Baseline, "
             "NeurIPS 2020, arXiv 2004.07211")
    code = "github.com/aimagelab/mammoth (models/derpp.py, utils/buffer.py)"
    Params = DERppParams
    backbones = ("image",)  # clbench refuses it on a language model before any run, with this reason
    backbones_note = ("its buffer replays stored images and their logits; clbench defines no rehearsal for a "
                      "language model")

    def __init__(self, params: DERppParams | dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.sites: dict[str, LoRASite] = {}
        self.index = torch.zeros(0, 2, dtype=torch.long)  # the buffer: (task, row) per slot
        self.logits = torch.zeros(0, 0)  # the slots' logits at insertion, zero-padded to the widest
        self.width = torch.zeros(0, dtype=torch.long)  # how many classes each slot's logits cover
        self.seen = 0  # samples presented to the reservoir so far
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (rows, logits)
        self._draws: list[torch.Tensor] = []  # this step's buffer slots: [mse draw, ce draw]

    # -- the model and what trains ----------------------------------------------------------------------------

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: TaskContext) -> None:
        p = self.params
        self.sites = inject(model.backbone, p.targets, p.blocks)
        for site in self.sites.values():
            site.add_branch(p.rank, scale=p.scale, dropout=p.dropout)

    @hookimpl
    def training_set(self, ctx: TaskContext) -> list[Samples] | None:
        # from the second task on: the task's own samples, scored over every seen head (Mammoth's class-IL loss)
        return [ctx.task_samples().with_scope("seen")] if ctx.task else None

    @hookimpl
    def before_task(self, model: nn.Module, ctx: TaskContext) -> None:
        self._insert_gen = torch.Generator().manual_seed(ctx.seed * 7_919 + ctx.task)  # per task: resumes exactly
        self._draw_gen = torch.Generator().manual_seed(ctx.seed * 104_729 + ctx.task)

    @hookimpl
    def param_groups(self, model: nn.Module, ctx: TaskContext) -> list[dict[str, Any]]:
        earlier = [q for h in list(model.heads)[:ctx.task] for q in h.parameters()]
        for q in earlier:  # every seen head scores the batch and the buffer draws, so every seen head trains
            q.requires_grad_(True)
        adapters = [q for s in self.sites.values() for q in s.branches[0].parameters()]
        return [{"params": adapters, "name": "lora"}, *([{"params": earlier, "name": "seen_heads"}] if earlier else [])]

    # -- every step -------------------------------------------------------------------------------------------

    @hookimpl
    def replay_batch(self, ctx: TaskContext) -> list[Samples] | None:
        n = len(self.index)
        if n == 0:
            self._draws = []
            return None
        m = min(n, self.params.minibatch_size or ctx.batch_size)
        # two independent draws without replacement, as Mammoth's two get_data calls
        self._draws = [torch.randperm(n, generator=self._draw_gen)[:m] for _ in range(2)]
        return [ctx.stream_samples(self.index[d]).with_scope("none") for d in self._draws]

    @hookimpl
    def loss_terms(self, batch: tuple[torch.Tensor, torch.Tensor], logits: torch.Tensor, ctx: TaskContext,
                   replayed, rows: torch.Tensor) -> dict[str, torch.Tensor] | None:
        # the step's own samples: the batch (first task), or the replaced training set's rows at the front
        # of replayed; their logits over every seen class go into the buffer after the step
        own = len(batch[1])
        step_logits = logits if own else replayed.logits[:len(rows)]
        self._pending = (rows.clone(), step_logits.detach().float().cpu())
        if not self._draws:
            return None
        first = 0 if own else len(rows)
        m = len(self._draws[0])
        mse_rows, ce_rows = replayed.logits[first:first + m].float(), replayed.logits[first + m:first + 2 * m].float()
        assert (replayed.scope[first:] == SCOPE_NONE).all()  # the loop scored none of the draws
        return {"der_mse": self.params.der_alpha * self.matching_error(mse_rows, self._draws[0]),
                "der_ce": self.params.der_beta * F.cross_entropy(ce_rows, replayed.y[first + m:first + 2 * m])}

    def matching_error(self, current: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Mean squared error between ``current`` logits and those stored in ``slots`` at insertion, over the
        classes each slot's logits cover (deviation 2)."""
        stored = self.logits[slots].to(current.device)
        width = stored.shape[1]
        mask = (torch.arange(width)[None, :] < self.width[slots][:, None]).to(current.device)
        diff = (current[:, :width] - stored).pow(2) * mask
        return diff.sum() / mask.sum()

    @hookimpl
    def after_optimizer_step(self, rows: torch.Tensor) -> None:
        # Mammoth's add_data after opt.step(): the step's samples with the logits of its forward pass
        if self._pending is None:
            return
        pending_rows, step_logits = self._pending
        self._pending = None
        assert torch.equal(pending_rows, rows)  # the same rows in every step hook
        self.insert(rows, step_logits)

    def insert(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        """Present ``rows`` (stream index) with their ``logits`` to the reservoir."""
        capacity = self.params.buffer_size
        slots = reservoir_slots(self.seen, len(rows), capacity, self._insert_gen)
        self.seen += len(rows)
        if logits.shape[1] > self.logits.shape[1]:  # a new task's classes: widen the stored logits with zeros
            self.logits = F.pad(self.logits, (0, logits.shape[1] - self.logits.shape[1]))
        for i, slot in enumerate(slots):
            if slot < 0:
                continue
            if slot == len(self.index):  # filling: the next free slot
                self.index = torch.cat([self.index, rows[i:i + 1]])
                self.logits = torch.cat([self.logits, torch.zeros(1, self.logits.shape[1])])
                self.width = torch.cat([self.width, torch.zeros(1, dtype=torch.long)])
            self.index[slot] = rows[i]
            self.logits[slot] = 0.0
            self.logits[slot, :logits.shape[1]] = logits[i]
            self.width[slot] = logits.shape[1]

    # -- after the task: what the method keeps, for the cost figure and the checkpoint ---------------------------

    @hookimpl
    def replay_buffer(self, ctx: TaskContext) -> Samples | None:
        return ctx.stream_samples(self.index) if len(self.index) else None

    @hookimpl
    def method_state(self, ctx: TaskContext) -> dict[str, Any]:
        return {"index": self.index.clone(), "logits": self.logits.clone(), "width": self.width.clone(),
                "seen": self.seen}

    @hookimpl
    def load_method_state(self, model: nn.Module, state: dict[str, Any], ctx: TaskContext) -> None:
        self.index, self.logits = state["index"].clone(), state["logits"].clone()
        self.width, self.seen = state["width"].clone(), int(state["seen"])


def register_methods(register: Callable[[type], None]) -> None:
    register(DERpp)
