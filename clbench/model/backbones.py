"""timm ViT backbones, pretrained-weight resolution, per-task linear heads and on-device preprocessing."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clbench.errors import ClbenchError
from clbench.model.pretrain import TINY, tiny_checkpoint
from clbench.weights import hub_id_of, hub_weights_file


class CLModel(nn.Module):
    """A backbone returning pooled features plus one linear head per task.

    ``forward(x)`` returns the concatenated logits of every head (class-incremental prediction);
    ``forward(x, head=t)`` returns task t's logits only (training loss, task-incremental prediction).
    ``preprocess`` turns a raw batch (uint8 or float in [0, 1], N x C x H x W) into the backbone's input on
    the batch's device: resize, channel repeat, normalisation.

    The loop's two seams with a language model (``clbench.model.lm.LanguageModel``, ``generative``): a task's
    head is added by ``add_task_head(task)`` and evaluation asks ``predict``; here both are the image path.
    """

    generative = False  # True: the model computes its own training loss (train_loss), as a language model

    def __init__(self, backbone: nn.Module, image_size: int, in_chans: int, mean, std) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList()
        self.image_size, self.in_chans = image_size, in_chans
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.backbone.num_features

    def add_head(self, num_classes: int) -> nn.Linear:
        head = nn.Linear(self.feature_dim, num_classes).to(self.mean.device)
        self.heads.append(head)
        return head

    def add_task_head(self, task) -> nn.Module:
        """The head of a stream's task (``clbench.data.streams.TaskData``): a linear map to its classes."""
        return self.add_head(len(task.classes))

    def predict(self, x: torch.Tensor, n_seen: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Class-incremental (argmax over the ``n_seen`` seen classes) and task-incremental (argmax within the
        task's classes ``lo:hi``) predictions of a preprocessed batch, as global class ids."""
        logits = self(x)[:, :n_seen]
        return logits.argmax(1), logits[:, lo:hi].argmax(1) + lo

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        # decided by dtype, never by value: a value test would synchronise the device every batch
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if x.shape[1] != self.in_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1:
                x = x.mean(1, keepdim=True)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pooled features of a preprocessed batch. Methods change the forward by overriding this in a
        subclass (``configure_model`` returns it); an override may return ``(features, aux)``, where ``aux``
        (name -> tensor) reaches the ``loss_terms`` hook. The features of an image must not depend on the rest
        of its batch (the contract checks it)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor, head: int | None = None, with_aux: bool = False):
        """Logits of every head (or of ``head``); with ``with_aux``, ``(logits, aux)``."""
        out = self.features(x)
        f, aux = out if isinstance(out, tuple) else (out, {})
        logits = self.heads[head](f) if head is not None else torch.cat([h(f) for h in self.heads], -1)
        return (logits, aux) if with_aux else logits


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _pretrained_available(name: str) -> None:
    """Fail fast, with one clear line, when pretrained weights can neither be found in the cache nor fetched."""
    hub_id = hub_id_of(name)
    if not hub_id:
        return  # weights hosted elsewhere: let timm report
    if hub_weights_file(hub_id):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if offline or not _hub_reachable():
        raise ClbenchError(
            f"backbone.name: pretrained weights for '{name}' (hub repo {hub_id}) are not in the Hugging Face cache "
            "and the hub cannot be reached; run once on a connected machine or set backbone.checkpoint to a local "
            "weights file")


def fetch_hub_weights(name: str, pretrained: bool, checkpoint: str | None) -> bool:
    """Download a timm model's hub weights into the Hugging Face cache when a run will load them and they are not
    there yet, so that the suite hash can cover their sha256 (clbench.weights) before any run is recorded.
    True when it downloaded (a hash taken before covers ``hub:<repo>, not downloaded``: take it again)."""
    if not pretrained or checkpoint or name in TINY:
        return False
    if name.startswith("hf:"):  # a language model (clbench.model.lm)
        return fetch_language_weights(name[3:])
    hub_id = hub_id_of(name)
    if not hub_id or hub_weights_file(hub_id):
        return False
    import timm

    _pretrained_available(name)
    timm.create_model(name, pretrained=True, num_classes=0)  # timm picks and downloads the file it loads
    return True


def fetch_language_weights(hub_id: str) -> bool:
    """Download a hub language model (its config, tokenizer and weights: safetensors when the repo has them) into
    the Hugging Face cache unless a local folder or the cache has it already; True when it downloaded."""
    from clbench.weights import language_weights_files

    if Path(hub_id).is_dir() or language_weights_files(hub_id):
        return False
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if offline or not _hub_reachable():
        raise ClbenchError(f"backbone.name: the language model '{hub_id}' is not in the Hugging Face cache and the "
                           "hub cannot be reached; run once on a connected machine (it downloads into the cache) "
                           "or name a local folder: hf:/path/to/model")
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(hub_id)
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
    snapshot_download(hub_id, allow_patterns=["*.json", "*.model", "*.txt", *weights])
    return True


@dataclass(frozen=True)
class Arch:
    """How the backbone is built beyond its name and weights: ``in_chans`` (default: the model's), the
    ``drop_path_rate``, and ``normalize``: "timm" = the model's pretrained mean/std; "none" = inputs stay in
    [0, 1] (mean 0, std 1), as InfLoRA's official pipeline feeds its ViT (``Normalize(0, 1)``)."""

    in_chans: int | None = None
    drop_path_rate: float = 0.0
    normalize: str = "timm"


def model_from(bb) -> CLModel:
    """The image model a suite's ``backbone`` section (``clbench.suite.BackboneConfig``) describes (any backbone,
    language ones included: ``clbench.model.lm.model_for``)."""
    arch = Arch(in_chans=bb.in_chans, drop_path_rate=bb.drop_path_rate, normalize=bb.normalize)
    return build_model(bb.name, bb.image_size, bb.pretrained, bb.checkpoint, arch)


def build_model(name: str, image_size: int, pretrained: bool = False, checkpoint: str | Path | None = None,
                arch: Arch | None = None) -> CLModel:
    """Create the backbone (timm) with pooled-feature output and wrap it in a :class:`CLModel`, built as
    ``arch`` (:class:`Arch`; default: the model's channels, no drop path, timm normalisation) says."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    spec = arch or Arch()
    in_chans, drop_path_rate, normalize = spec.in_chans, spec.drop_path_rate, spec.normalize
    if name in TINY:
        chans = in_chans or 1
        backbone = VisionTransformer(img_size=image_size, in_chans=chans, num_classes=0, class_token=True,
                                     global_pool="token", drop_path_rate=drop_path_rate, **TINY[name])
        mean, std = [0.5] * chans, [0.5] * chans
        if pretrained and checkpoint is None:
            checkpoint = tiny_checkpoint(name, image_size, chans)
    else:
        if name not in timm.list_models(pretrained=False) and name.split(".")[0] not in timm.list_models():
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ClbenchError(f"backbone.name: unknown timm model '{name}'; close matches: {close}")
        use_hub = pretrained and checkpoint is None
        if use_hub:
            _pretrained_available(name)
        kwargs = dict(num_classes=0, drop_path_rate=drop_path_rate)
        if in_chans:
            kwargs["in_chans"] = in_chans
        try:
            backbone = timm.create_model(name, pretrained=use_hub, img_size=image_size, **kwargs)
        except TypeError:
            backbone = timm.create_model(name, pretrained=use_hub, **kwargs)
        cfg = backbone.pretrained_cfg or {}
        chans = backbone.patch_embed.proj.in_channels if hasattr(backbone, "patch_embed") else 3
        mean, std = list(cfg.get("mean", [0.5] * chans)), list(cfg.get("std", [0.5] * chans))
    if checkpoint is not None:
        load_backbone_weights(backbone, checkpoint)
    if normalize == "none":
        mean, std = [0.0] * chans, [1.0] * chans
    return CLModel(backbone, image_size, chans, mean, std)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a state dict saved with ``torch.save`` (or a .safetensors file) with safe loading only."""
    path = Path(path)
    if not path.is_file():
        raise ClbenchError(f"backbone.checkpoint: file not found: {path}; give an existing weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ClbenchError(f"backbone.checkpoint: cannot read {path} as weights ({type(exc).__name__}); "
                           "give a torch state dict or a .safetensors file") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ClbenchError(f"backbone.checkpoint: {path} does not hold a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.startswith("head")]:
        raise ClbenchError(f"backbone.checkpoint: {path} does not match the backbone "
                           f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
