"""EBLoRA: the factors stay on the (restricted) Stiefel manifolds after every step, every task's update has a
flat spectrum, the diagonal-S ablation does not, the gradient-SVD init equals a dense-SVD reference, the GPM
update keeps the energy threshold, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from clbench_plugins.eblora import EBLoRA, gpm_update, gradient_svd_init

from clbench.errors import ClbenchError
from clbench.methods.context import TaskContext
from clbench.methods.hookspecs import hookimpl
from clbench.methods.registry import discover
from clbench.model.spectra import singular_values
from clbench.testing import run_method, tiny_model, tiny_stream

FAST = {"rank": 4, "grad_fraction": 0.5, "probe_steps": 20}


def _ctx(task: int = 0) -> TaskContext:
    return TaskContext(task=task, num_tasks=2, classes=(0, 1), seen_classes=(0, 1), device=torch.device("cpu"),
                       seed=0, loader=lambda **kw: iter(()))


def _stream():
    return tiny_stream(num_tasks=2, num_classes=4, samples_per_class=12)


class Checked(EBLoRA):
    """EBLoRA recording the worst constraint violation after every optimizer step."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.worst = {"BtB": 0.0, "AAt": 0.0, "AF": 0.0}
        self.steps = 0
        self.steps_with_f = 0
        self.sv: list[dict[str, float]] = []  # per task: |s| alpha / r of every site, read before merging

    @hookimpl
    def after_task(self, model, ctx):
        self.sv.append({n: abs(float(b.gain.detach().flatten()[0])) * b.scale for n, b in self._live.items()})
        super().after_task(model, ctx)

    @hookimpl
    def after_optimizer_step(self, model, ctx):
        super().after_optimizer_step(model, ctx)
        self.steps += 1
        for name, b in self._live.items():
            B, A = b.B.detach().double(), b.A.detach().double()
            r = B.shape[1]
            self.worst["BtB"] = max(self.worst["BtB"], float((B.t() @ B - torch.eye(r)).abs().max()))
            self.worst["AAt"] = max(self.worst["AAt"], float((A @ A.t() - torch.eye(r)).abs().max()))
            F = self.F.get(name)
            if self.params.use_f and F is not None and F.shape[1]:
                self.worst["AF"] = max(self.worst["AF"], float((A @ F.double()).abs().max()))
                self.steps_with_f += 1


def test_registered_under_both_names_with_official_defaults():
    reg = discover([])
    assert reg.get("eblora").cls is EBLoRA and reg.get("spectral_balancing").cls is EBLoRA
    p = EBLoRA.Params()
    assert (p.rank, p.grad_fraction, p.energy, p.weight_decay, p.gain, p.use_f, p.grad_init) == \
        (16, 0.2, 0.99, 0.1, "scalar", True, True)
    assert EBLoRA().scale == 2.0  # alpha = 2r


@pytest.mark.parametrize("params", [{}, {"use_f": False, "grad_init": False}], ids=["default", "bare_flat"])
def test_constraints_hold_after_every_step_and_updates_are_flat(params):
    method = Checked({**FAST, **params})
    run = run_method(method, stream=_stream(), epochs=2, batch_size=8)
    assert method.steps > 0
    assert method.worst["BtB"] < 1e-5 and method.worst["AAt"] < 1e-5
    if method.params.use_f:
        assert method.steps_with_f > 0, "the second task must train under a non-empty F"
        assert method.worst["AF"] < 1e-5
        assert all(v >= 0.99 for v in method.kept_energy.values())
    for res, sv in zip(run.results, method.sv):
        assert res.updates and set(res.updates) == set(sv)
        for name, u in res.updates.items():
            s = singular_values(u)
            assert s.numel() == 4 and sv[name] > 0
            assert torch.allclose(s, torch.full_like(s, sv[name]), rtol=1e-4), (name, s, sv[name])


def test_diagonal_s_ablation_is_not_flat_on_a_one_direction_task():
    """Fit one site to a target update dominated by one direction: a learnable diagonal S follows the target's
    imbalance, the scalar s keeps every singular value equal."""
    torch.manual_seed(0)
    d = 32
    U, _ = torch.linalg.qr(torch.randn(d, d))
    V, _ = torch.linalg.qr(torch.randn(d, d))
    target = U[:, :4] @ torch.diag(torch.tensor([4.0, 0.4, 0.2, 0.1])) @ V[:, :4].t()
    x = torch.randn(256, d)
    shares = {}
    for gain in ("scalar", "vector"):
        torch.manual_seed(1)
        method = Checked({"rank": 4, "targets": ["q"], "blocks": [0], "gain": gain, "grad_init": False,
                          "use_f": False})
        model = tiny_model()
        method.configure_model(model=model, ctx=_ctx())
        method.before_task(model=model, ctx=_ctx())
        opt = torch.optim.AdamW(method.param_groups(model=model, ctx=_ctx()), lr=2e-2)
        (branch,) = method._live.values()
        for _ in range(150):
            loss = Fn.mse_loss(branch(x), x @ target.t())
            opt.zero_grad()
            loss.backward()
            method.before_optimizer_step(model=model, ctx=_ctx())
            opt.step()
            method.after_optimizer_step(model=model, ctx=_ctx())
        s = singular_values(branch.lowrank())
        shares[gain] = float(s[0] ** 2 / (s ** 2).sum())
        assert method.worst["BtB"] < 1e-5 and method.worst["AAt"] < 1e-5
    assert shares["scalar"] == pytest.approx(0.25, abs=1e-4)
    assert shares["vector"] > 0.6, shares


