"""InfLoRA's overhead: covariance collection, B_t design and DualGPM memory update as a share of training time.

Runs the ``inflora`` plugin through the real training loop on a suite's stream, backbone and training settings
(default: the offline quickstart, the setting where the share is largest: a tiny model trained for few epochs)
and prints ``name=value`` lines, per task and in total:

  task_T_train_seconds        the loop's training time of task T (forward, backward, optimizer steps)
  task_T_cov_seconds          both covariance passes of task T (before_task with the current model, after_task
                              with the trained one)
  task_T_memory_seconds       B_t design (SVD of the projected covariance) + DualGPM update
  task_T_share                (cov + memory) / train
  total_share                 the same over all tasks (issue 3 target: < 0.15)
  hook_share                  the loop's own timing of the before_task + after_task hooks / training time
  memory_update_ms_d768       B_t design + DualGPM update for 12 layers of d = 768 on random covariances
                              (ViT-B/16 size; the linear algebra of a real suite, which does not depend on data)

Usage: python benchmarks/inflora_cost.py [--suite suites/quickstart.yaml] [--epochs N] [--rank 4]
       [--device cpu] [--set key.path=value ...]
The stream, backbone and train section come from the suite (``--set`` overrides as in ``clbench run``); the
suite's methods are ignored. Nothing is logged to MLflow.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from clbench_plugins.inflora import InfLoRA, design_down_projection, dualgpm_update

from clbench.data.streams import build_stream
from clbench.methods.registry import run_manager
from clbench.model.backbones import Arch, build_model
from clbench.run.loop import LoopOptions, TaskResult, resolve_device, run_stream
from clbench.suite import load_suite

DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "suites" / "quickstart.yaml"


def memory_update_ms(d: int = 768, layers: int = 12, rank: int = 10, tasks: int = 3) -> float:
    """Median per-task milliseconds of design + DualGPM update for ``layers`` inputs of dimension d."""
    g = torch.Generator().manual_seed(0)
    memories: list = [None] * layers
    times = []
    for t in range(tasks):
        covs = []
        for _ in range(layers):  # a decaying spectrum, like token features'
            X = torch.randn(4 * d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
            covs.append(X.t() @ X / len(X))
        tic = time.perf_counter()
        for i, C in enumerate(covs):
            design_down_projection(C, memories[i], rank)
            memories[i] = dualgpm_update(memories[i], C, 0.95 + 0.05 * t / tasks)
        times.append(time.perf_counter() - tic)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default=str(DEFAULT_SUITE))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--device", default=None, help="override runtime.device")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-d768", action="store_true")
    args = ap.parse_args()

    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.device is not None:
        overrides.append(f"runtime.device={args.device}")
    suite = load_suite(args.suite, overrides)
    cfg = suite.train
    device = resolve_device(suite.runtime.device)
    stream = build_stream(suite.stream, args.seed)
    torch.manual_seed(args.seed)
    bb = suite.backbone
    model = build_model(bb.name, bb.image_size, bb.pretrained, bb.checkpoint,
                        arch=Arch(in_chans=bb.in_chans, drop_path_rate=bb.drop_path_rate))
    method = InfLoRA({"rank": args.rank})
    results: list[TaskResult] = []
    run_stream(model, stream, run_manager(method), cfg, args.seed,
               LoopOptions(device=device, on_task=lambda res, state, model: results.append(res)))

    print(f"suite={suite.name}")
    print(f"backbone={suite.backbone.name}")
    print(f"epochs={cfg.epochs}")
    print(f"device={device}")
    total_train = total_cov = total_mem = total_hooks = 0.0
    for res, cost in zip(results, method.cost):
        cov = cost["cov_before"] + cost["cov_after"]
        mem = cost["design"] + cost["memory_update"]
        t = res.task
        print(f"task_{t}_train_seconds={res.train_seconds:.3f}")
        print(f"task_{t}_cov_seconds={cov:.3f}")
        print(f"task_{t}_memory_seconds={mem:.3f}")
        print(f"task_{t}_share={(cov + mem) / res.train_seconds:.4f}")
        total_train += res.train_seconds
        total_cov += cov
        total_mem += mem
        total_hooks += res.hook_seconds.get("before_task", 0.0) + res.hook_seconds.get("after_task", 0.0)
    print(f"total_train_seconds={total_train:.3f}")
    print(f"total_cov_seconds={total_cov:.3f}")
    print(f"total_memory_seconds={total_mem:.3f}")
    print(f"total_share={(total_cov + total_mem) / total_train:.4f}")
    print(f"hook_share={total_hooks / total_train:.4f}")
    if not args.skip_d768:
        print(f"memory_update_ms_d768={memory_update_ms():.1f}")


if __name__ == "__main__":
    main()
