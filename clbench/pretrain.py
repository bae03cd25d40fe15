"""The cached pretraining step of the tiny CPU backbones used by the offline quickstart.

The tiny ViTs are pretrained once, supervised, on scikit-learn's 1,797 8x8 handwritten digits (UCI optdigits,
collected from other writers than MNIST), so the backbone never sees the quickstart stream's MNIST test
images. The weights are cached under ``<cache>/weights`` and reused; the step is deterministic (seed 0).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from clbench.paths import cache_dir

PRETRAIN_EPOCHS = 40

# Tiny ViTs for CPU suites and tests: real timm VisionTransformer instances, small enough for 2 cores.
TINY = {
    "vit_tiny_clbench": dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
    "vit_micro_clbench": dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
}


def tiny_checkpoint(name: str, image_size: int, in_chans: int, progress=print) -> Path:
    """Path of the cached pretrained weights, pretraining on digits first if they are not cached."""
    path = cache_dir() / "weights" / f"{name}-digits-{image_size}px-{in_chans}ch-e{PRETRAIN_EPOCHS}.pt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    progress(f"pretraining {name} on scikit-learn digits once (cached at {path.parent})")
    state = pretrain_on_digits(name, image_size, in_chans)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def pretrain_on_digits(name: str, image_size: int, in_chans: int, epochs: int = PRETRAIN_EPOCHS) -> dict:
    from timm.models.vision_transformer import VisionTransformer

    from clbench.streams import _digits

    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = VisionTransformer(img_size=image_size, in_chans=in_chans, num_classes=10, global_pool="token",
                                  **TINY[name])
        x, y = _digits()
        x = x.float() / 255.0
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        x = ((x - 0.5) / 0.5).expand(-1, in_chans, -1, -1).contiguous()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(y) + 63) // 64))
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=g).split(64):
                xb = x[idx]
                shift = torch.randint(-1, 2, (2,), generator=g)  # small translations: a little augmentation
                xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
