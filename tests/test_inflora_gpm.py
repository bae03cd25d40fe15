"""InfLoRA's plain-GPM memory (``memory: gpm``, the official ``update_GPM`` of the DomainNet model): the update
grows an orthonormal "remove" basis only by directions of the residual ``C - M M^T C``, stops as soon as the
protected energy share reaches the threshold (and not one direction earlier), agrees with a line-by-line numpy
transcription of the official function, and InfLoRA run with it designs B_t orthogonal to the stored basis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from clbench_plugins.inflora import REMOVE, InfLoRA, Memory, dualgpm_update, gpm_update

from clbench.methods.hookspecs import hookimpl
from clbench.methods.registry import discover, run_manager
from clbench.run.loop import run_stream
from clbench.run.runner import plan_runs
from clbench.suite import load_suite
from clbench.testing import tiny_model, tiny_stream, tiny_train

REPRO = Path(__file__).resolve().parents[1] / "suites" / "repro"


def _cov(energies: list[float], basis: torch.Tensor) -> torch.Tensor:
    """A symmetric PSD covariance with singular values ``energies`` along the columns of ``basis``."""
    B = basis[:, : len(energies)]
    return B @ torch.diag(torch.tensor(energies, dtype=torch.float64)) @ B.t()


def _orthonormal(M: torch.Tensor, tol: float = 1e-10) -> bool:
    return bool((M.t() @ M - torch.eye(M.shape[1], dtype=M.dtype)).abs().max() < tol)


def _projector(M: torch.Tensor) -> torch.Tensor:
    return M @ M.t()


def official_update_gpm(feature_list: list[np.ndarray], mat_list: list[np.ndarray], threshold: float) -> None:
    """``update_GPM`` of methods/inflora_domain.py (github.com/liangyanshuo/InfLoRA@e08b00e), transcribed with
    its control flow unchanged (numpy SVDs, in place on ``feature_list``), prints removed."""
    if len(feature_list) == 0:
        for activation in mat_list:
            U, S, _ = np.linalg.svd(activation, full_matrices=False)
            sval_ratio = (S ** 2) / (S ** 2).sum()
            r = np.sum(np.cumsum(sval_ratio) < threshold)
            feature_list.append(U[:, 0:max(r, 1)])
        return
    for i, activation in enumerate(mat_list):
        _, S1, _ = np.linalg.svd(activation, full_matrices=False)
        sval_total = (S1 ** 2).sum()
        act_hat = activation - feature_list[i] @ feature_list[i].T @ activation
        U, S, _ = np.linalg.svd(act_hat, full_matrices=False)
        sval_hat = (S ** 2).sum()
        sval_ratio = (S ** 2) / sval_total
        accumulated_sval = (sval_total - sval_hat) / sval_total
        r = 0
        for ii in range(sval_ratio.shape[0]):
            if accumulated_sval < threshold:
                accumulated_sval += sval_ratio[ii]
                r += 1
            else:
                break
        if r == 0:
            continue
        Ui = np.hstack((feature_list[i], U[:, 0:r]))
        feature_list[i] = Ui[:, 0:Ui.shape[0]] if Ui.shape[1] > Ui.shape[0] else Ui


# -- the update on hand-made covariances ------------------------------------------------------------------

def test_hand_computed_small_case():
    e = torch.eye(4, dtype=torch.float64)
    # task 0: s = (3, 2, 1, 0.5), s^2 shares 9, 4, 1, 0.25 over 14.25: cumulative 0.632, 0.912, 0.982, 1;
    # two of them stay strictly below eps = 0.95 -> M = [e1, e2] (captured 13 / 14.25 = 0.912 < eps: official)
    m0 = gpm_update(None, torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)), 0.95)
    assert m0.kind == REMOVE
    torch.testing.assert_close(_projector(m0.basis), _projector(e[:, :2]))
    # task 1: C = diag(1, 0, 2, 1), ||C||^2 = 6; residual diag(0, 0, 2, 1) holds 5 of it, so 1/6 is protected;
    # at eps 0.8 adding e3 (share 4/6) brings it to 5/6 >= 0.8: exactly one column, e3
    m1 = gpm_update(m0, torch.diag(torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=torch.float64)), 0.8)
    assert m1.basis.shape == (4, 3) and torch.equal(m1.basis[:, :2], m0.basis)  # the old columns stay
    torch.testing.assert_close(m1.basis[:, 2].abs(), e[:, 2])
    assert m1.captured_energy(torch.diag(torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=torch.float64))) == \
        pytest.approx(5 / 6)
    # task 2: C = diag(1, 1, 1, 0.1): protected share 3 / 3.01 = 0.9967 >= 0.99 -> official "skip updating"
    m2 = gpm_update(m1, torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64)), 0.99)
    assert torch.equal(m2.basis, m1.basis)
    # task 3: all energy on e4, nothing protected -> e4 joins; the basis fills the space (d columns, still
    # "remove": plain GPM never stores the complement), and a later task can add nothing
    m3 = gpm_update(m2, _cov([1.0], e[:, 3:]), 0.99)
    assert m3.kind == REMOVE and m3.basis.shape == (4, 4) and _orthonormal(m3.basis)
    m4 = gpm_update(m3, _cov([5.0, 1.0], torch.linalg.qr(torch.ones(4, 2, dtype=torch.float64))[0]), 0.999)
    assert torch.equal(m4.basis, m3.basis)


def test_first_task_keeps_the_prefix_below_eps_and_never_the_complement():
    d = 8
    e = torch.eye(d, dtype=torch.float64)
    s = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95]  # near-flat energy: 5 directions stay below eps = 0.95
    C = _cov(s, e)
    mem = gpm_update(None, C, 0.95)
    # past d/2 DualGPM stores the complement; plain GPM keeps the kept basis itself
    assert dualgpm_update(None, C, 0.95).kind == "retain"
    assert mem.kind == REMOVE and mem.basis.shape == (d, 5) and _orthonormal(mem.basis)
    torch.testing.assert_close(_projector(mem.basis), _projector(e[:, :5]))
    shares = np.cumsum(np.array(s) ** 2) / (np.array(s) ** 2).sum()
    assert mem.captured_energy(C) == pytest.approx(shares[4]) and shares[4] < 0.95 <= shares[5]


def _random_tasks(d: int, T: int, seed: int) -> list[torch.Tensor]:
    """Covariances of T tasks with decaying spectra in partly shared, partly new random directions."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=torch.float64))[0]
    covs = []
    for _ in range(T):
        own = torch.linalg.qr(torch.randn(d, 6, generator=g, dtype=torch.float64))[0]
        X = torch.cat([shared, own], 1) @ torch.diag(torch.tensor([3.0, 2, 1.5, 2.5, 1.2, 0.8, 0.5, 0.3, 0.1],
                                                                   dtype=torch.float64))
        noise = 1e-3 * torch.randn(d, d, generator=g, dtype=torch.float64)
        covs.append(X @ X.t() + noise @ noise.t())
    return covs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_growth_is_orthonormal_residual_and_stops_at_the_threshold(seed):
    d, T = 24, 5
    covs = _random_tasks(d, T, seed)
    mem = None
    grew = 0
    for t, C in enumerate(covs):
        eps = 0.9 + 0.1 * t / T
        new = gpm_update(mem, C, eps)
        assert new.kind == REMOVE and _orthonormal(new.basis)
        if mem is None:
            mem = new
            continue
        k = mem.basis.shape[1]
        assert torch.equal(new.basis[:, :k], mem.basis)  # old columns kept verbatim, in order
        added = new.basis[:, k:]
        before = mem.captured_energy(C)
        if before >= eps:
            assert added.shape[1] == 0  # skip: the criterion already holds
        else:
            grew += 1
            assert added.shape[1] >= 1
            assert (mem.basis.t() @ added).abs().max() < 1e-10  # orthogonal to the old basis
            # residual directions: inside the column space of C_hat = C - M M^T C
            U, S, _ = torch.linalg.svd(mem.project(C))
            R = U[:, S > 1e-9 * S[0]]
            assert (added - R @ (R.t() @ added)).abs().max() < 1e-8
            # the energy criterion: met with all added columns, not met with one fewer (the official stop)
            assert new.captured_energy(C) >= eps
            assert Memory(new.basis[:, :-1], REMOVE).captured_energy(C) < eps
            # and the directions taken are the residual's top ones, in order
            top = U[:, : added.shape[1]]
            torch.testing.assert_close(_projector(added), _projector(top), atol=1e-8, rtol=0)
        mem = new
    assert grew >= 2  # the checks above ran on real growth steps


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_official_update_gpm(seed):
    d, T = 16, 5
    covs = _random_tasks(d, T, seed)
    official: list[np.ndarray] = []
    mem = None
    for t, C in enumerate(covs):
        eps = 0.95 + 0.05 * t / T
        official_update_gpm(official, [C.numpy()], eps)
        mem = gpm_update(mem, C, eps)
        assert mem.basis.shape == official[0].shape, t  # the same number of columns at every task
        np.testing.assert_allclose(_projector(mem.basis).numpy(), official[0] @ official[0].T, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 3])
