"""Joint (cumulative) training (``joint``): the upper bound of the stream's protocol.

At task t the model trains on the union of the training sets of tasks 0..t (Avalanche's ``Cumulative``
strategy; the "joint training" / "upper bound" row of continual-learning tables), continuing from the weights
after task t-1, for the suite's epochs over that union. Every seen class competes: each sample's
cross-entropy runs over the concatenated heads of all seen tasks (scope ``"seen"``), and all seen heads train,
which is what makes it the upper bound of class-incremental accuracy (the other methods keep the protocol's
current-head cross-entropy). The trained part is the ``trainable`` param: LoRA adapters as the ``lora``
baseline's (``lora``, default: the bound of this benchmark's own question, what continual low-rank adaptation
could reach with all data at once, and stable at the adapter methods' learning rate) or every backbone parameter
(``full``: the classic joint fine-tuning bound).

Reference: Lomonaco et al., "Avalanche: an End-to-End Library for Continual Learning", CLVision 2021,
arXiv 2104.00405, github.com/ContinualAI/avalanche (``avalanche.training.Cumulative``).

Its "buffer" is all data seen so far; ``cost/buffer_images`` reports that (every training image of tasks
0..t). Nothing is stored in the method: the union is re-read from the stream (``ctx.task_samples``), so a
resumed run needs no method state.

Deviations: none in the algorithm. The union is trained for the suite's epochs, so task t costs t+1 tasks'
steps (as Cumulative).
"""

from __future__ import annotations

from typing import Literal

from clbench_plugins._trained_part import PartParams, TrainedPart, seen_heads
from pydantic import Field

from clbench import Method, hookimpl


class JointParams(PartParams):
    trainable: Literal["lora", "full"] = Field("lora", description="what trains: LoRA adapters (lora, with "
                                               "rank/alpha/targets/blocks) or every backbone parameter (full)")


class Joint(TrainedPart, Method):
    name = "joint"
    aliases = ("cumulative",)
    paper = "joint (cumulative) training upper bound; Lomonaco et al., Avalanche, CLVision 2021"
    code = "github.com/ContinualAI/avalanche (avalanche.training.Cumulative)"
    Params = JointParams
    backbones = ("image",)
    backbones_note = ("it trains on the union of the seen tasks' image samples (training_set), and the loop "
                      "defines no rehearsal for a language model")

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.trains_backbone = self.params.trainable == "full"  # per instance: it depends on the params

    @hookimpl
    def configure_model(self, model, ctx):
        self.configure_part(model, self.params.trainable)

    @hookimpl
    def training_set(self, ctx):
        return [ctx.task_samples(j).with_scope("seen") for j in range(ctx.task + 1)]

    @hookimpl
    def param_groups(self, model, ctx):
        heads = seen_heads(model, ctx.task)
        return [{"params": self.part_parameters(model), "name": self.params.trainable},
                *([{"params": heads, "name": "seen_heads"}] if heads else [])]

    @hookimpl
    def replay_buffer(self, ctx):
        return [ctx.task_samples(j) for j in range(ctx.task + 1)]


def register_methods(register):
    register(Joint)
