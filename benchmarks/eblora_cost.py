"""Cost of EBLoRA's Riemannian step relative to a plain AdamW step, on the tiny ViT and on ViT-B/16 shapes.

Both sides step the same parameter groups (B, A, s of every q and v site, rank r) with ``torch.optim.AdamW``;
the Riemannian side adds the plugin's ``before_optimizer_step`` (tangent map, F projection) and
``after_optimizer_step`` (rescale, projection, polar retraction). F is filled with ``--f-cols`` columns per
site so the restricted-manifold projections run. Weights are random (``pretrained=False``): cost does not
depend on them. Times are process CPU milliseconds per call with one torch thread by default (a shared
machine's wall time measures its neighbours). Prints ``name=value`` lines:

* ``<model>/step_ms_adamw``, ``<model>/step_ms_riemannian``, ``<model>/step_ratio``: the optimizer step alone;
* ``<model>/train_step_ms_adamw``, ``<model>/train_step_ms_riemannian``, ``<model>/train_step_ratio``: a whole
  training step (forward, backward, step) on a random batch, for the tiny ViT always and for ViT-B/16 with
  ``--vitb-train`` (slow on CPU).

Run: ``.venv/bin/python benchmarks/eblora_cost.py [--rank 16] [--iters 20] [--vitb-train]``
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from clbench_plugins.eblora import EBLoRA

from clbench.methods.context import TaskContext
from clbench.model.backbones import build_model


def _ctx() -> TaskContext:
    return TaskContext(task=0, num_tasks=1, classes=(0, 1), seen_classes=(0, 1), device=torch.device("cpu"),
                       seed=0, loader=lambda **kw: iter(()))


def _setup(name: str, image_size: int, rank: int, f_cols: int):
    torch.manual_seed(0)
    model = build_model(name, image_size, pretrained=False, checkpoint=None)
    model.add_head(10)
    method = EBLoRA({"rank": rank, "grad_init": False, "use_f": True})
    method.configure_model(model=model, ctx=_ctx())
    for n, site in method.sites.items():  # a random orthonormal F so the restricted projections run
        method.F[n], _ = torch.linalg.qr(torch.randn(site.d_in, min(f_cols, site.d_in - rank)))
    method.before_task(model=model, ctx=_ctx())
    groups = method.param_groups(model=model, ctx=_ctx())
    groups.append({"params": list(model.heads[0].parameters())})
    return model, method, groups


def _time(fn, iters: int) -> float:
    """Milliseconds of process CPU time per call: on a shared machine wall time measures the neighbours."""
    fn()  # warm-up
    tic = time.process_time()
    for _ in range(iters):
        fn()
    return 1000 * (time.process_time() - tic) / iters


def measure(label: str, name: str, image_size: int, rank: int, iters: int, f_cols: int, train: bool,
            batch: int) -> None:
    model, method, groups = _setup(name, image_size, rank, f_cols)
    ctx = _ctx()
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    gen = torch.Generator().manual_seed(1)

    def fill_grads():
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2

    def plain():
        fill_grads()
        opt.step()

    def riemannian():
        fill_grads()
        method.before_optimizer_step(model=model, ctx=ctx)
        opt.step()
        method.after_optimizer_step(model=model, ctx=ctx)

    fill_ms = _time(fill_grads, iters)
    a = _time(plain, iters) - fill_ms
    r = _time(riemannian, iters) - fill_ms
    print(f"{label}/sites={len(method.sites)}")
    print(f"{label}/step_ms_adamw={a:.3f}")
    print(f"{label}/step_ms_riemannian={r:.3f}")
    print(f"{label}/step_ratio={r / max(a, 1e-9):.2f}")
    if not train:
        return
    x = torch.randn(batch, model.in_chans, image_size, image_size)
    y = torch.randint(0, 10, (batch,))

    def train_step(riem: bool):
        loss = F.cross_entropy(model(x, head=0), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if riem:
            method.before_optimizer_step(model=model, ctx=ctx)
        opt.step()
        if riem:
            method.after_optimizer_step(model=model, ctx=ctx)

    model.train()
    ta = _time(lambda: train_step(False), iters)
    tr = _time(lambda: train_step(True), iters)
    print(f"{label}/train_step_ms_adamw={ta:.2f}")
    print(f"{label}/train_step_ms_riemannian={tr:.2f}")
    print(f"{label}/train_step_ratio={tr / max(ta, 1e-9):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--f-cols", type=int, default=64, help="columns of F per site (restricted manifold)")
    ap.add_argument("--vitb-train", action="store_true", help="also time whole ViT-B/16 training steps")
    ap.add_argument("--batch", type=int, default=64, help="tiny-ViT training batch (ViT-B uses 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable CPU-time figures)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"rank={args.rank}")
    print(f"threads={torch.get_num_threads()}")
    measure("vit_tiny_clbench", "vit_tiny_clbench", 16, args.rank, args.iters, min(args.f_cols, 32), True,
            args.batch)
    measure("vit_base_patch16_224", "vit_base_patch16_224", 224, args.rank, max(3, args.iters // 4),
            args.f_cols, args.vitb_train, 4)


if __name__ == "__main__":
    main()
