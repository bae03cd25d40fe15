"""Why O-LoRA forgets on the tiny T5 of the language quickstart (docs/METHODS.md section 11): O-LoRA trained with
the settings of ``suites/lm-quickstart-t5.yaml`` (4 synthetic text tasks, 40 rows per label word, 12 epochs, batch
16, Adam at 5e-3, rank 8, alpha 8 on q, k, v and o of every attention), with ``--lambda1`` as its orthogonality
weight (0.5 in the suite; 0 trains the same frozen-branch structure without the penalty).

Printed as ``name=value`` lines, per task t >= 1:

- ``sites/task<t>``, ``cross_attn_sites/task<t>``: the sites that get a new A (and enter the penalty);
- ``old_A_max_change/task<t>``: the largest change, during task t, of any stored earlier A (0: frozen and kept);
- ``frozen_branch_vs_old_A/task<t>``: the largest difference between the frozen branch's A and the stored A's;
- ``orth_l1/task<t>/{init,final}``: O-LoRA's term sum_sites |A_prev A_t^T|_1 at the new A's initialisation and
  after the task; ``abs_cos/task<t>/{init,final}``: the same overlap as the mean |cosine| between rows (random rows
  of width 64: about 0.1);
- ``loss/task<t>``, ``orth_term/task<t>``: the task's mean cross-entropy and mean lambda1 * orthogonality term;

and after the last task, over every site and earlier task j:

- ``old_input_response``: mean ||A_last x_j||^2 / ||A_last x_last||^2 over token inputs x of the sites (1: the last
  task's down-projection reads the old tasks' inputs as strongly as its own task's);
- ``own_subspace_energy``: the share of task j's input energy inside the row space of task j's own A
  (``random_subspace_energy`` = r / d for a random subspace);
- ``acc/after<t>/task<j>``: the accuracy matrix; ``generates/task<j>``: what the model answers to task j's first
  test prompts after the last task.

Usage: python benchmarks/olora_lm_orthogonality.py [--lambda1 0.5] [--threads 1]   (about 10 s of CPU)
Recorded: python benchmarks/record.py --script benchmarks/olora_lm_orthogonality.py (and with ``--out
benchmarks/results/olora_lm_orthogonality-lambda0.json -- --lambda1 0``).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from clbench import hookimpl
from clbench.model.lora import find_sites
from clbench.testing import builtin_method, model_and_stream, run_method, tiny_text_case


def probe_class(base: type, log: list[dict[str, float]]) -> type:
    class Probe(base):
        @hookimpl
        def before_task(self, model, ctx):  # noqa: ANN001, ANN202
            super().before_task(model, ctx)
            self._snap = {n: A.clone() for n, A in self.old_A.items()}
            self._init = {n: b.A.detach().clone() for n, b in self._new.items()}

        @hookimpl
        def after_task(self, model, ctx):  # noqa: ANN001, ANN202
            if self.old_A:
                new = {n: b.A.detach() for n, b in self._new.items()}
                rec = {"sites": len(new), "cross_attn_sites": sum(".cross_attn." in n for n in new),
                       "old_A_max_change": max(float((self.old_A[n] - self._snap[n]).abs().max())
                                               for n in self.old_A),
                       "frozen_branch_vs_old_A": max(float((s.branches[0].A - self.old_A[n]).abs().max())
                                                     for n, s in self.sites.items())}
                for when, A in (("init", self._init), ("final", new)):
                    rec[f"orth_l1/{when}"] = sum(float((self.old_A[n] @ A[n].t()).abs().sum()) for n in A)
                    rec[f"abs_cos/{when}"] = float(np.mean([float((unit(self.old_A[n]) @ unit(A[n]).t()).abs().mean())
                                                            for n in A]))
                log.append(rec)
            super().after_task(model, ctx)

    return Probe


def unit(A: torch.Tensor) -> torch.Tensor:
    return A / A.norm(dim=1, keepdim=True)


def site_inputs(model, task, t: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Every site's token inputs on 64 of the task's training rows (teacher-forced pass)."""
    acts: dict[str, list[torch.Tensor]] = {}
    sites = find_sites(model)

    def grab(name: str):  # noqa: ANN202
        def hook(module, inputs, output):  # noqa: ANN001, ANN202
            acts.setdefault(name, []).append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]))
        return hook

    handles = [s.register_forward_hook(grab(n)) for n, s in sites.items()]
    with torch.no_grad():
        model.train_loss(task.train_x[:64], task.train_y[:64] - task.classes[0], t)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in acts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lambda1", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    log: list[dict[str, float]] = []
    r = 8
    method = probe_class(builtin_method("olora"), log)(
        {"rank": r, "alpha": 8, "targets": ["q", "k", "v", "o"], "lambda1": args.lambda1, "lambda2": 0.0})
    case = tiny_text_case(4, per_class=40)
    run = run_method(method, stream=case, epochs=12, batch_size=16, lr=5e-3, optimizer="adam",
                     schedule="constant")
    for t, (rec, res) in enumerate(zip(log, run.results[1:], strict=True), start=1):
        for key, value in {**rec, "loss": res.loss, "orth_term": res.loss_terms.get("olora_orth", 0.0)}.items():
            head, _, tail = key.partition("/")
            print(f"{head}/task{t}{'/' + tail if tail else ''}={value:.4g}")
    model, stream = run.model, model_and_stream(case)[1]
    model.eval()
    inputs = [site_inputs(model, task, t) for t, task in enumerate(stream.tasks)]
    last = len(stream.tasks) - 1
    response, energy = [], []
    for n, A in method.old_A.items():
        A_last = A[last * r:]
        own = (inputs[last][n] @ A_last.t()).pow(2).sum(1).mean()
        for j in range(last):
            x = inputs[j][n]
            response.append(float((x @ A_last.t()).pow(2).sum(1).mean() / own))
            Q, _ = torch.linalg.qr(A[j * r:(j + 1) * r].t())
            energy.append(float((x @ Q).pow(2).sum() / x.pow(2).sum()))
    d = next(iter(method.old_A.values())).shape[1]
    print(f"old_input_response={np.mean(response):.3f}")
    print(f"own_subspace_energy={np.mean(energy):.3f}")
    print(f"random_subspace_energy={r / d:.3f}")
    for t in range(len(stream.tasks)):
        for j in range(t + 1):
            print(f"acc/after{t}/task{j}={run.state.R[t, j]:.1f}")
    with torch.no_grad():
        for j in range(last):
            print(f"generates/task{j}={','.join(model.generate(stream.tasks[j].test_x[:6]))} "
                  f"# labels {','.join(stream.tasks[j].labels)}")


if __name__ == "__main__":
    main()