def test_gradient_svd_init_equals_dense_reference_on_a_small_layer():
    """Second task (F non-empty): the mean full-weight gradient equals an independent autograd computation
    through the untrained head, and B A equals V_r U_r^T of the dense SVD of (I - F F^T) G^T."""
    seen = {}

    class Probe(EBLoRA):
        @hookimpl
        def before_task(self, model, ctx):
            if ctx.task == 1:
                weights = {n: s.base_weight for n, s in self.sites.items()}
                for w in weights.values():
                    w.requires_grad_(True)
                xs, ys = zip(*ctx.loader(fraction=self.params.grad_fraction))
                x, y = torch.cat(xs), torch.cat(ys)
                model.eval()
                loss = Fn.cross_entropy(model(x, head=1), y)
                grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values()))))
                for w in weights.values():
                    w.requires_grad_(False)
                seen["ref_G"] = {n: grads[n][s.rows] for n, s in self.sites.items()}
                seen["G"] = self.mean_gradients(model, ctx, model.heads[1])
                seen["F"] = {n: f.clone() for n, f in self.F.items()}
            super().before_task(model, ctx)
            if ctx.task == 1:
                seen["BA"] = {n: (b.B @ b.A).detach() for n, b in self._live.items()}

    method = Probe({**FAST, "init_head": "untrained", "subspace_gradient": "pre"})
    run_method(method, stream=_stream(), epochs=1, batch_size=8)
    assert any(f.shape[1] for f in seen["F"].values())
    for name, G_ref in seen["ref_G"].items():
        assert torch.allclose(seen["G"][name], G_ref, atol=1e-6, rtol=1e-4), name
        F = seen["F"][name].double()
        M = G_ref.t().double() - F @ (F.t() @ G_ref.t().double())
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        r = method.params.rank
        assert float(S[r - 1] / S[r]) > 1.05, "test needs a spectral gap at r"
        ref = Vh[:r].t() @ U[:, :r].t()  # B A = V_r U_r^T, sign-free
        assert float((seen["BA"][name].double() - ref).abs().max()) < 1e-4, name


def test_gradient_svd_init_function_matches_dense_svd():
    g = torch.Generator().manual_seed(3)
    d_out, d_in, r = 24, 40, 5
    G = torch.randn(d_out, 8, generator=g) @ torch.diag(torch.logspace(1, -1, 8)) @ torch.randn(8, d_in, generator=g)
    F, _ = torch.linalg.qr(torch.randn(d_in, 6, generator=g))
    B, A = gradient_svd_init(G, F, r)
    M = (G.t() - F @ (F.t() @ G.t())).double()
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    assert torch.allclose((B @ A).double(), Vh[:r].t() @ U[:, :r].t(), atol=1e-5)
    assert float((A @ F).abs().max()) < 1e-6
    assert torch.allclose(A @ A.t(), torch.eye(r), atol=1e-5) and torch.allclose(B.t() @ B, torch.eye(r), atol=1e-5)


def test_gpm_update_keeps_the_energy_threshold_and_extends_f():
    g = torch.Generator().manual_seed(0)
    d_out, d_in = 30, 48
    spectrum = torch.logspace(0, -3, d_out)
    G1 = torch.randn(d_out, d_out, generator=g) @ torch.diag(spectrum) @ torch.randn(d_out, d_in, generator=g)
    F1, kept1 = gpm_update(G1, None, 0.99)
    M1 = G1.t().double()

    def energy(F, M):
        return float((F.double().t() @ M).pow(2).sum() / M.pow(2).sum())

    assert kept1 >= 0.99 and energy(F1, M1) == pytest.approx(kept1)
    assert energy(F1[:, :-1], M1) < 0.99, "the smallest k reaching the threshold"
    G2 = torch.randn(d_out, d_out, generator=g) @ torch.diag(spectrum) @ torch.randn(d_out, d_in, generator=g)
    F2, kept2 = gpm_update(G2, F1, 0.99)
    assert F2.shape[1] > F1.shape[1] and torch.equal(F2[:, : F1.shape[1]], F1)
    assert kept2 >= 0.99 and energy(F2, G2.t().double()) >= 0.99
    assert torch.allclose(F2.t() @ F2, torch.eye(F2.shape[1]), atol=1e-5)
    F3, _ = gpm_update(G2, F1, 0.99, max_k=F1.shape[1] + 1)
    assert F3.shape[1] == F1.shape[1] + 1


