"""Loader throughput on this machine's CPU, against the ~5,000 img/s an H200 trains ViT-B/16 at.

Measures, for ImageNet-R-like data (train cache 256 x 256, batch 128):
  decode_img_per_s      one-time cache build: JPEG (500 x 375) -> 256 x 256 uint8, all cores (PIL threads)
  gather_img_per_s      serving batches from the uint8 memmap (the loop's host-side work: index, copy)
  gather_pin_img_per_s  the same plus pinning (what the loop does on CUDA before the host-to-device copy)
  augment_cpu_img_per_s random resized crop + flip + normalise to 224 computed on the CPU (on a GPU it runs on
                        the device, so this figure is only a lower bound of that path)
Prints name=value lines. Usage: python benchmarks/loader_speed.py [--images 1024]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clbench.data import imagecache
from clbench.data.augment import random_resized_crop_flip


def rate(fn, n_images: int, repeat: int = 3) -> float:
    fn()  # warm up (page cache, allocator)
    best = float("inf")
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return n_images / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CLBENCH_CACHE"] = tmp
        rng = np.random.RandomState(0)
        jpgs = []
        for i in range(64):
            p = Path(tmp) / f"{i}.jpg"
            Image.fromarray(rng.randint(0, 255, (375, 500, 3), dtype=np.uint8)).save(p, quality=90)
            jpgs.append(p)
        paths = [jpgs[i % 64] for i in range(256)]
        tic = time.perf_counter()
        imagecache.load_or_build("bench", "train", paths, 256, "center", "0" * 64)
        decode = len(paths) / (time.perf_counter() - tic)

        n = args.images
        mm = np.lib.format.open_memmap(Path(tmp) / "x.npy", mode="w+", dtype=np.uint8, shape=(n, 3, 256, 256))
        mm[:] = rng.randint(0, 255, (1, 3, 256, 256), dtype=np.uint8)
        mm.flush()
        x = imagecache.IndexedImages(np.load(Path(tmp) / "x.npy", mmap_mode="r"), np.arange(n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        batches = [perm[i:i + args.batch] for i in range(0, n, args.batch)]

        def gather(pin: bool = False) -> None:
            for sel in batches:
                xb = x[sel]
                if pin and torch.cuda.is_available():
                    xb = xb.pin_memory()

        mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
        g = torch.Generator().manual_seed(0)

        def augment() -> None:
            for sel in batches[:2]:
                (random_resized_crop_flip(x[sel], 224, g) - mean) / mean

        print(f"cpu_threads={torch.get_num_threads()}")
        print(f"decode_img_per_s={decode:.0f}")
        print(f"gather_img_per_s={rate(gather, n):.0f}")
        print(f"gather_pin_img_per_s={rate(lambda: gather(True), n):.0f}")
        print(f"augment_cpu_img_per_s={rate(augment, sum(len(b) for b in batches[:2]), repeat=1):.0f}")
        print("target_train_img_per_s=5000")


if __name__ == "__main__":
    main()
