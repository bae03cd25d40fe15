"""EBLoRA: how far the first optimizer step rotates a direction factor, as a function of the rescale constant c.

The official ``post_step`` multiplies the optimizer's change of each Stiefel frame X (d x r: B, or A^T) by
``sqrt(c / r)`` before projecting and retracting (``c = 4096`` in the released code, LLaMA-7B's width). Adam's
first step moves every entry by about lr (``m_hat / sqrt(v_hat) = sign(g)``), so ``||delta||_F ~ lr sqrt(d r)``;
after the rescale ``lr sqrt(c d)``, against ``||X||_F = sqrt(r)``: the relative change grows like
``lr sqrt(c d / r)``. So ``c = d`` does not keep the official relative step when d changes; matching the
official rotation (d = c = 4096) on a width-d model needs ``c = 4096^2 / d`` at the same lr and r.

This script measures it with the plugin's own algebra (``tangent``, ``project_out``, ``polar``) and a real
``torch.optim.AdamW`` first step (weight decay 0.1, as official), on a random orthonormal frame and a random
Gaussian gradient, averaged over ``--trials`` draws. Prints ``d= c= r= lr= rel_change= predicted=`` lines.

Run: ``.venv/bin/python benchmarks/eblora_step_size.py``
"""

from __future__ import annotations

import argparse
import math

import torch
from clbench_plugins.eblora import polar, tangent


def first_step_change(d: int, r: int, c: float, lr: float, seed: int) -> float:
    """``||X1 - X0||_F / ||X0||_F`` after one Riemannian AdamW step with the ``sqrt(c / r)`` rescale."""
    g = torch.Generator().manual_seed(seed)
    X0 = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    X = torch.nn.Parameter(X0.clone())
    opt = torch.optim.AdamW([X], lr=lr, weight_decay=0.1)
    X.grad = tangent(X0, torch.randn(d, r, generator=g, dtype=torch.float64))  # official pre_step (F empty)
    opt.step()
    with torch.no_grad():
        delta = tangent(X0, (X - X0) * math.sqrt(c / r))  # official post_step: rescale, project, retract
        X1 = polar(X0 + delta)
    return float((X1 - X0).norm() / X0.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    cases = [  # (what, d, r, c, lr)
        ("official UCIT (LLaMA-7B q/v input, r 16, lr 2e-4)", 4096, 16, 4096, 2e-4),
        ("ViT-B/16 with c = width (current default)", 768, 16, 768, 2e-4),
        ("ViT-B/16 with the official constant c = 4096", 768, 16, 4096, 2e-4),
        ("ViT-B/16 with c = 4096^2 / 768", 768, 16, 4096**2 / 768, 2e-4),
        ("ViT-B suites (r 10, lr 5e-4), c = 768", 768, 10, 768, 5e-4),
        ("ViT-B suites (r 10, lr 5e-4), c = 4096", 768, 10, 4096, 5e-4),
        ("ViT-B suites (r 10, lr 5e-4), c = 21845", 768, 10, 21845, 5e-4),
        ("quickstart (width 64, r 4, lr 5e-3), c = 64 (default)", 64, 4, 64, 5e-3),
        ("quickstart, c = 768", 64, 4, 768, 5e-3),
        ("quickstart, c = 4096", 64, 4, 4096, 5e-3),
        ("quickstart, c = 21845", 64, 4, 21845, 5e-3),
    ]
    for what, d, r, c, lr in cases:
        rel = sum(first_step_change(d, r, c, lr, s) for s in range(args.trials)) / args.trials
        pred = lr * math.sqrt(c * d / r)
        print(f"d={d} c={c:.0f} r={r} lr={lr:g} rel_change={rel:.4f} predicted={pred:.4f}  # {what}")


if __name__ == "__main__":
    main()
