"""InfLoRA's defining properties, on the micro ViT with synthetic data and on hand-made covariances:
the designed down-projection B_t avoids the protected subspace, training a task leaves the adapted layers'
outputs on earlier tasks' protected inputs unchanged, the DualGPM memory keeps at least eps_t of the energy
and switches representation at d/2, and the covariance and B_t match hand computations."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from clbench_plugins.inflora import (
    REMOVE,
    RETAIN,
    CovarianceCollector,
    InfLoRA,
    Memory,
    design_down_projection,
    dualgpm_update,
    threshold,
)

from clbench.methods.context import TaskContext
from clbench.methods.hookspecs import hookimpl
from clbench.methods.registry import discover, run_manager
from clbench.model.lora import AdaptedLinear
from clbench.run.loop import LoopOptions, LoopState, run_stream
from clbench.testing import tiny_model, tiny_stream, tiny_train

RANK = 4
S3 = 1 / math.sqrt(3)


class Recording(InfLoRA):
    """InfLoRA that records, per task, the memory B_t was designed against, B_t, and the recollected C."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.log: list[dict] = []

    @hookimpl
    def before_task(self, model, ctx):
        memory = {k: Memory(m.basis.clone(), m.kind) for k, m in self.memory.items()}
        super().before_task(model, ctx)
        self.log.append({"memory": memory, "down": {k: v.clone() for k, v in self.down.items()}})

    def collect(self, model, ctx):
        self.last_covs = super().collect(model, ctx)
        return self.last_covs

    @hookimpl
    def after_task(self, model, ctx):
        super().after_task(model, ctx)
        self.log[-1]["covs"] = self.last_covs  # the recollection with the trained model


def _run(params: dict, num_tasks: int = 3, snapshot=None):
    """A real-loop run on the micro ViT; ``snapshot(t, model, method, state)`` after every task."""
    stream = tiny_stream(num_tasks=num_tasks, num_classes=2 * num_tasks, samples_per_class=16, seed=0)
    model = tiny_model(seed=0)
    method = Recording({"rank": RANK, **params})
    cfg = tiny_train(epochs=2, lr=1e-2)
    state = run_stream(model, stream, run_manager(method), cfg, 0,
                       LoopOptions(on_task=lambda res, s, m: snapshot and snapshot(res.task, m, method, s)))
    return stream, model, method, state, cfg


def _probe_outputs(method: InfLoRA, probes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: method.inputs[key](probes[key])[..., site.rows].clone()
                for name, site in method.sites.items() for key in [method.site_input[name]]}


@pytest.fixture(scope="module")
def kept_run():
    """merge: false (branches kept, as the official model), lambda_b 0.95: "remove" memories."""
    snaps: dict[int, dict] = {}
    gen = torch.Generator().manual_seed(1)

    def snapshot(t, model, method, state):
        protected = {k: method.memory[k].protected_basis().float() for k in method.inputs}
        d = next(iter(protected.values())).shape[0]
        probes_in = {k: torch.randn(64, P.shape[1], generator=gen) @ P.t() for k, P in protected.items()}
        probes_any = {k: torch.randn(64, d, generator=gen) for k in protected}
        snaps[t] = {"in": probes_in, "any": probes_any, "out_in": _probe_outputs(method, probes_in),
                    "out_any": _probe_outputs(method, probes_any),
                    "branches": {n: [(b.A.detach().clone(), b.B.detach().clone()) for b in s.branches]
                                 for n, s in method.sites.items()},
                    "model": copy.deepcopy(model.state_dict()),
                    "method_state": copy.deepcopy(method.method_state(ctx=None)),
                    "loop": LoopState(state.next_task, state.R.copy(), state.R_til.copy())}

    stream, model, method, state, cfg = _run({"merge": False}, snapshot=snapshot)
    return {"stream": stream, "model": model, "method": method, "state": state, "cfg": cfg, "snaps": snaps}


@pytest.fixture(scope="module")
def merged_run():
    """merge: true (default) with lambda_b close to 1: memories switch to "retain"."""
    snaps: dict[int, dict] = {}
    gen = torch.Generator().manual_seed(2)

    def snapshot(t, model, method, state):
        protected = {k: method.memory[k].protected_basis().float() for k in method.inputs}
        probes = {k: torch.randn(64, P.shape[1], generator=gen) @ P.t() for k, P in protected.items()}
        snaps[t] = {"in": probes, "out_in": _probe_outputs(method, probes)}

    stream, model, method, state, cfg = _run({"lambda_b": 0.9999, "lambda_e": 1.0}, num_tasks=2, snapshot=snapshot)
    return {"method": method, "snaps": snaps}


# -- hand-checked covariance and down-projection -----------------------------------------------------------

