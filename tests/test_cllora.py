"""CL-LoRA (plugins/cllora.py): what its task-shared and task-specific parts are constrained to do.

Shared adapters: a fixed orthonormal down-projection, one branch for the whole stream, a KD term whose
gradient on each up-projection row is rescaled by the teacher's row norm (and only the KD gradient is), a
KD that is exactly neutral when student and teacher agree and keeps the shared features closer to the
previous task's than training without it. Specific adapters: one branch per task, frozen afterwards,
scaled by its block weight, selected one task at a time; the block-weight orthogonality term. Inference:
one pass per task against that task's prototypes, exactly what the loop evaluates. Plus bit-exact resume.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clbench_plugins.cllora import (
    CLLoRA,
    CLLoRAModel,
    SharedBranch,
    SpecificBranch,
    kd_loss,
    orthogonality_loss,
    random_orthonormal,
    reassignment_weights,
    shared_blocks_features,
)

from clbench.errors import ClbenchError
from clbench.methods.registry import discover, run_manager
from clbench.run.loop import LoopOptions, LoopState, run_stream
from clbench.testing import tiny_model, tiny_stream, tiny_train

RANK = 4
T = 3
TRAIN = dict(max_steps_per_epoch=4, optimizer="sgd", lr=0.05, momentum=0.9)


def _run(params=None, snapshots: bool = False, tasks: int = T, **train):
    """A run (3 tasks unless told) on the micro ViT (block 0 shared, block 1 specific) with per-task snapshots."""
    stream = tiny_stream(num_tasks=tasks, num_classes=2 * tasks, samples_per_class=16, seed=0)
    method = CLLoRA({"rank": RANK, **(params or {})})
    snaps: list[dict] = []
    results: list = []

    def on_task(result, state, m):
        results.append(result)
        if not snapshots:
            return
        snaps.append({"model": copy.deepcopy(m.state_dict()),
                      "method_state": copy.deepcopy(state.method_state),
                      "R": state.R.copy(), "R_til": state.R_til.copy(),
                      "block_weights": [w.detach().clone() for w in m.block_weights],
                      "shared_B": {n: b.B.detach().clone() for n, b in method.shared.items()},
                      "updates": results[-1].updates})

    cfg = tiny_train(**{**TRAIN, **train})
    state = run_stream(tiny_model(seed=0), stream, run_manager(method), cfg, 0, LoopOptions(on_task=on_task))
    return {"method": method, "model": method.model, "state": state, "stream": stream, "cfg": cfg,
            "snaps": snaps, "results": results}


@pytest.fixture(scope="module")
def run():
    return _run(snapshots=True)


# -- building blocks ----------------------------------------------------------------------------------------

def test_random_orthonormal_rows():
    torch.manual_seed(0)
    A = random_orthonormal(5, 32)
    assert A.shape == (5, 32)
    torch.testing.assert_close(A @ A.t(), torch.eye(5), atol=1e-5, rtol=0)


def test_kd_loss_is_the_official_soft_target_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    T_ = 2.0
    expected = -(torch.softmax(t / T_, 1) * torch.log_softmax(s / T_, 1)).sum(1).mean()
    torch.testing.assert_close(kd_loss(s, t, T_), expected)
    # gradient w.r.t. the student logits is (p_s - p_t) / (T N): zero exactly when they agree
    (g,) = torch.autograd.grad(kd_loss(s, s.detach(), T_), s)
    assert float(g.abs().max()) < 1e-7


def test_orthogonality_loss_is_mean_abs_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    assert float(orthogonality_loss([a], b)) == pytest.approx(0.0, abs=1e-7)
    assert float(orthogonality_loss([a], -3 * a)) == pytest.approx(1.0, abs=1e-6)
    assert float(orthogonality_loss([a, b], a)) == pytest.approx(0.5, abs=1e-6)
    assert float(orthogonality_loss([], a)) == 0.0


def test_reassignment_weights_follow_teacher_row_norms_with_mean_one():
    B = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])  # row norms 5, 1, 0, 1
    w = reassignment_weights(B)
    torch.testing.assert_close(w, torch.tensor([5.0, 1.0, 0.0, 1.0]) * 4 / 7)
    assert float(w.mean()) == pytest.approx(1.0)
    torch.testing.assert_close(reassignment_weights(torch.zeros(3, 2)), torch.ones(3))


# -- structure ----------------------------------------------------------------------------------------------

def test_replacement_model_and_layout(run):
    model, method = run["model"], run["method"]
    assert isinstance(model, CLLoRAModel)
    assert method.shared_block_ids == [0] and method.specific_block_ids == [1]  # halves of the micro ViT
    assert sorted(method.shared) == ["blocks.0.attn.q", "blocks.0.attn.v"]
    for site in method.specific_sites.values():
        assert [b.task for b in site.branches] == list(range(T))  # one specific branch per task
        assert all(isinstance(b, SpecificBranch) for b in site.branches)
    assert len(model.block_weights) == T and all(w.shape == (3, 1) for w in model.block_weights)


def test_shared_adapter_has_a_fixed_orthonormal_down_projection(run):
    method, snaps = run["method"], run["snaps"]
    for name, b in method.shared.items():
        assert isinstance(b, SharedBranch) and not b.A.requires_grad
        torch.testing.assert_close(b.A @ b.A.t(), torch.eye(RANK), atol=1e-5, rtol=0)
        key = f"backbone.blocks.0.attn.qkv.sites.{name[-1]}.branches.0.A"
        for s in snaps:  # the very same matrix after every task
            assert torch.equal(s["model"][key], b.A.detach())
    for t in range(1, T):  # while the up-projections keep learning on every task
        assert any(not torch.equal(run["snaps"][t]["shared_B"][n], run["snaps"][t - 1]["shared_B"][n])
                   for n in method.shared)


def test_finished_specific_adapters_and_block_weights_stay_frozen(run):
    snaps, model = run["snaps"], run["model"]
    final = model.state_dict()
    for t, s in enumerate(snaps[:-1]):
        own = [k for k in s["model"] if f".branches.{t}." in k and "blocks.1." in k]
        assert own
        for k in own:
            assert torch.equal(s["model"][k], final[k]), k
        assert torch.equal(s["block_weights"][t], model.block_weights[t].detach())


# -- inference: one pass per task against that task's prototypes -------------------------------------------

@torch.no_grad()
def test_each_pass_runs_exactly_one_tasks_specific_adapters_scaled_by_its_block_weight(run):
    model, method = run["model"], run["method"]
    model.eval()
    x = model.preprocess(run["stream"].tasks[0].test_x[:8])
    site = method.specific_sites["blocks.1.attn.q"]
    for j in range(T):
        f = model.task_features(x, j)
        # rebuild by hand: keep only task j's branch at every specific site
        saved = {n: s.branches for n, s in method.specific_sites.items()}
        try:
            for n, s in method.specific_sites.items():
                s.branches = torch.nn.ModuleList([saved[n][j]])
                s.branches[0]._selector.task = j
            manual = model.backbone(x)
        finally:
            for n, s in method.specific_sites.items():
                s.branches = saved[n]
            model.selector.task = model.live_task
        torch.testing.assert_close(f, manual, atol=0, rtol=0)
    # the branch's output is its low-rank product times its block weight
    b = site.branches[1]
    h = torch.randn(5, site.d_in)
    model.selector.task = 1
    out = b(h)
    model.selector.task = model.live_task
    torch.testing.assert_close(out, h @ (b.B @ b.A).t() * model.block_weights[1][0, 0], atol=1e-6, rtol=1e-5)
    assert b(h) == 0.0  # not selected: contributes nothing


@torch.no_grad()
def test_heads_hold_class_prototypes_and_logits_are_cosines(run):
    # head j holds task j's class means computed at the end of task j, i.e. with the shared adapters of
    # that time (as official: old prototypes are never recomputed, the shared adapters move on under KD)
    model, stream, method = run["model"], run["stream"], run["method"]
    model.eval()
    offset, final_B = 0, {n: b.B.detach().clone() for n, b in method.shared.items()}
    try:
        for j, task in enumerate(stream.tasks):
            head = model.heads[j]
            assert float(head.sigma) == 1.0 and not head.weight.requires_grad
            x = model.preprocess(task.train_x)
            y = task.train_y - offset
            offset += len(task.classes)
            for n, b in method.shared.items():
                b.B.data.copy_(run["snaps"][j]["shared_B"][n])
            f = model.task_features(x, j)
            protos = torch.stack([f[y == c].mean(0) for c in range(len(task.classes))])
            torch.testing.assert_close(head.weight, protos, atol=1e-5, rtol=1e-4)
    finally:
        for n, b in method.shared.items():
            b.B.data.copy_(final_B[n])
    x = model.preprocess(stream.tasks[1].test_x[:16])
    logits = model(x)
    manual = torch.cat([F.normalize(model.task_features(x, j), dim=1) @ F.normalize(model.heads[j].weight, dim=1).t()
                        for j in range(T)], 1)
    torch.testing.assert_close(logits, manual, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_loop_accuracy_is_the_official_prototype_prediction(run):
    model, stream, R = run["model"], run["stream"], run["state"].R
    model.eval()
    offsets = np.cumsum([0] + [len(t.classes) for t in stream.tasks])
    for j, task in enumerate(stream.tasks):
        x = model.preprocess(task.test_x)
        sims = [F.normalize(model.task_features(x, i), dim=1) @ F.normalize(model.heads[i].weight, dim=1).t()
                for i in range(T)]
        pred = torch.cat(sims, 1).argmax(1)
        acc = 100.0 * float((pred == task.test_y).float().mean())
        assert R[T - 1, j] == pytest.approx(acc)
        til = sims[j].argmax(1) + int(offsets[j])
        assert run["state"].R_til[T - 1, j] == pytest.approx(100.0 * float((til == task.test_y).float().mean()))


# -- task-shared adapters: KD and gradient reassignment ----------------------------------------------------

def _ctx(run, task):
    from clbench.methods.context import TaskContext

    stream = run["stream"]
    return TaskContext(task=task, num_tasks=T, classes=stream.tasks[task].classes,
                       seen_classes=tuple(range(2 * (task + 1))), device=torch.device("cpu"), seed=0,
                       loader=lambda **kw: iter(()))


def _kd_grads(method, model, x, ctx, reassign: bool):
    method.params = method.params.model_copy(update={"gradient_reassignment": reassign})
    for b in method.shared.values():
        b.B.grad = None
    method._kd(model, x, ctx).backward()
    return {n: b.B.grad.clone() for n, b in method.shared.items()}


def test_gradient_reassignment_scales_only_the_kd_gradient_rowwise(run):
    model, method = copy.deepcopy((run["model"], run["method"]))  # one copy: references stay consistent
    ctx = _ctx(run, T - 1)
    model.train()
    torch.manual_seed(1)
    for b in method.shared.values():  # a student that differs from its teacher, so KD has a gradient
        b.B.data.add_(0.05 * torch.randn_like(b.B))
        b.B.requires_grad_(True)
    x = model.preprocess(run["stream"].tasks[T - 1].train_x[:8])
    plain = _kd_grads(method, model, x, ctx, reassign=False)
    scaled = _kd_grads(method, model, x, ctx, reassign=True)
    for n, b in method.shared.items():
        w = reassignment_weights(b.teacher_B)
        assert float(w.std()) > 0.05  # the teacher's rows differ, so the check is not vacuous
        torch.testing.assert_close(scaled[n], w.unsqueeze(1) * plain[n], atol=1e-7, rtol=1e-5)
    # in the summed loss only the KD part is rescaled: grad(CE + KD) = grad(CE) + w * grad(KD)
    y = run["stream"].tasks[T - 1].train_y[:8] - 2 * (T - 1)
    for b in method.shared.values():
        b.B.grad = None
    F.cross_entropy(model(x, head=T - 1), y).backward()
    ce = {n: b.B.grad.clone() for n, b in method.shared.items()}
    for b in method.shared.values():
        b.B.grad = None
    (F.cross_entropy(model(x, head=T - 1), y) + method._kd(model, x, ctx)).backward()
    for n, b in method.shared.items():
        torch.testing.assert_close(b.B.grad, ce[n] + scaled[n], atol=1e-7, rtol=1e-5)


def test_kd_is_neutral_when_student_equals_teacher(run):
    # at the start of every task > 0 the teacher is the student: the KD gradient on the shared B is zero
    model, method = run["model"], run["method"]
    saved = {n: b.B.detach().clone() for n, b in method.shared.items()}
    try:
        for b in method.shared.values():
            b.B.data.copy_(b.teacher_B)
            b.B.requires_grad_(True)
            b.B.grad = None
        model.train()
        x = model.preprocess(run["stream"].tasks[1].train_x[:8])
        method._kd(model, x, _ctx(run, 1)).backward()
        for b in method.shared.values():
            assert float(b.B.grad.abs().max()) < 1e-7
    finally:
        for n, b in method.shared.items():
            b.B.data.copy_(saved[n])
            b.B.grad = None
        model.eval()


def _train_shared_from_task0(run, use_kd: bool) -> tuple[float, float]:
    """Start from the end of task 0 (student = teacher), train only the shared B on task 1's cross-entropy
    (plus KD if asked) with task 1's head frozen at sigma 16; return the KL(teacher || student) of that head's
    softened outputs on task 0's test images through the shared blocks, and the relative feature drift."""
    model, method = copy.deepcopy((run["model"], run["method"]))
    ctx = _ctx(run, 1)
    for n, b in method.shared.items():
        b.B.data.copy_(run["snaps"][0]["shared_B"][n])
        b.teacher_B.copy_(run["snaps"][0]["shared_B"][n])
    head = model.heads[1]
    head.sigma.data.fill_(16.0)  # a discriminative head, so its outputs can drift measurably
    task = run["stream"].tasks[1]
    x, y = model.preprocess(task.train_x), task.train_y - 2
    opt = torch.optim.SGD([b.B for b in method.shared.values()], lr=0.5)
    model.train()
    for _ in range(20):
        loss = F.cross_entropy(model(x, head=1), y)
        if use_kd:
            loss = loss + method.params.kd_weight * method._kd(model, x, ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x_old = model.preprocess(run["stream"].tasks[0].test_x)
    with torch.no_grad():
        student = shared_blocks_features(model.backbone, x_old, method.shared_block_ids)
        for b in method.shared.values():
            b.use_teacher = True
        teacher = shared_blocks_features(model.backbone, x_old, method.shared_block_ids)
        T_ = method.params.kd_temperature
        kl = F.kl_div(F.log_softmax(head(student) / T_, 1), F.log_softmax(head(teacher) / T_, 1),
                      log_target=True, reduction="batchmean")
    return float(kl), float((student - teacher).norm() / teacher.norm())


def test_distillation_keeps_the_distilled_outputs_close_on_old_images(run):
    # KD constrains the current head's softened outputs of the shared blocks, not the features themselves:
    # with it the outputs on task 0's (never trained on) test images stay ~50x closer to the teacher's
    # (measured KL 0.0027 vs 0.151), while the features drift about as much (0.70 vs 0.61 relative)
    kl_free, drift_free = _train_shared_from_task0(run, use_kd=False)
    kl_kd, drift_kd = _train_shared_from_task0(run, use_kd=True)
    assert kl_free > 0.05 and drift_free > 0.1  # the shared adapters really moved: not vacuous
    assert kl_kd < 0.1 * kl_free, (kl_kd, kl_free)
    assert run["results"][1].loss_terms["kd"] > 0


# -- task-specific adapters: block-weight orthogonality -----------------------------------------------------

def test_orthogonality_term_pushes_block_weights_apart():
    # the official weight 1e-4 barely moves a 4-step run; a larger one shows the term's direction: it
    # lowers |cos(w_1, w_0)| (measured 0.826 with weight 5, 0.968 without)
    runs = {ow: _run({"orth_weight": ow, "distillation": False}, tasks=2, lr=0.2) for ow in (0.0, 5.0)}
    cos = {ow: float(orthogonality_loss([r["model"].block_weights[0].detach()],
                                        r["model"].block_weights[1].detach())) for ow, r in runs.items()}
    assert "orth" in runs[5.0]["results"][1].loss_terms and "orth" not in runs[0.0]["results"][1].loss_terms
    assert cos[5.0] < cos[0.0] - 0.05, cos


def test_without_block_weights_every_specific_adapter_has_weight_one():
    r = _run({"block_weights": False}, tasks=2)
    for w in r["model"].block_weights:
        assert not w.requires_grad and torch.equal(w, torch.ones_like(w))
    assert "orth" not in r["results"][1].loss_terms and "kd" in r["results"][1].loss_terms


# -- spectra, resume, params ---------------------------------------------------------------------------------

def test_task_updates_are_the_shared_change_and_the_tasks_own_specific_branch(run):
    snaps, method = run["snaps"], run["method"]
    for t, s in enumerate(snaps):
        upd = s["updates"]
        assert set(upd) == set(method.shared) | set(method.specific_sites)
        for n, b in method.shared.items():
            prev = snaps[t - 1]["shared_B"][n] if t else torch.zeros_like(b.B)
            assert upd[n].rank == RANK
            torch.testing.assert_close(upd[n].dense(), (s["shared_B"][n] - prev) @ b.A.detach(), atol=1e-6, rtol=0)
        for n, site in method.specific_sites.items():
            b = site.branches[t]
            torch.testing.assert_close(upd[n].dense(), b.block_weight().detach() * (b.B @ b.A).detach(),
                                       atol=1e-6, rtol=1e-5)


def test_resume_is_bit_exact(run):
    snap = run["snaps"][1]
    path_state = copy.deepcopy(snap)
    method = CLLoRA({"rank": RANK})
    loop = LoopState(next_task=2, R=path_state["R"].copy(), R_til=path_state["R_til"].copy(),
                     method_state=path_state["method_state"], model_state=path_state["model"])
    state = run_stream(tiny_model(seed=0), run["stream"], run_manager(method), run["cfg"], 0,
                       LoopOptions(state=loop))
    np.testing.assert_array_equal(state.R, run["state"].R)
    np.testing.assert_array_equal(state.R_til, run["state"].R_til)
    final, resumed = run["model"].state_dict(), method.model.state_dict()
    assert final.keys() == resumed.keys()
    for k in final:
        assert torch.equal(final[k], resumed[k]), k


def test_params_and_bad_layouts():
    info = discover(strict=False).get("cllora")
    p = info.cls.Params()
    assert (p.rank, p.targets, p.kd_weight, p.kd_temperature, p.orth_weight) == (10, ["q", "v"], 5.0, 2.0, 1e-4)
    assert p.block_weight_init == (0.5, 1.5)
    with pytest.raises(ValueError):
        info.cls.Params(targets=["fc1"])
    for bad in ({"shared_blocks": [0], "specific_blocks": [0, 1]}, {"specific_blocks": [7]}):
        with pytest.raises(ClbenchError, match="cllora"):
            CLLoRA(bad).configure_model(tiny_model(), None)


@pytest.mark.parametrize("suite", ["repro/cllora-imagenet-r.yaml", "repro/cllora-cifar100.yaml", "vit.yaml",
                                   "vit-imagenet-r.yaml", "vit-domainnet.yaml"])
def test_suites_with_cllora_validate(suite):
    from pathlib import Path

    from clbench.run.runner import plan_runs
    from clbench.suite import load_suite

    s = load_suite(Path(__file__).resolve().parents[1] / "suites" / suite)
    planned = [p for p in plan_runs(s, suite, discover([]), None) if p.info.name == "cllora"]
    assert len(planned) == 1  # present, and its params validate
    if suite.startswith("repro/"):
        assert s.train.optimizer == "sgd" and s.train.momentum == 0.9 and s.train.schedule == "cosine_epoch"
        assert s.train.precision == "fp32" and s.backbone.normalize == "none" and s.stream.crop_scale == (0.05, 1.0)
