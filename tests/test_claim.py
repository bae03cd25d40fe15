"""The claim interventions (issue 24): a finished task's update U S V^T re-expressed with a new spectrum.

Checked against dense SVDs: ``flat`` keeps both singular subspaces and the Frobenius norm and makes the spectrum
flat; ``norm: nuclear`` keeps the nuclear norm instead; ``sharpen`` raises top1_share; the lora plugin merges the
intervened update and reports that same update for the spectra; ``keep`` leaves IncLoRA untouched.
"""

from __future__ import annotations

import pytest
import torch
from clbench_plugins.lora import NaiveLoRA
from pydantic import ValidationError

from clbench.model.lora import LowRank
from clbench.model.spectra import reshape_spectrum, singular_values, top1_share
from clbench.testing import run_method, tiny_model


def _update(d_out: int = 48, d_in: int = 40, r: int = 4, rank: int | None = None, seed: int = 0) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5, 0.1][:r],
                                                                               dtype=torch.float64)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    if rank is not None:  # rank-deficient: the last r - rank columns of B repeat the first
        B[:, rank:] = B[:, :1]
    return LowRank(B, A)


def _projectors(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :k] @ U[:, :k].T, Vh[:k].T @ Vh[:k]


@pytest.mark.parametrize("rank", [None, 2])
def test_flat_keeps_subspaces_and_frobenius_norm_and_flattens(rank):
    u = _update(rank=rank)
    W = u.dense()
    k = int(torch.linalg.matrix_rank(W))
    new = reshape_spectrum(u, "flat")
    W2 = new.dense()
    s = torch.linalg.svdvals(W2)
    assert torch.allclose(torch.linalg.matrix_norm(W2), torch.linalg.matrix_norm(W), rtol=1e-10)
    assert (s[:k].max() - s[:k].min()) / s[0] < 1e-6  # flat on the update's rank
    assert s[k:].abs().max() < 1e-9 * s[0] if s.numel() > k else True  # and no new direction
    Pu, Pv = _projectors(W, k)
    Pu2, Pv2 = _projectors(W2, k)
    assert torch.allclose(Pu, Pu2, atol=1e-8) and torch.allclose(Pv, Pv2, atol=1e-8)
    assert not torch.allclose(W, W2, atol=1e-3)  # the spectrum really changed


def test_flat_nuclear_keeps_the_nuclear_norm():
    u = _update()
    W = u.dense()
    new = reshape_spectrum(u, "flat", norm="nuclear")
    s, s0 = torch.linalg.svdvals(new.dense())[:4], torch.linalg.svdvals(W)[:4]
    assert torch.allclose(s.sum(), s0.sum(), rtol=1e-10)
    assert (s.max() - s.min()) / s[0] < 1e-6
    assert torch.linalg.matrix_norm(new.dense()) < torch.linalg.matrix_norm(W)  # equal nuclear, smaller Frobenius


def test_sharpen_raises_top1_share_with_the_same_norm_and_subspaces():
    u = _update()
    W = u.dense()
    new = reshape_spectrum(u, "sharpen", power=2.0)
    s0, s = singular_values(u), singular_values(new)
    assert top1_share(s) > top1_share(s0) + 0.01
    assert torch.allclose(s, s0 ** 2 * s0.norm() / (s0 ** 2).norm(), rtol=1e-8)
    Pu, Pv = _projectors(W, 4)
    Pu2, Pv2 = _projectors(new.dense(), 4)
    assert torch.allclose(Pu, Pu2, atol=1e-8) and torch.allclose(Pv, Pv2, atol=1e-8)