def test_hand_checked_covariance_on_a_small_layer():
    layer = AdaptedLinear(torch.nn.Linear(3, 4))
    x = torch.tensor([[[1.0, 0, 0], [0, 2, 0]], [[1, 0, 0], [0, 0, 1]]])  # 2 images x 2 tokens x d = 3
    with CovarianceCollector({"l": layer}) as coll:
        layer(x[:1])  # streamed in two batches: the sums, not the features, are kept
        layer(x[1:])
    C = coll.covariances()["l"]
    assert coll.counts["l"] == 4
    torch.testing.assert_close(C, torch.diag(torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64)))
    assert coll.sums["l"].shape == (3, 3)  # d x d, never N x d
    assert not layer._forward_hooks  # hooks are removed on exit


def test_hand_checked_down_projection():
    C = torch.diag(torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64))
    e = torch.eye(3, dtype=torch.float64)
    # no memory (task 0): top left singular vector of C is e2
    B = design_down_projection(C, None, 1)
    torch.testing.assert_close(B.abs(), (e[1] * S3)[None])
    # "remove" memory M = e2: C - M M^T C = diag(0.5, 0, 0.25) -> rows e1, e3
    B = design_down_projection(C, Memory(e[:, 1:2], REMOVE), 2)
    torch.testing.assert_close(B.abs(), torch.stack([e[0], e[2]]) * S3)
    # "retain" memory Mbar = e3 (only e3 is free): Mbar Mbar^T C = diag(0, 0, 0.25) -> row e3
    B = design_down_projection(C, Memory(e[:, 2:3], RETAIN), 1)
    torch.testing.assert_close(B.abs(), (e[2] * S3)[None])
    # a rotated case: tokens (1, 1, 0) and 0.5 (1, -1, 0) -> eigenvectors (1, +-1, 0)/sqrt(2), eigenvalues 1, 1/4
    layer = AdaptedLinear(torch.nn.Linear(3, 2))
    with CovarianceCollector({"l": layer}) as coll:
        layer(torch.tensor([[[1.0, 1, 0], [0.5, -0.5, 0]]]))
    C = coll.covariances()["l"]
    torch.testing.assert_close(C, torch.tensor([[0.625, 0.375, 0], [0.375, 0.625, 0], [0, 0, 0]],
                                               dtype=torch.float64))
    B = design_down_projection(C, None, 1)
    torch.testing.assert_close(B.abs(), torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64) / math.sqrt(6))


def test_collected_covariance_matches_explicit_features_on_the_micro_vit():
    model = tiny_model(seed=0)
    stream = tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8, seed=0)
    method = InfLoRA({"rank": RANK})
    method.configure_model(model, ctx=None)
    task = stream.tasks[0]

    def loader(batch_size=None, fraction=1.0, shuffle=False, generator=None, augmented=False):
        from clbench.data.batching import Draw, batches
        return batches(task.train_x, task.train_y, 5, torch.device("cpu"), model, Draw(fraction=fraction))

    ctx = TaskContext(task=0, num_tasks=2, classes=task.classes, seen_classes=task.classes,
                      device=torch.device("cpu"), seed=0, loader=loader)
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in method.inputs}
    handles = [m.register_forward_hook(lambda mod, inp, out, k=k: feats[k].append(inp[0].detach()))
               for k, m in method.inputs.items()]
    covs = method.collect(model, ctx)
    for h in handles:
        h.remove()
    assert set(covs) == {f"blocks.{i}.attn.qkv" for i in range(2)}  # k and v share the qkv input
    for k, chunks in feats.items():
        X = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).double()
        torch.testing.assert_close(covs[k], X.t() @ X / len(X))
    # B_t of task 0: the top-r left singular vectors of C scaled by 1/sqrt(3), one B_t for both k and v
    method.before_task(model, ctx)
    for k, C in covs.items():
        U = torch.linalg.svd(C)[0][:, :RANK]
        B = method.down[k].double()
        torch.testing.assert_close(3 * B.t() @ B, U @ U.t(), atol=1e-5, rtol=0)
    blk = method.sites["blocks.0.attn.k"].branches[-1]
    assert torch.equal(blk.A, method.sites["blocks.0.attn.v"].branches[-1].A)
    assert not blk.A.requires_grad and blk.B.requires_grad and torch.count_nonzero(blk.B) == 0


# -- B_t avoids the protected subspace --------------------------------------------------------------------