def test_gpm_and_dualgpm_protect_the_same_subspace(seed):
    # the two official updates share one criterion; DualGPM only changes the representation (a basis of the
    # complement past d/2), so the protected subspaces agree to rounding, also after "retain" updates
    d, T = 16, 6
    gpm = dual = None
    kinds = set()
    for t, C in enumerate(_random_tasks(d, T, seed)):
        eps = 0.95 + 0.05 * t / T
        gpm, dual = gpm_update(gpm, C, eps), dualgpm_update(dual, C, eps)
        kinds.add(dual.kind)
        assert gpm.basis.shape[1] == d - dual.basis.shape[1] if dual.kind == "retain" else dual.basis.shape[1]
        torch.testing.assert_close(_projector(gpm.basis), _projector(dual.protected_basis()), atol=1e-12, rtol=0)
    assert kinds == {"remove", "retain"}  # the comparison crossed DualGPM's switch


def test_no_zero_energy_directions_are_added():
    # eps = 1: after the residual's only direction the share is 1 up to rounding; whatever rounding does,
    # zero-energy directions (arbitrary, possibly inside the stored span) must not be appended
    d = 6
    Q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64))[0]
    mem = gpm_update(None, _cov([1.0], Q), 1.0 - 1e-9)
    assert mem.basis.shape[1] == 1
    C = _cov([1.0, 0.3], Q)
    new = gpm_update(mem, C, 1.0)
    assert new.basis.shape[1] == 2 and _orthonormal(new.basis)
    assert new.captured_energy(C) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="retain"):
        gpm_update(Memory(Q[:, :2], "retain"), C, 0.9)


