"""How the tiny CPU backbones' pretrained weights were made, and how to make them again.

The tiny ViTs are pretrained supervised on scikit-learn's 1,797 8x8 handwritten digits (UCI optdigits, collected
from other writers than MNIST), so the backbone never sees the quickstart stream's MNIST test images.
``vit_tiny_clbench`` at 16 px, one channel (the quickstart's backbone) ships with clbench: the file in
clbench/weights, its sha256 pinned in clbench/weights/SHA256SUMS and checked before every use (clbench.weights).
Runs never pretrain: the shipped file is the one set of weights every machine loads.

This module is the documented recipe of that file. ``python -m clbench.model.pretrain --write`` pretrains it again (seed 0,
one CPU thread, 40 epochs, a few CPU minutes) and rewrites the file and its pin; ``--check`` pretrains and compares
with the pin without writing. One thread makes the arithmetic's order fixed, so the same torch build on the same
CPU kind gives the same bytes; another torch version or CPU may give other bits, which is why the file is shipped
rather than pretrained on each machine. Other shapes: ``--name --image-size --in-chans --out FILE``, then set
``backbone.checkpoint`` to FILE (its sha256 enters the suite hash).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from clbench.weights import SHIPPED, shipped_weights, weights_dir

PRETRAIN_EPOCHS = 40

# Tiny ViTs for CPU suites and tests: real timm VisionTransformer instances, small enough for 2 cores.
TINY = {
    "vit_tiny_clbench": dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
    "vit_micro_clbench": dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
}


def tiny_checkpoint(name: str, image_size: int, in_chans: int) -> Path:
    """Path of the shipped pretrained weights, checked against their pinned sha256 (clbench.weights)."""
    return shipped_weights(name, image_size, in_chans)


def pretrain_on_digits(name: str, image_size: int, in_chans: int, epochs: int = PRETRAIN_EPOCHS) -> dict:
    """The backbone's state dict (head dropped) after supervised pretraining on scikit-learn's digits: seed 0, one
    CPU thread (restored afterwards), AdamW 2e-3 with weight decay 0.05, per-step cosine, batch 64, +-1 pixel
    random translations. The caller's random state is left untouched."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed order of float additions: the same bytes on every run of one build
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return _train(TINY[name], image_size, in_chans, epochs)
    finally:
        torch.set_num_threads(threads)


def _train(arch: dict, image_size: int, in_chans: int, epochs: int) -> dict:
    from timm.models.vision_transformer import VisionTransformer

    from clbench.data.sources.digits import digits_tensors

    g = torch.Generator().manual_seed(0)
    model = VisionTransformer(img_size=image_size, in_chans=in_chans, num_classes=10, global_pool="token", **arch)
    x, y = digits_tensors()
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
    return {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}


def save_weights(state: dict, path: Path) -> str:
    """Write ``state`` as .safetensors (a byte layout fixed by the tensors alone) and return the file's sha256."""
    from safetensors.torch import save_file

    save_file(state, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pin(fname: str, digest: str) -> None:
    sums = weights_dir() / "SHA256SUMS"
    lines = [ln for ln in sums.read_text().splitlines() if ln.strip() and ln.split()[-1] != fname] \
        if sums.is_file() else []
    sums.write_text("\n".join(sorted([*lines, f"{digest}  {fname}"])) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clbench.model.pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="vit_tiny_clbench", choices=sorted(TINY))
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=PRETRAIN_EPOCHS)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", action="store_true", help="rewrite the shipped file and its pin in SHA256SUMS")
    what.add_argument("--check", action="store_true", help="pretrain and compare with the pin; write nothing")
    what.add_argument("--out", type=Path, help="write the weights to this file (use it as backbone.checkpoint)")
    args = ap.parse_args(argv)
    fname = SHIPPED.get((args.name, args.image_size, args.in_chans))
    if (args.write or args.check) and (fname is None or args.epochs != PRETRAIN_EPOCHS):
        ap.error("--write/--check are for the shipped shape (vit_tiny_clbench, 16 px, 1 channel, 40 epochs); "
                 "use --out FILE for others")
    state = pretrain_on_digits(args.name, args.image_size, args.in_chans, args.epochs)
    if args.check:
        from clbench.weights import pinned_sums

        with tempfile.TemporaryDirectory(prefix="clbench-pretrain-") as tmp:
            digest = save_weights(state, Path(tmp) / fname)
        pinned = pinned_sums().get(fname)
        print(f"pretrained {fname}: sha256 {digest}; pinned {pinned}: {'same' if digest == pinned else 'DIFFERENT'}")
        return 0 if digest == pinned else 1
    path = args.out or weights_dir() / fname
    digest = save_weights(state, path)
    if args.write:
        _pin(fname, digest)
    print(f"wrote {path} (sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