def _incLoRA(**params) -> tuple[NaiveLoRA, torch.nn.Module]:
    model = tiny_model()
    method = NaiveLoRA({"rank": 3, "targets": ["q", "v"], "fresh_per_task": True, **params})
    method.configure_model(model, None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for site in method.sites.values():
            site.branches[-1].B.copy_(torch.randn(site.branches[-1].B.shape, generator=g) * 0.1)
    return method, model


@pytest.mark.parametrize("spectrum,norm", [("flat", "frobenius"), ("flat", "nuclear"), ("sharpen", "frobenius")])
def test_plugin_merges_and_reports_the_intervened_update(spectrum, norm):
    method, model = _incLoRA(spectrum=spectrum, norm=norm, alpha=6.0)  # scale 2: B stores B' / scale
    before = {n: s.branches[-1].lowrank() for n, s in method.sites.items()}
    weights = {n: s.weight.detach().clone() for n, s in method.sites.items()}
    method.merge_task(model, None)
    reported = method.task_updates(model, None)
    for name, site in method.sites.items():
        assert len(site.branches) == 0
        expected = reshape_spectrum(before[name], spectrum, norm=norm).dense()
        merged = site.weight.detach() - weights[name]
        assert torch.allclose(merged, expected, atol=1e-5)
        assert torch.allclose(reported[name].dense(), expected, atol=1e-6)
    s_before = singular_values(next(iter(before.values())))
    s_after = singular_values(next(iter(reported.values())))
    if spectrum == "flat":
        assert (s_after.max() - s_after.min()) / s_after.max() < 1e-6
    else:
        assert top1_share(s_after) > top1_share(s_before)


def test_keep_merges_the_trained_update_unchanged():
    method, model = _incLoRA()
    before = {n: s.branches[-1].lowrank() for n, s in method.sites.items()}
    weights = {n: s.weight.detach().clone() for n, s in method.sites.items()}
    method.merge_task(model, None)
    for name, site in method.sites.items():
        assert torch.equal(site.weight.detach(), weights[name] + before[name].dense().to(weights[name].dtype))


def test_intervention_runs_through_the_loop_and_spectra_are_flat():
    run = run_method(NaiveLoRA({"rank": 2, "targets": ["v"], "fresh_per_task": True, "spectrum": "flat"}))
    for result in run.results:
        for u in result.updates.values():
            s = singular_values(u)
            assert (s.max() - s.min()) / s.max() < 1e-5


def test_intervention_without_fresh_per_task_is_rejected():
    with pytest.raises(ValidationError, match="fresh_per_task"):
        NaiveLoRA.Params(spectrum="flat")
    with pytest.raises(ValidationError):
        NaiveLoRA.Params(fresh_per_task=True, spectrum="sharpen", power=0.5)


def _group(values: dict[str, dict[int, tuple[float, float]]]):
    from clbench import keys
    from clbench.analysis.leaderboard import METRIC_KEYS, Group, Row, stat

    def metrics(per_seed):
        cols = {keys.FINAL_FORGETTING: [f for f, _ in per_seed.values()],
                keys.FINAL_ACC: [a for _, a in per_seed.values()]}
        return {k: stat(cols.get(k, [])) for k in METRIC_KEYS}

    rows = [Row(method=label, method_name="lora", params_id="x", n=len(per_seed), seeds=list(per_seed),
                metrics=metrics(per_seed), provenance={k: [] for k in ("version", "git_sha", "device")}, runs=[{"run_id": f"{label}{s}", "seed": s,
                                      "values": {keys.FINAL_FORGETTING: f, keys.FINAL_ACC: a}}
                                     for s, (f, a) in per_seed.items()])
            for label, per_seed in values.items()]
    return Group("claim", ["claim"], "h", rows, [])


def test_claim_effects_are_paired_by_seed_against_keep():
    from scipy.stats import ttest_rel

    from clbench import keys
    from clbench.analysis.claim import claim_effects, claim_metrics, plot_forgetting_by_intervention

    keep = {0: (40.0, 30.0), 1: (50.0, 28.0), 2: (45.0, 31.0), 3: (41.0, 29.0)}
    flat = {1: (44.0, 29.0), 0: (35.0, 31.0), 2: (42.0, 30.0), 3: (37.0, 30.5), 7: (0.0, 99.0)}  # seed 7: unpaired
    effects = claim_effects(_group({"keep": keep, "flat": flat}))
    eff = effects["flat"]["forgetting"]
    assert eff.n == 4 and eff.diff == pytest.approx(-4.5)
    assert eff.p == pytest.approx(ttest_rel([35, 44, 42, 37], [40, 50, 45, 41]).pvalue)
    m = claim_metrics(effects)
    assert m[keys.claim_key("flat", "forgetting", "diff")] == pytest.approx(-4.5)
    assert {"claim/flat/forgetting_diff", "claim/flat/forgetting_diff_ci95", "claim/flat/forgetting_diff_p",
            "claim/flat/forgetting_diff_n", "claim/flat/acc_diff", "claim/flat/acc_diff_p"} <= set(m)
    assert plot_forgetting_by_intervention(_group({"keep": keep, "flat": flat}))
    assert claim_effects(_group({"lora": keep, "flat": flat})) == {}  # no reference entry: not a claim suite


def test_layer_points_pair_later_updates_with_earlier_forgetting():
    import numpy as np

    from clbench.analysis.claim import layer_points

    R = np.array([[90, 0, 0], [60, 80, 0], [50, 40, 70]], dtype=float)
    top1 = np.array([[0.3, 0.5], [0.6, 0.8], [1.0, 0.4]])
    pts = layer_points(R, top1)
    # task 0 forgot 90 - 50 = 40 under tasks 1, 2; task 1 forgot 80 - 40 = 40 under task 2
    assert np.allclose(pts, [(0.8, 40.0), (0.6, 40.0), (1.0, 40.0), (0.4, 40.0)])


def test_leaderboard_text_shows_the_claim_answer_from_claim_effects():
    """`clbench leaderboard suites/claim.yaml` answers the claim: each arm's paired difference against keep, the
    same Paired numbers the parent run logs (claim_effects), with interval and p."""
    from clbench.analysis.claim import claim_effects
    from clbench.analysis.report import render

    keep = {0: (40.0, 30.0), 1: (50.0, 28.0), 2: (45.0, 31.0), 3: (41.0, 29.0)}
    flat = {1: (44.0, 29.0), 0: (35.0, 31.0), 2: (42.0, 30.0), 3: (37.0, 30.5)}
    group = _group({"keep": keep, "flat": flat})
    eff = claim_effects(group)["flat"]["forgetting"]
    text = render([group], "table")
    [line] = [x for x in text.splitlines() if x.startswith("flat ")]
    from clbench.analysis.stats import fmt_p

    assert 0.001 <= eff.p < 0.01 and f"{eff.diff:+.2f} ± {eff.ci95:.2f} (p={eff.p:.3f}, n=4)" in line
    assert fmt_p(eff.p) in line
    assert "each arm minus keep, paired by seed" in text
    assert "each arm minus keep" in render([group], "markdown")
    assert "each arm minus keep" not in render([_group({"lora": keep, "flat": flat})], "table")
