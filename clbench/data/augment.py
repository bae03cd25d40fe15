"""Training augmentation on the device: random resized crop + horizontal flip for a whole batch at once.

InfLoRA's training transforms for CIFAR-100, ImageNet-R and DomainNet are torchvision's
``RandomResizedCrop(224)`` (scale (0.08, 1), ratio (3/4, 4/3)) followed by ``RandomHorizontalFlip()``. Done per
image on the CPU they would cap the loader far below GPU speed, so here the crop boxes are sampled with
torchvision's rule (ten tries, then the centre-crop fallback) from a CPU generator (deterministic for a seed)
and applied to the uint8 batch on its device by one ``grid_sample`` call (bilinear, no antialiasing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_boxes(n: int, height: int, width: int, generator: torch.Generator | None,
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """``n x 4`` float boxes ``(top, left, h, w)`` in pixels, torchvision's RandomResizedCrop rule."""
    tries = 10
    area = height * width
    target = area * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)
    w = torch.sqrt(target * r).round()
    h = torch.sqrt(target / r).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    # fallback (no try fits): the largest central crop with the ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    bw = torch.where(first >= 0, w[rows, pick], torch.full((n,), float(fw)))
    bh = torch.where(first >= 0, h[rows, pick], torch.full((n,), float(fh)))
    u = torch.rand(n, 2, generator=generator)
    top = torch.where(first >= 0, torch.floor(u[:, 0] * (height - bh + 1)), ((height - bh) / 2).floor())
    left = torch.where(first >= 0, torch.floor(u[:, 1] * (width - bw + 1)), ((width - bw) / 2).floor())
    return torch.stack([top, left, bh, bw], 1)


def random_resized_crop_flip(x: torch.Tensor, size: int, generator: torch.Generator | None = None,
                             scale: tuple[float, float] = (0.08, 1.0), flip_p: float = 0.5) -> torch.Tensor:
    """``x``: ``N x C x H x W`` (uint8 or float in [0, 1]) on any device -> float in [0, 1], ``N x C x size x size``."""
    n, _, height, width = x.shape
    boxes = sample_boxes(n, height, width, generator, scale)
    flip = torch.rand(n, generator=generator) < flip_p
    top, left, bh, bw = boxes.unbind(1)
    # affine map from output coords in [-1, 1] to input coords in [-1, 1] (align_corners=False)
    sx, sy = bw / width, bh / height
    cx = (left + bw / 2) / width * 2 - 1
    cy = (top + bh / 2) / height * 2 - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -sx, sx)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    grid = F.affine_grid(theta.to(x.device), [n, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)


def resize_center_crop(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's ``Resize(size * 256 / 224, bicubic)`` + ``CenterCrop(size)`` on a square batch (PILOT's test
    transform, as CL-LoRA and SD-LoRA: the central 7/8 of a CIFAR image, upscaled): ``N x C x H x W`` (uint8 or
    float in [0, 1]) -> float in [0, 1], ``N x C x size x size``. ``generator`` is unused (the transform is fixed)."""
    big = int(size * 256 / 224)
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    xf = F.interpolate(xf, size=(big, big), mode="bicubic", align_corners=False, antialias=big < x.shape[-1])
    top = int(round((big - size) / 2.0))
    return xf[..., top:top + size, top:top + size].clamp_(0, 1)


AUGMENTS = {"rrc_flip": random_resized_crop_flip}
