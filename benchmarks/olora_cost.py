"""Step cost of O-LoRA's orthogonality term at task t (default: the 10th task), with against without it.

Builds a randomly initialised backbone, runs the olora plugin's hooks through ``tasks - 1`` finished tasks (random
factors stand in for trained ones: the cost does not depend on their values), then times full training steps of
the last task (forward, cross-entropy, the plugin's loss terms through the pluggy manager, backward, Adam step)
with lambda1 = 0.5 and with lambda1 = 0 (the term is then not computed), interleaved in one process, and prints
``name=value`` lines:

  sites                   adapted layers (default targets q and v of every block)
  old_rank                rank of the concatenated earlier down-projections per site (r * (tasks - 1))
  step_ms_without         median step time, lambda1 = 0
  step_ms_with            median step time, lambda1 = 0.5
  ratio_with_over_without step_ms_with / step_ms_without (issue 4 target: < 1.10 at 10 tasks)
  term_ms                 median time of the term alone, forward and backward
  step_ms_with_merged     median step time with lambda1 = 0.5 after folding the frozen branch into the weights
  ratio_unmerged_over_merged  step_ms_with / step_ms_with_merged (what ``merge_frozen`` buys)

Usage: python benchmarks/olora_cost.py [--backbone vit_tiny_clbench] [--image-size 16] [--batch-size 64]
       [--tasks 10] [--rank 8] [--steps 10] [--repeats 7] [--device cpu] [--threads 1]
The defaults are the quickstart's backbone and batch, where the term's share is largest (a tiny model).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from clbench_plugins.olora import OLoRA

from clbench.methods.context import TaskContext
from clbench.methods.registry import run_manager
from clbench.model.backbones import build_model


def _ctx(task: int, num_tasks: int, device: torch.device) -> TaskContext:
    return TaskContext(task=task, num_tasks=num_tasks, classes=(0, 1), seen_classes=tuple(range(2 * task + 2)),
                       device=device, seed=0, loader=lambda **kw: iter(()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="vit_tiny_clbench")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed window")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved windows per variant")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a busy host)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = build_model(args.backbone, args.image_size, pretrained=False, checkpoint=None).to(device)
    method = OLoRA({"rank": args.rank, "lambda1": 0.5})
    pm = run_manager(method)
    T = args.tasks
    pm.hook.configure_model(model=model, ctx=_ctx(0, T, device))
    g = torch.Generator().manual_seed(0)
    for t in range(T - 1):
        ctx = _ctx(t, T, device)
        pm.hook.before_task(model=model, ctx=ctx)
        with torch.no_grad():
            for b in method._new.values():
                b.B.copy_(0.01 * torch.randn(b.B.shape, generator=g))
        pm.hook.after_task(model=model, ctx=ctx)
        pm.hook.merge_task(model=model, ctx=ctx)
    ctx = _ctx(T - 1, T, device)
    pm.hook.before_task(model=model, ctx=ctx)
    head = model.add_head(2)
    groups = pm.hook.param_groups(model=model, ctx=ctx) + [{"params": list(head.parameters())}]
    opt = torch.optim.Adam(groups, lr=1e-3)
    in_chans = model.in_chans
    x = torch.randn(args.batch_size, in_chans, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 2, (args.batch_size,), device=device)
    with_term = method.params
    without_term = method.params.model_copy(update={"lambda1": 0.0})
    model.train()

    def window(params) -> float:
        method.params = params
        _sync(device)
        tic = time.perf_counter()
        for _ in range(args.steps):
            loss = F.cross_entropy(model(x, head=0), y)
            for terms in pm.hook.loss_terms(model=model, batch=(x, y), logits=None, ctx=ctx, replayed=None):
                for v in (terms or {}).values():
                    loss = loss + v
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        return (time.perf_counter() - tic) / args.steps * 1e3

    def term_window() -> float:
        method.params = with_term
        _sync(device)
        tic = time.perf_counter()
        for _ in range(args.steps):
            terms = pm.hook.loss_terms(model=model, batch=(x, y), logits=None, ctx=ctx, replayed=None)
            sum(v for t in terms for v in t.values()).backward()
        _sync(device)
        return (time.perf_counter() - tic) / args.steps * 1e3

    window(with_term), window(without_term)  # warm-up
    on, off, term = [], [], []
    for i in range(args.repeats):  # interleaved, alternating order, so machine load hits both alike
        order = (with_term, without_term) if i % 2 == 0 else (without_term, with_term)
        for params in order:
            (on if params is with_term else off).append(window(params))
        term.append(term_window())
    method.merge_frozen()  # only the live branch is left; the old A's still feed the term
    merged_ms = [window(with_term) for _ in range(args.repeats)]

    step_on, step_off = statistics.median(on), statistics.median(off)
    print(f"backbone={args.backbone}")
    print(f"device={device}")
    print(f"batch_size={args.batch_size}")
    print(f"tasks={T}")
    print(f"sites={len(method.sites)}")
    print(f"old_rank={args.rank * (T - 1)}")
    print(f"step_ms_without={step_off:.3f}")
    print(f"step_ms_with={step_on:.3f}")
    print(f"ratio_with_over_without={step_on / step_off:.4f}")
    print(f"term_ms={statistics.median(term):.3f}")
    print(f"step_ms_with_merged={statistics.median(merged_ms):.3f}")
    print(f"ratio_unmerged_over_merged={step_on / statistics.median(merged_ms):.4f}")


if __name__ == "__main__":
    main()