@pytest.mark.parametrize("which, kind", [("kept_run", REMOVE), ("merged_run", RETAIN)])
def test_down_projection_avoids_stored_subspace(which, kind, request):
    method = request.getfixturevalue(which)["method"]
    kinds = set()
    for entry in method.log[1:]:
        for key, B in entry["down"].items():
            mem = entry["memory"][key]
            kinds.add(mem.kind)
            B = B.double()
            assert B.abs().max() > 0.1  # a real projection, not a zero matrix
            if mem.kind == REMOVE:
                assert (mem.basis.t() @ B.t()).abs().max() < 1e-5
            else:  # lies in the retained complement
                assert (B.t() - mem.basis @ (mem.basis.t() @ B.t())).abs().max() < 1e-5
            # whatever the representation: orthogonal to the protected subspace
            assert (mem.protected_basis().t() @ B.t()).abs().max() < 1e-5
    assert kind in kinds


# -- interference-free -------------------------------------------------------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_interference_free_outputs_on_protected_inputs(kept_run):
    method, snaps = kept_run["method"], kept_run["snaps"]
    for t in (0, 1):
        before = snaps[t]
        after = _probe_outputs(method, before["in"])  # after all later tasks
        changed = _probe_outputs(method, before["any"])
        for name in method.sites:
            assert _rel(after[name], before["out_in"][name]) < 1e-4, (t, name)
            # the layer did learn: generic inputs' outputs moved (so the check above can fail)
            assert _rel(changed[name], before["out_any"][name]) > 1e-3, (t, name)


def test_interference_free_with_merged_retain_memories(merged_run):
    method, snaps = merged_run["method"], merged_run["snaps"]
    assert {m.kind for m in method.log[1]["memory"].values()} == {RETAIN}
    after = _probe_outputs(method, snaps[0]["in"])
    for name in method.sites:
        assert _rel(after[name], snaps[0]["out_in"][name]) < 1e-4, name
    assert all(len(s.branches) == 0 for s in method.sites.values())  # merged into the base weights


def test_only_the_current_up_projection_trains(kept_run):
    method, snaps = kept_run["method"], kept_run["snaps"]
    for name, site in method.sites.items():
        assert len(site.branches) == 3
        for t, branch in enumerate(site.branches):
            key = method.site_input[name]
            torch.testing.assert_close(branch.A.detach(), method.log[t]["down"][key])  # B_t never trains
            for later in range(t, 3):  # A_t frozen once its task is over
                torch.testing.assert_close(branch.B.detach(), snaps[later]["branches"][name][t][1])
    groups = method.param_groups(model=kept_run["model"], ctx=None)
    assert [id(p) for g in groups for p in g["params"]] == [id(s.branches[-1].B) for s in method.sites.values()]


# -- DualGPM memory --------------------------------------------------------------------------------------

def _cov(energies: list[float], basis: torch.Tensor) -> torch.Tensor:
    """A covariance whose singular values are ``energies`` along the columns of ``basis``."""
    return basis[:, : len(energies)] @ torch.diag(torch.tensor(energies, dtype=torch.float64)) @ \
        basis[:, : len(energies)].t()


def _orthonormal(M: torch.Tensor) -> bool:
    return torch.allclose(M.t() @ M, torch.eye(M.shape[1], dtype=M.dtype), atol=1e-10)


def test_threshold_schedule():
    assert threshold(0, 10, 0.95, 1.0) == pytest.approx(0.95)
    assert threshold(9, 10, 0.95, 1.0) == pytest.approx(0.995)
    assert threshold(2, 5, 0.98, 1.0) == pytest.approx(0.988)


def test_first_task_keeps_the_official_prefix():
    e = torch.eye(8, dtype=torch.float64)
    C = _cov([3.0, 2.0, 1.0, 0.5, 0.1], e)  # energy ratios follow s^2
    mem = dualgpm_update(None, C, 0.95)
    s2 = np.array([9.0, 4.0, 1.0, 0.25, 0.01]) / 14.26
    k = int((np.cumsum(s2) < 0.95).sum())
    assert mem.kind == REMOVE and mem.basis.shape == (8, k) and k == 2
    # official rule: the largest prefix strictly below eps; one more direction would reach eps
    assert mem.captured_energy(C) == pytest.approx(np.cumsum(s2)[k - 1])
    assert mem.captured_energy(C) < 0.95 <= np.cumsum(s2)[k]