def test_method_state_resumes_f():
    method = EBLoRA({**FAST, "subspace_gradient": "pre"})
    run_method(method, stream=_stream(), epochs=1, batch_size=8)
    buf = io.BytesIO()
    torch.save(method.method_state(ctx=_ctx(1)), buf)
    buf.seek(0)
    fresh = EBLoRA({**FAST, "subspace_gradient": "pre"})
    model = tiny_model()
    fresh.configure_model(model=model, ctx=_ctx())
    fresh.load_method_state(model=model, state=torch.load(buf, weights_only=True), ctx=_ctx(1))
    assert method.F and set(fresh.F) == set(method.F)
    assert all(torch.equal(fresh.F[n], method.F[n]) for n in method.F)


def test_rank_larger_than_a_site_is_a_clear_error():
    with pytest.raises(ClbenchError, match="rank 64 exceeds"):
        EBLoRA({"rank": 64}).configure_model(model=tiny_model(), ctx=_ctx())


def test_resumed_run_matches_an_uninterrupted_one():
    """Checkpoint after task 0 (model state dict + method_state through torch.save, weights_only) and resume:
    the accuracy matrix and the second task's update equal the uninterrupted run's."""
    from clbench.methods.registry import run_manager
    from clbench.run.checkpoint import rng_state
    from clbench.run.loop import LoopOptions, LoopState, run_stream
    from clbench.testing import tiny_train

    stream, params, cfg = _stream(), {**FAST, "subspace_gradient": "pre"}, tiny_train(batch_size=8)
    saved = {}

    def keep(res, state, model):
        ref_results.append(res)
        if res.task == 0:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "method": state.method_state, "rng": rng_state()}, buf)
            saved["ck"], saved["R"], saved["R_til"] = buf.getvalue(), state.R.copy(), state.R_til.copy()

    ref_results = []
    ref = run_stream(tiny_model(), stream, run_manager(EBLoRA(params)), cfg, 0, LoopOptions(on_task=keep))
    ck = torch.load(io.BytesIO(saved["ck"]), weights_only=True)
    resumed_results = []
    state = LoopState(next_task=1, R=saved["R"], R_til=saved["R_til"], method_state=ck["method"],
                      model_state=ck["model"], rng=ck["rng"])
    out = run_stream(tiny_model(seed=5), stream, run_manager(EBLoRA(params)), cfg, 0,
                     LoopOptions(on_task=lambda res, s, m: resumed_results.append(res), state=state))
    np.testing.assert_array_equal(out.R, ref.R)
    for name, u in ref_results[-1].updates.items():
        v = resumed_results[-1].updates[name]
        assert torch.allclose(u.B, v.B, atol=1e-6) and torch.allclose(u.A, v.A, atol=1e-6)


def test_default_step_size_is_the_official_relative_step():
    """grad_scaling = official_step: c = r (0.2048 / lr)^2 / d, so the predicted first-step relative change of a
    d x r frame, lr sqrt(c d / r), is the official UCIT one (lr 2e-4, c = d = 4096, r = 16) whatever d and lr."""
    from clbench_plugins.eblora import OFFICIAL_STEP

    assert EBLoRA.Params().grad_scaling == "official_step" and EBLoRA.Params().subspace_gradient == "pre"
    assert OFFICIAL_STEP == pytest.approx(0.2048)
    for d, r, lr in ((768, 10, 5e-4), (64, 4, 5e-3), (4096, 16, 2e-4)):
        m = EBLoRA({"rank": r})
        m.width, m.lr = d, lr
        c = m.grad_scaling_c()
        assert lr * math.sqrt(c * d / r) == pytest.approx(0.2048, rel=1e-12)
        assert m.rescale == pytest.approx(math.sqrt(c / r), rel=1e-12)
    m = EBLoRA({"rank": 16})
    m.width, m.lr = 4096, 2e-4
    assert m.grad_scaling_c() == pytest.approx(4096.0)  # the official constant at the official setting
    m = EBLoRA({"rank": 4, "grad_scaling": "width"})
    m.width, m.lr = 64, 5e-3
    assert m.grad_scaling_c() == 64.0 and EBLoRA({"rank": 4, "grad_scaling": 0}).rescale == 1.0
