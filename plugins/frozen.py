"""Frozen backbone (``frozen``): the pre-trained ViT untouched, only each task's linear head trains.

The linear-probe reference of parameter-efficient continual learning (the "frozen" / "linear probing" rows,
e.g. Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need" (SimpleCIL), IJCV 2024, arXiv 2303.07338, github.com/zhoudw-zdw/RevisitingCIL, whose
SimpleCIL keeps the backbone frozen; here the heads are trained by the protocol's cross-entropy rather than set to
class prototypes). With one head per task and the loop freezing finished heads, a task's logits never change
after its task: its task-incremental accuracy is exactly what it was when learnt (zero TIL forgetting); only
the class-incremental competition with later heads can cost accuracy.

Deviations: heads are trained linear layers (the protocol), not prototype classifiers. No task update is
reported (nothing in the backbone changes), so its spectra columns stay empty.
"""

from __future__ import annotations

from clbench import Method, hookimpl


class Frozen(Method):
    name = "frozen"
    aliases = ("linear_probe",)
    paper = ("linear-probe reference; cf. Zhou et al., Revisiting Class-Incremental Learning with Pre-Trained "
             "Models (SimpleCIL), IJCV 2024")
    code = "github.com/zhoudw-zdw/RevisitingCIL"
    backbones = ("image",)
    backbones_note = ("it trains only each task's linear head, and a language model's head (its label words) has no "
                      "parameters: nothing would train")

    @hookimpl
    def configure_model(self, model, ctx):
        model.backbone.requires_grad_(False)

    @hookimpl
    def param_groups(self, model, ctx):
        return []  # the loop adds the current head: the only thing that trains


def register_methods(register):
    register(Frozen)
