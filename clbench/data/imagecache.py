"""Decode-once image cache: image files -> fixed-size uint8 arrays in a memory-mapped file on disk.

Decoding and resizing JPEGs costs milliseconds per image on a CPU core, far too slow to feed a GPU that
trains ViT-B/16 at ~5,000 img/s. So every image of a split is decoded and resized once, in parallel, into one
``N x 3 x S x S`` uint8 file under ``<cache>/images/``; later runs map that file and serve batches by indexing
it (a memory copy). Augmentation happens on the device (``clbench.data.augment``).

A cache file is keyed by dataset, split, size, crop mode and the split file's checksum, written under a
temporary name and renamed when complete, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clbench.errors import ClbenchError

# "center": resize the shorter side to S, then take the central S x S square (InfLoRA's test transform is
# Resize(256) + CenterCrop(224), i.e. "center" at S=224 after a resize to 256: see ``decode_image``).
MODES = ("center", "resize_center")


def decode_image(path: str | Path, size: int, mode: str) -> np.ndarray:
    """One image file -> ``3 x size x size`` uint8.

    ``center``: shorter side resized to ``size``, central square kept (training cache; random resized crops
    are then taken on the device). ``resize_center``: shorter side resized to ``round(size * 256 / 224)``,
    central ``size`` square kept (the ImageNet evaluation transform, Resize(256) + CenterCrop(224) at 224).
    """
    from PIL import Image

    short = size if mode == "center" else int(round(size * 256 / 224))
    with Image.open(path) as img:
        img.draft("RGB", (short, short))  # JPEG: let libjpeg downscale by 2^k while decoding (>= requested)
        img = img.convert("RGB")
        w, h = img.size
        scale = short / min(w, h)
        nw, nh = max(short, int(round(w * scale))), max(short, int(round(h * scale)))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


class IndexedImages:
    """A lazily gathered subset of a (memory-mapped) ``N x C x H x W`` uint8 array.

    Behaves like the uint8 tensor the training loop expects: ``len(x)``, ``x[index_tensor]`` (a new tensor
    holding those rows), ``x.shape``, ``x.dtype``. Only the rows of a batch are ever read.
    """

    def __init__(self, base: np.ndarray, index: np.ndarray) -> None:
        self.base = base
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.base.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def __getitem__(self, sel) -> torch.Tensor:
        if isinstance(sel, torch.Tensor):
            sel = sel.numpy()
        rows = self.index[sel]
        if np.ndim(rows) == 0:
            return torch.from_numpy(np.array(self.base[int(rows)]))
        return torch.from_numpy(np.take(self.base, rows, axis=0))

    def numpy(self) -> np.ndarray:
        return np.take(self.base, self.index, axis=0)


def images_dir() -> Path:
    from clbench.paths import cache_dir

    d = cache_dir() / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_key(dataset: str, split: str, size: int, mode: str, checksum: str) -> str:
    return f"{dataset}-{split}-{mode}{size}-{checksum[:16]}"


@dataclass(frozen=True)
class ImageSet:
    """Which images a cache file holds: ``split`` of ``dataset`` (its pinned split's ``checksum``), decoded to
    ``size`` x ``size`` with crop ``mode`` (one of ``MODES``)."""

    dataset: str
    split: str
    size: int
    mode: str
    checksum: str

    def key(self) -> str:
        return cache_key(self.dataset, self.split, self.size, self.mode, self.checksum)


def _decode_all(paths: Sequence[Path], size: int, mode: str, out: np.ndarray, workers: int,
                decode: Callable[[str | Path, int, str], np.ndarray]) -> None:
    def one(i: int) -> None:
        try:
            out[i] = decode(paths[i], size, mode)
        except FileNotFoundError:
            raise ClbenchError(f"stream.root: image file missing: {paths[i]}; re-extract the dataset") from None
        except ClbenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a damaged file
            raise ClbenchError(f"stream.root: cannot decode {paths[i]} ({type(exc).__name__}: {exc}); "
                               "the file is corrupt: re-download or re-extract the dataset") from None

    # PIL releases the GIL while decoding and resizing, so threads scale across cores without pickling.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(one, range(len(paths)), chunksize=64):
            pass


def load_or_build(images: ImageSet, paths: Sequence[Path], use_cache: bool = True, workers: int | None = None,
                  progress: Callable[[str], None] = lambda s: None) -> tuple[np.ndarray, bool]:
    """The ``N x 3 x size x size`` uint8 images of ``paths`` (``images`` says which set, size and crop); returns
    ``(array, decoded_now)``.

    With ``use_cache`` the array is a read-only memmap of ``<cache>/images/<key>.u8``, built on first use.
    """
    dataset, split, size, mode, checksum = images.dataset, images.split, images.size, images.mode, images.checksum
    if mode not in MODES:
        raise ValueError(f"unknown crop mode {mode}")
    workers = workers or os.cpu_count() or 1
    shape = (len(paths), 3, size, size)
    if not use_cache:
        out = np.empty(shape, dtype=np.uint8)
        _decode_all(paths, size, mode, out, workers, decode_image)
        return out, True
    key = images.key()
    data, meta = images_dir() / f"{key}.u8", images_dir() / f"{key}.json"
    if data.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("complete") and info.get("shape") == list(shape) and data.stat().st_size == int(np.prod(shape)):
            return np.memmap(data, dtype=np.uint8, mode="r", shape=shape), False
        progress(f"cache {data.name} is incomplete or stale; rebuilding")
    progress(f"decoding {len(paths)} {dataset} {split} images once into {data} ({np.prod(shape) / 2**30:.1f} GiB)")
    partial = data.with_suffix(f".partial{os.getpid()}")
    out = np.memmap(partial, dtype=np.uint8, mode="w+", shape=shape)
    try:
        _decode_all(paths, size, mode, out, workers, decode_image)
        out.flush()
        del out
        os.replace(partial, data)
    finally:
        if partial.exists():
            partial.unlink()
    meta.write_text(json.dumps({"complete": True, "shape": list(shape), "dataset": dataset, "split": split,
                                "mode": mode, "split_sha256": checksum}))
    return np.memmap(data, dtype=np.uint8, mode="r", shape=shape), True
