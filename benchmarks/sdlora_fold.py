"""SD-LoRA's training step at task t against task 2, interleaved in one process (issue 37).

Builds SD-LoRA on ``vit_tiny_clbench`` (16 px, one channel, default params: rank 10 on q and v) with the structure
it has at task t (t - 1 finished, normalised pairs and the training pair, all with non-zero B), for every t of
``--tasks``, folded (``LoRASite.combine``, the plugin's default) and unfolded (one branch per task, the official
forward). Then it times full training steps (preprocess, forward, cross-entropy, backward, Adam step over the
method's parameter groups) of every model in turn, ``--repeats`` rounds, one torch thread, process CPU time.
Interleaving makes every model see the same machine load, so the ratios are robust on a shared CPU where
``growth.py``'s per-task figures are not. Prints ``<form>.step_ratio_t<T>`` = median step at t / median at 2, and
the step by part, ``<form>.<forward|backward|optimizer>_ms_t<T>`` (medians), to see where a growth sits.

Usage: python benchmarks/sdlora_fold.py [--tasks 2,5,20,50] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from clbench_plugins.sdlora import SDLoRA

from clbench.methods.context import TaskContext
from clbench.model.backbones import Arch, build_model

PARTS = ("forward", "backward", "optimizer")  # the loss's forward pass; backward; Adam step and zero_grad


def build(T: int, folded: bool):
    torch.manual_seed(0)
    model = build_model("vit_tiny_clbench", 16, pretrained=False, checkpoint=None, arch=Arch(in_chans=1))
    model.add_head(2)
    method = SDLoRA()
    method.configure_model(model, None)
    if not folded:
        for site in method.sites.values():
            site.combine = site.fold_weight = None
    for t in range(T):
        ctx = TaskContext(task=t, num_tasks=T, classes=(0, 1), seen_classes=(0, 1), device=torch.device("cpu"),
                          seed=0, loader=None)
        method.before_task(model, ctx)
        with torch.no_grad():
            for site in method.sites.values():
                site.branches[-1].B.normal_()
    groups = method.param_groups(model, None) + [{"params": list(model.heads[0].parameters())}]
    return model, torch.optim.Adam(groups, lr=1e-3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="2,5,20,50")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tasks = [int(t) for t in args.tasks.split(",")]
    models = {(form, T): build(T, form == "folded") for form in ("folded", "unfolded") for T in tasks}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.arange(64) % 2
    times: dict[tuple[str, int], list[float]] = {k: [] for k in models}
    parts: dict[tuple[str, int], dict[str, list[float]]] = {k: {p: [] for p in PARTS} for k in models}
    for r in range(args.repeats):
        for key in (list(models) if r % 2 == 0 else list(reversed(models))):
            model, opt = models[key]
            tic = time.process_time()
            loss = torch.nn.functional.cross_entropy(model(model.preprocess(x), head=0), y)
            fwd = time.process_time()
            loss.backward()
            bwd = time.process_time()
            opt.step()
            opt.zero_grad(set_to_none=True)
            toc = time.process_time()
            times[key].append(toc - tic)
            for p, v in zip(PARTS, (fwd - tic, bwd - fwd, toc - bwd)):
                parts[key][p].append(v)
    for form in ("folded", "unfolded"):
        base = statistics.median(times[(form, tasks[0])])
        for T in tasks:
            med = statistics.median(times[(form, T)])
            print(f"{form}.step_ms_t{T}={1000 * med:.2f}")
            print(f"{form}.step_ratio_t{T}={med / base:.4f}")
            for p in PARTS:
                print(f"{form}.{p}_ms_t{T}={1000 * statistics.median(parts[(form, T)][p]):.2f}")


if __name__ == "__main__":
    main()
