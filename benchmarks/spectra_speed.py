"""Spectra from low-rank factors against dense SVDs of the same updates, on ViT-B/16 shapes.

ViT-B/16 has 12 blocks; an update of rank r = 10 on 768x768 maps (q, k, v, proj) and 768x3072 / 3072x768
maps (fc1, fc2). Prints name=value lines measured in one process:

  factor_seconds   time of clbench.model.spectra.singular_values for all 72 layers of one task (QR + small SVD)
  tracker_seconds  the full per-task bookkeeping of a run (spectra, indices, overlaps, cumulative update)
  dense_seconds    torch.linalg.svdvals of the dense float64 updates, measured on --dense-blocks blocks and
                   scaled to 12 (every block has the same six shapes)
  speedup          dense_seconds / factor_seconds (target: >= 100)
  share_of_epoch   factor_seconds / (images per CIFAR-100 epoch / training img/s); the training rate defaults
                   to 5000 img/s (the H200 target of docs/PERFORMANCE.md); pass --img-per-s to change it

Usage: python benchmarks/spectra_speed.py [--repeats 3] [--img-per-s 5000] [--epoch-images 50000]
"""

from __future__ import annotations

import argparse
import time

import torch

from clbench.model.lora import LowRank
from clbench.model.spectra import SpectraTracker, singular_values


def layers(rank: int, seed: int = 0) -> dict[str, LowRank]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (768, 768), "k": (768, 768), "v": (768, 768), "proj": (768, 768), "fc1": (3072, 768),
              "fc2": (768, 3072)}
    out = {}
    for b in range(12):
        for name, (d_out, d_in) in shapes.items():
            out[f"blocks.{b}.{name}"] = LowRank(torch.randn(d_out, rank, generator=g) * 0.01,
                                                torch.randn(rank, d_in, generator=g))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--img-per-s", type=float, default=5000.0)
    ap.add_argument("--epoch-images", type=int, default=50000)
    ap.add_argument("--dense-blocks", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    ups = layers(args.rank)
    best_f = float("inf")
    for _ in range(args.repeats):
        tic = time.perf_counter()
        for u in ups.values():
            singular_values(u)
        best_f = min(best_f, time.perf_counter() - tic)
    best_t = float("inf")
    for _ in range(args.repeats):
        tr = SpectraTracker()
        tic = time.perf_counter()
        tr.add_task(ups)
        best_t = min(best_t, time.perf_counter() - tic)
    dense_layers = [u for n, u in ups.items() if int(n.split(".")[1]) < args.dense_blocks]
    tic = time.perf_counter()
    for u in dense_layers:
        torch.linalg.svdvals(u.dense().double())
    best_d = (time.perf_counter() - tic) * len(ups) / len(dense_layers)
    # agreement check on a few layers
    err = max(float((singular_values(u)[: args.rank] - torch.linalg.svdvals(u.dense().double())[: args.rank]).abs().max()
                    / torch.linalg.svdvals(u.dense().double())[0]) for u in list(ups.values())[:6])
    epoch_seconds = args.epoch_images / args.img_per_s
    print(f"layers={len(ups)}")
    print(f"rank={args.rank}")
    print(f"factor_seconds={best_f:.4f}")
    print(f"tracker_seconds={best_t:.4f}")
    print(f"dense_seconds={best_d:.4f}")
    print(f"speedup={best_d / best_f:.1f}")
    print(f"max_rel_error={err:.2e}")
    print(f"epoch_seconds_assumed={epoch_seconds:.2f}")
    print(f"share_of_epoch={best_f / epoch_seconds:.5f}")
    print(f"tracker_share_of_epoch={best_t / epoch_seconds:.5f}")


if __name__ == "__main__":
    main()
