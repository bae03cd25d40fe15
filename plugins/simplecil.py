"""SimpleCIL (``simplecil``): class prototypes of the frozen pre-trained backbone as the classifier; no training.

Zhou, Cai, Ye, Zhan, Liu, "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need", IJCV 2024, arXiv 2303.07338. Official code: LAMDA-PILOT
(github.com/sun-hailong/LAMDA-PILOT, ``models/simplecil.py``: ``Learner.replace_fc``; the classifier is
``backbone/linears.py: CosineLinear`` with sigma 1, created by ``utils/inc_net.py: SimpleVitNet.update_fc``).

The algorithm: the backbone stays as pre-trained. For every new class c, its prototype is the mean of the
backbone's (pooled) features over the class's training images, read without augmentation (the official
``train_loader_for_protonet`` uses the test transform); the classifier scores an image by the cosine between its
feature and each prototype and predicts the argmax. Old classes' prototypes are never touched again, so nothing
can be forgotten through the classifier; what limits it is how well the pre-trained features separate the
classes. That makes it the reference a continual-adaptation method has to beat: with no continual training at
all, it shows what the pre-trained model gives for free (docs/METHODS.md section 10).

On the clbench contract: ``gradient_training = False`` (no optimizer, no step, ``train.epochs`` does not apply);
``after_task`` reads ``ctx.loader()`` and writes task t's head: weight = the L2-normalised prototypes, bias 0.

Deviations: (1) scores are ``<f, p_c / |p_c|>`` = ``|f| cos(f, p_c)``, the official cosine times the image's
feature norm: the same argmax (CIL and TIL) for every image, without replacing the model's forward; only the
logits' scale differs. (2) Feature sums are accumulated in float64 (the official mean is float32): the same
means up to float32 rounding. (3) Features are computed under the suite's precision (bf16 autocast on CUDA), as
clbench's evaluation computes them, so training and test features come from the same arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clbench import Method, hookimpl


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean of ``features`` (N x d) over ``labels`` (0..num_classes-1), in float64."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels, features.double())
    counts = torch.bincount(labels, minlength=num_classes).double().clamp_min(1)
    return sums / counts[:, None]


@torch.no_grad()
def extract(features, batches, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """``features(x)`` (float32, CPU; the first element when it returns ``(features, aux)``) and the labels of
    every batch of ``batches``, under ``autocast``."""
    feats, labels = [], []
    for x, y in batches:
        with autocast():
            out = features(x)
        f = out[0] if isinstance(out, tuple) else out
        feats.append(f.float().cpu())
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels).long()


class SimpleCIL(Method):
    name = "simplecil"
    aliases = ("prototypes",)
    paper = ("Zhou et al., Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and "
             "Adaptivity are All You Need, IJCV 2024 (arXiv 2303.07338)")
    code = "github.com/sun-hailong/LAMDA-PILOT (models/simplecil.py)"
    gradient_training = False
    low_rank_updates = False  # no weight of the backbone changes
    backbones = ("image",)
    backbones_note = ("it sets each class's linear-head row to the mean of its image features; a language model's "
                      "head holds label words, not rows")

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.prototypes = torch.zeros(0, 0)  # seen classes x d, raw class means (float32), in class order

    @hookimpl
    def configure_model(self, model, ctx):
        model.backbone.requires_grad_(False)

    @hookimpl
    def after_task(self, model, ctx):
        feats, labels = extract(model.features, ctx.loader(), ctx.autocast)  # unaugmented
        protos = class_means(feats, labels, ctx.num_classes).float()
        head = model.heads[ctx.task]
        with torch.no_grad():
            head.weight.copy_(F.normalize(protos, dim=1).to(head.weight))
            head.bias.zero_()
        self.prototypes = protos if ctx.task == 0 else torch.cat([self.prototypes, protos])

    @hookimpl
    def method_state(self, ctx):
        return {"prototypes": self.prototypes.clone()}

    @hookimpl
    def load_method_state(self, model, state, ctx):
        self.prototypes = state["prototypes"].clone()


def register_methods(register):
    register(SimpleCIL)