# -- InfLoRA with memory: gpm ------------------------------------------------------------------------------

class Recording(InfLoRA):
    """Records, per task, the memory B_t was designed against and B_t."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.log: list[dict] = []

    @hookimpl
    def before_task(self, model, ctx):
        memory = {k: Memory(m.basis.clone(), m.kind) for k, m in self.memory.items()}
        super().before_task(model, ctx)
        self.log.append({"memory": memory, "down": {k: v.clone() for k, v in self.down.items()}})


@pytest.fixture(scope="module")
def gpm_run():
    """lambda_b close to 1: the memory passes d/2 (where DualGPM would switch to the complement)."""
    stream = tiny_stream(num_tasks=3, num_classes=6, samples_per_class=16, seed=0)
    model = tiny_model(seed=0)
    method = Recording({"rank": 4, "memory": "gpm", "lambda_b": 0.999, "lambda_e": 1.0})
    run_stream(model, stream, run_manager(method), tiny_train(epochs=1, lr=1e-2), 0)
    return method


def test_inflora_with_gpm_designs_b_t_orthogonal_to_the_stored_basis(gpm_run):
    method = gpm_run
    d = next(iter(method.memory.values())).dim
    assert all(m.kind == REMOVE for m in method.memory.values())
    assert max(m.basis.shape[1] for m in method.memory.values()) > d / 2  # past DualGPM's switch point
    for t in (1, 2):
        entry = method.log[t]
        for key, B in entry["down"].items():
            mem = entry["memory"][key]
            assert mem.kind == REMOVE
            B = B.double()
            free = d - mem.basis.shape[1]
            if free >= 4:  # a full-rank B_t exists in the free space: a real projection, not zeros
                assert B.abs().max() > 0.1
            assert (mem.basis.t() @ B.t()).abs().max() < 1e-5, (t, key)
        # the basis only grows: the previous one is a prefix of the next
        nxt = method.memory if t == 2 else method.log[t + 1]["memory"]
        for key, mem in entry["memory"].items():
            k = mem.basis.shape[1]
            assert torch.equal(nxt[key].basis[:, :k], mem.basis)


def test_memory_param_default_and_the_domainnet_repro_suite():
    info = discover(strict=False).get("inflora")
    assert info.cls.Params().memory == "dualgpm"
    assert info.cls.Params(preset="domainnet").memory == "dualgpm"  # a preset never picks the memory
    with pytest.raises(ValueError):
        info.cls.Params(memory="dual")
    for name in ("inflora-domainnet-5.yaml", "inflora-cifar100-10.yaml", "inflora-imagenet-r-10.yaml"):
        suite = load_suite(REPRO / name)
        [planned] = plan_runs(suite, REPRO / name, discover([]), None)
        assert planned.params.memory == ("gpm" if "domainnet" in name else "dualgpm"), name
        if "domainnet" in name:  # the official domainnet_inflora.json: rank 30, lamb 0.95, lame 1.0
            p = planned.params
            assert (p.rank, p.lambda_b, p.lambda_e, p.targets) == (30, 0.95, 1.0, ["k", "v"])