def test_memory_keeps_eps_energy_and_switches_at_half_d():
    d = 8
    Q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    mem = dualgpm_update(None, _cov([4.0, 2.0, 1.0, 0.01], Q), 0.96)
    assert mem.kind == REMOVE and mem.basis.shape[1] == 2
    # a second task exactly filling d/2 columns stays "remove" (the official switch is strictly > d/2)
    C2 = _cov([0, 0, 0, 0, 3.0, 1.0], Q) + 0.5 * _cov([1.0], Q)
    mem2 = dualgpm_update(mem, C2, 0.95)
    assert mem2.kind == REMOVE and mem2.basis.shape[1] == d // 2 and _orthonormal(mem2.basis)
    assert mem2.captured_energy(C2) >= 0.95
    # a third task pushing it past d/2 switches to "retain": the stored basis is the complement
    C3 = _cov([0, 0, 0, 0, 0, 0, 2.0, 0.1], Q)
    mem3 = dualgpm_update(mem2, C3, 0.96)
    assert mem3.kind == RETAIN and mem3.basis.shape[1] < d / 2 and _orthonormal(mem3.basis)
    assert mem3.basis.shape[1] == d - 5
    assert (mem3.basis.t() @ mem2.basis).abs().max() < 1e-10  # the old protected space stays protected
    assert mem3.captured_energy(C3) >= 0.96
    # "retain" update: energy in the free directions removes them from the complement basis
    C4 = _cov([0, 0, 0, 0, 0, 0, 0, 1.0], Q) + _cov([2.0], Q)
    mem4 = dualgpm_update(mem3, C4, 0.97)
    assert mem4.kind == RETAIN and mem4.basis.shape[1] == d - 6 and _orthonormal(mem4.basis)
    assert mem4.captured_energy(C4) >= 0.97
    assert (mem4.basis.t() @ mem3.protected_basis()).abs().max() < 1e-10
    # a task inside the protected space changes nothing (official "skip updating")
    mem5 = dualgpm_update(mem4, _cov([1.0, 1.0], Q), 0.99)
    assert torch.equal(mem5.basis, mem4.basis)


def test_first_task_past_half_d_stores_the_complement():
    d = 8
    e = torch.eye(d, dtype=torch.float64)
    s = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95]  # near-flat energy over 6 directions: 5 kept at eps 0.95
    C = _cov(s, e)
    mem = dualgpm_update(None, C, 0.95)
    assert mem.kind == RETAIN and mem.basis.shape == (d, 3)
    assert (mem.basis.t() @ e[:, :5]).abs().max() < 1e-10  # the complement of the 5 kept directions
    s2 = np.array(s) ** 2
    assert mem.captured_energy(C) == pytest.approx(s2[:5].sum() / s2.sum())


def test_memory_energy_in_the_real_run(kept_run, merged_run):
    for run, lb in ((kept_run, 0.95), (merged_run, 0.9999)):
        method = run["method"]
        T = len(method.log)
        for t in range(1, T):
            eps = threshold(t, T, lb, 1.0)
            for key, C in method.log[t]["covs"].items():
                mem = method.memory[key] if t == T - 1 else method.log[t + 1]["memory"][key]
                assert mem.captured_energy(C) >= eps - 1e-9, (t, key)


# -- params, registration and resume ------------------------------------------------------------------------

def test_registered_with_official_defaults_and_presets():
    info = discover(strict=False).get("inflora")
    p = info.cls.Params()
    assert (p.rank, p.lambda_b, p.lambda_e, p.targets) == (10, 0.95, 1.0, ["k", "v"])
    assert p.down_scale == pytest.approx(S3)
    assert info.cls.Params(preset="imagenet_r").lambda_b == 0.98
    dn = info.cls.Params(preset="domainnet")
    assert (dn.rank, dn.lambda_b) == (30, 0.95)
    assert info.cls.Params(preset="domainnet", rank=8).rank == 8  # explicit values win over the preset
    with pytest.raises(ValueError):
        info.cls.Params(preset="cifar10")
    with pytest.raises(ValueError):
        info.cls.Params(lambda_b=0.99, lambda_e=0.9)


def test_resume_from_method_state_matches_the_uninterrupted_run(kept_run, tmp_path):
    snap = kept_run["snaps"][1]  # checkpoint after task 1 of 3
    path = tmp_path / "ckpt.pt"
    torch.save({"model": snap["model"], "method": snap["method_state"]}, path)
    ckpt = torch.load(path, weights_only=True)
    stream, cfg = kept_run["stream"], kept_run["cfg"]
    model = tiny_model(seed=0)
    for t in range(2):
        model.add_head(len(stream.tasks[t].classes))
    method = InfLoRA({"rank": RANK, "merge": False})
    ctx = TaskContext(task=2, num_tasks=3, classes=(), seen_classes=(), device=torch.device("cpu"), seed=0,
                      loader=lambda **kw: iter(()))
    method.configure_model(model, ctx)
    method.load_method_state(model, ckpt["method"], ctx)
    model.load_state_dict(ckpt["model"])  # strict: the rebuilt branches match the checkpoint
    old = kept_run["method"].log[2]["memory"]
    for k, m in method.memory.items():
        assert m.kind == old[k].kind and torch.equal(m.basis, old[k].basis)
    loop = snap["loop"]
    state = run_stream(model, stream, run_manager(method), cfg, 0,
                       LoopOptions(state=LoopState(loop.next_task, loop.R.copy(), loop.R_til.copy())))
    np.testing.assert_array_equal(state.R, kept_run["state"].R)
