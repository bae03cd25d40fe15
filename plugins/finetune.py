"""Sequential full fine-tuning (``finetune``): the classic lower bound of continual learning.

Every backbone parameter trains on each task in turn, with the protocol's loss (cross-entropy on the current
task's head), no adapter, no regulariser, no rehearsal; whatever the next task needs overwrites what the last one
learnt. It is the "Fine-tuning" / "Naive" row of continual-learning tables (e.g. Avalanche's ``Naive``
strategy; Mammoth's ``sgd`` model; the sequential fine-tuning lower bound of L2P, Wang et al., CVPR 2022,
arXiv 2112.08654, github.com/google-research/l2p).

Spectra: the task's update of each linear map of every block (q, k, v rows of the fused qkv, proj, fc1, fc2;
named as the adapters' sites) is the dense change ``W_t - W_(t-1)``, factored by an exact SVD and kept to its
top ``update_rank`` (64) directions, so its spectrum indices describe the change's 64 strongest directions
(``update_rank: null`` reports the whole change at its numerical rank, which on ViT-B costs minutes of CPU per
task in the spectra code).

Deviations: none in the algorithm. The training settings are the suite's, shared with every method (no
lower learning rate for the backbone), so the bound is measured under the same protocol as the rest.
"""

from __future__ import annotations

from clbench_plugins._trained_part import TrainedPart
from pydantic import BaseModel, ConfigDict, Field

from clbench import Method, hookimpl


class FinetuneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    update_rank: int | None = Field(64, ge=1, description="each map's dense task change is reported as its top-k "
                                    "SVD factors (null: the exact change, at numerical rank)")


class Finetune(TrainedPart, Method):
    name = "finetune"
    aliases = ("naive", "seqft")
    paper = ("sequential fine-tuning lower bound, e.g. Wang et al., Learning to Prompt for Continual Learning "
             "(L2P), CVPR 2022")
    code = "github.com/google-research/l2p; Avalanche Naive strategy"
    trains_backbone = True
    Params = FinetuneParams

    @hookimpl
    def configure_model(self, model, ctx):
        self.configure_part(model, "full")

    @hookimpl
    def param_groups(self, model, ctx):
        return [{"params": self.part_parameters(model), "name": "backbone"}]


def register_methods(register):
    register(Finetune)
