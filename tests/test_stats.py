"""clbench.analysis.stats against scipy computed independently here, against Demšar 2006's worked example, and at the
edges (n < 2, zero variance, missing seeds, ties)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from clbench.analysis import stats as S

# Demšar 2006, table 6: AUC of C4.5 and three variants on 14 UCI data sets (rows), as printed. The paper's
# average ranks (3.143, 2.000, 2.893, 1.964) imply that on "voting" C4.5+cf was ahead of C4.5+m+cf before
# rounding to three decimals (both print 0.975); 0.97501 restores that order.
DEMSAR_METHODS = ["C4.5", "C4.5+m", "C4.5+cf", "C4.5+m+cf"]
DEMSAR_AUC = np.array([
    [0.763, 0.768, 0.771, 0.798], [0.599, 0.591, 0.590, 0.569], [0.954, 0.971, 0.968, 0.967],
    [0.628, 0.661, 0.654, 0.657], [0.882, 0.888, 0.886, 0.898], [0.936, 0.931, 0.916, 0.931],
    [0.661, 0.668, 0.609, 0.685], [0.583, 0.583, 0.563, 0.625], [0.775, 0.838, 0.866, 0.875],
    [1.000, 1.000, 1.000, 1.000], [0.940, 0.962, 0.965, 0.962], [0.619, 0.666, 0.614, 0.669],
    [0.972, 0.981, 0.97501, 0.975], [0.957, 0.978, 0.946, 0.970]]).T


# ------------------------------------------------------------------------------------------- intervals


@pytest.mark.parametrize("values", [[71.2, 73.9], [35.3, 37.5, 33.8], [1.0, 2.0, 4.0, 8.0, 16.0, 3.5]])
def test_ci95_is_the_student_t_half_width(values):
    x = np.array(values)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert S.ci95(values) == pytest.approx((hi - lo) / 2, rel=1e-12)


def test_ci95_edges():
    assert S.ci95([]) is None and S.ci95([42.0]) is None
    assert S.ci95([5.0, 5.0, 5.0]) == 0.0
    # None and NaN (a seed that did not log the metric) are dropped before counting n
    assert S.ci95([1.0, None, 3.0, float("nan")]) == pytest.approx(S.ci95([1.0, 3.0]))
    assert S.ci95([1.0, None]) is None
    # two values: t_{0.975,1} = 12.706, sd = |a - b| / sqrt(2), so the half-width is 12.706 * |a - b| / 2
    assert S.ci95([0.0, 2.0]) == pytest.approx(12.7062047, rel=1e-6)


# ------------------------------------------------------------------------------------ paired comparison


def test_paired_equals_ttest_rel_over_common_seeds():
    a = {0: 37.5, 1: 39.1, 2: 36.0, 3: 40.2, 7: 99.0}  # seed 7 ran only for a: not a pair
    b = {0: 35.3, 1: 38.8, 2: 33.0, 3: 36.1, 9: 1.0}
    res = S.paired(a, b)
    x, y = np.array([37.5, 39.1, 36.0, 40.2]), np.array([35.3, 38.8, 33.0, 36.1])
    d = x - y
    assert res.n == 4
    assert res.diff == pytest.approx(d.mean())
    assert res.p == pytest.approx(sps.ttest_rel(x, y).pvalue, rel=1e-12)
    lo, hi = sps.t.interval(0.95, 3, loc=d.mean(), scale=sps.sem(d))
    assert res.ci95 == pytest.approx((hi - lo) / 2, rel=1e-12)
    assert res.as_dict() == {"diff": res.diff, "ci95": res.ci95, "p": res.p, "n": 4, "zero_variance": False}
    # the order of the arguments flips the sign, not the p-value
    rev = S.paired(b, a)
    assert rev.diff == pytest.approx(-res.diff) and rev.p == pytest.approx(res.p) and rev.ci95 == res.ci95


def test_paired_pairs_by_seed_not_by_position():
    a = {2: 10.0, 0: 1.0, 1: 5.0}
    b = {0: 0.0, 1: 4.5, 2: 8.0}
    assert S.paired(a, b).diff == pytest.approx((1.0 + 0.5 + 2.0) / 3)


def test_paired_edges():
    assert S.paired({0: 1.0}, {1: 2.0}) == S.Paired(None, None, None, 0)
    assert S.paired({0: 3.0}, {0: 1.0}) == S.Paired(2.0, None, None, 1)
    # a NaN on either side drops that seed
    assert S.paired({0: 3.0, 1: float("nan")}, {0: 1.0, 1: 0.0}).n == 1
    assert S.paired({0: 3.0, 1: None}, {0: 1.0, 1: 0.0}).n == 1
    # zero variance of the differences: no t-test (issue 32 case 15); scipy's p is undefined for identical arms,
    # 0.0 for a constant shift and ~1e-15 for one that float rounding jitters: none of them is evidence
    same = S.paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert same == S.Paired(0.0, 0.0, None, 3, zero_variance=True)
    assert math.isnan(sps.ttest_rel([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]).pvalue)
    shift = S.paired({0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert shift == S.Paired(1.0, 0.0, None, 3, zero_variance=True)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        assert sps.ttest_rel([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]).pvalue == 0.0
    a, b = [0.3, 0.7, 1.1], [0.2, 0.6, 1.0]  # differences 0.1 up to rounding: scipy says p ~ 1e-15
    assert sps.ttest_rel(a, b).pvalue < 1e-10
    jitter = S.paired(dict(enumerate(a)), dict(enumerate(b)))
    assert jitter.zero_variance and jitter.p is None and jitter.diff == pytest.approx(0.1)


def test_paired_effects_against_a_reference():
    runs = {"lora": {0: 37.5, 1: 36.0, 2: 38.0}, "eblora": {0: 35.3, 1: 36.2, 2: 34.0},
            "olora": {0: 33.8, 2: 30.0}}
    eff = S.paired_effects(runs, "lora")
    assert set(eff) == {"eblora", "olora"}
    assert eff["eblora"].p == pytest.approx(sps.ttest_rel([35.3, 36.2, 34.0], [37.5, 36.0, 38.0]).pvalue)
    assert eff["olora"].n == 2 and eff["olora"].diff == pytest.approx(((33.8 - 37.5) + (30.0 - 38.0)) / 2)
    with pytest.raises(KeyError, match="reference 'inflora'"):
        S.paired_effects(runs, "inflora")


# ------------------------------------------------------------------------------------------------ ranks


def test_rank_matrix_direction_and_ties():
    scores = np.array([[90.0, 10.0], [80.0, 10.0], [70.0, 30.0]])  # 3 methods x 2 suites
    np.testing.assert_array_equal(S.rank_matrix(scores, higher_is_better=True), [[1, 2.5], [2, 2.5], [3, 1]])
    np.testing.assert_array_equal(S.rank_matrix(scores, higher_is_better=False), [[3, 1.5], [2, 1.5], [1, 3]])
    with pytest.raises(ValueError):
        S.rank_matrix(np.array([[1.0, np.nan], [2.0, 3.0]]))


def test_complete_block_keeps_methods_present_everywhere():
    table = {"lora": {"a": 1.0, "b": 2.0, "c": 3.0}, "eblora": {"a": 2.0, "c": 1.0},
             "olora": {"a": 0.5, "b": float("nan"), "c": 0.1}, "inflora": {"a": 4.0, "b": 1.0, "c": 2.0}}
    methods, m = S.complete_block(table, ["a", "b", "c"])
    assert methods == ["lora", "inflora"]
    np.testing.assert_array_equal(m, [[1.0, 2.0, 3.0], [4.0, 1.0, 2.0]])
    assert S.complete_block(table, ["a", "c"])[0] == ["lora", "eblora", "olora", "inflora"]


def test_friedman_equals_scipy():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 7)).round(1)  # rounding makes ties
    r = S.rank_methods(scores, list("abcde"), [f"s{i}" for i in range(7)])
    ref = sps.friedmanchisquare(*scores)  # scipy: one sample per method, measured on each suite
    assert r.friedman_stat == pytest.approx(ref.statistic, rel=1e-12)
    assert r.friedman_p == pytest.approx(ref.pvalue, rel=1e-12)
    # lower-is-better flips the ranks but not the statistic
    r_low = S.rank_methods(scores, list("abcde"), [f"s{i}" for i in range(7)], higher_is_better=False)
    assert r_low.friedman_stat == pytest.approx(ref.statistic)
    np.testing.assert_allclose(r_low.avg_rank, 6 - r.avg_rank)


def test_friedman_two_methods_is_the_sign_statistic():
    # scipy refuses k = 2 methods; the same formula gives (wins - losses)^2 / (wins + losses), ties left out
    a = np.array([3.0, 2.0, 5.0, 1.0, 4.0])
    b = np.array([1.0, 2.0, 4.0, 2.0, 0.0])  # a wins 3, loses 1, ties 1
    with pytest.raises(ValueError):
        sps.friedmanchisquare(a, b)
    stat, p = S.friedman(S.rank_matrix(np.vstack([a, b])))
    assert stat == pytest.approx((3 - 1) ** 2 / (3 + 1))
    assert p == pytest.approx(sps.chi2.sf(1.0, 1))


def test_friedman_undefined_cases():
    assert S.friedman(S.rank_matrix(np.array([[1.0, 2.0, 3.0]]))) == (None, None)  # one method
    assert S.friedman(S.rank_matrix(np.array([[1.0], [2.0], [3.0]]))) == (None, None)  # one suite
    assert S.friedman(S.rank_matrix(np.ones((3, 4)))) == (None, None)  # every method tied everywhere


def test_nemenyi_q_matches_demsar_table():
    # Demšar 2006, table 5(a), two-tailed Nemenyi critical values at alpha = 0.05 and 0.10, printed with three
    # decimals (2.343 for k = 3 is 2.34370 truncated, not rounded), hence the 1e-3 tolerance
    for k, q05 in {2: 1.960, 3: 2.343, 4: 2.569, 5: 2.728, 6: 2.850, 7: 2.949, 8: 3.031, 9: 3.102,
                   10: 3.164}.items():
        assert S.nemenyi_q(k, 0.05) == pytest.approx(q05, abs=1e-3), k
    for k, q10 in {2: 1.645, 3: 2.052, 4: 2.291, 10: 2.920}.items():
        assert S.nemenyi_q(k, 0.10) == pytest.approx(q10, abs=1e-3), k
    assert S.nemenyi_q(4) == pytest.approx(2.569, abs=5e-4)
    with pytest.raises(ValueError):
        S.nemenyi_q(1)


def test_demsar_worked_example():
    r = S.rank_methods(DEMSAR_AUC, DEMSAR_METHODS, [f"d{i}" for i in range(14)])
    # section 3.2.4: average ranks, chi2_F = 9.28 (the paper's formula has no tie correction), F_F = 3.69
    np.testing.assert_allclose(r.avg_rank, [3.143, 2.000, 2.893, 1.964], atol=5e-4)
    k, n = 4, 14
    chi2_paper = 12 * n / (k * (k + 1)) * (np.sum(r.avg_rank**2) - k * (k + 1) ** 2 / 4)
    assert chi2_paper == pytest.approx(9.28, abs=5e-3)
    assert S.iman_davenport(chi2_paper, k, n)[0] == pytest.approx(3.69, abs=5e-3)
    # the reported statistic is scipy's, which corrects for the ties (mushroom: all four at 1.000)
    ref = sps.friedmanchisquare(*DEMSAR_AUC)
    assert r.friedman_stat == pytest.approx(ref.statistic) and r.friedman_stat > chi2_paper
    assert r.iman_davenport_f == pytest.approx((n - 1) * ref.statistic / (n * (k - 1) - ref.statistic))
    assert r.iman_davenport_p == pytest.approx(sps.f.sf(r.iman_davenport_f, 3, 39))
    # CD = 2.569 * sqrt(4 * 5 / (6 * 14)) = 1.25; the worst-best gap (3.143 - 1.964 = 1.18) is below it, so
    # Nemenyi finds no significant difference: one clique holding all four, best first
    assert r.cd == pytest.approx(1.25, abs=5e-3)
    assert r.cd == pytest.approx(S.nemenyi_q(4) * math.sqrt(20 / 84))
    assert r.cliques == [(3, 1, 2, 0)]
    d = r.as_dict()
    assert d["nemenyi"]["cliques"] == [["C4.5+m+cf", "C4.5+m", "C4.5+cf", "C4.5"]]
    assert d["avg_rank"]["C4.5"] == pytest.approx(3.142857, abs=1e-6)


def test_cliques_are_maximal_runs_below_cd():
    # avg ranks 1.0, 1.5, 2.4, 3.0, 4.5 with CD 1.0: {1.0, 1.5}, {1.5, 2.4}, {2.4, 3.0}; 4.5 stands alone
    ranks = [2.4, 1.0, 4.5, 1.5, 3.0]
    assert S.cliques(ranks, 1.0) == [(1, 3), (3, 0), (0, 4)]
    # a difference of exactly CD is significant (Demšar: "differ by at least the critical difference")
    assert S.cliques([1.0, 2.0], 1.0) == []
    assert S.cliques([1.0, 2.0], 1.0001) == [(0, 1)]
    # a run inside a wider one is not repeated
    assert S.cliques([1.0, 1.2, 1.4, 5.0], 1.0) == [(0, 1, 2)]


def test_rank_methods_rejects_a_mismatched_shape():
    with pytest.raises(ValueError, match="methods x suites"):
        S.rank_methods(np.ones((2, 3)), ["a", "b", "c"], ["x", "y"])


# ---------------------------------------------------------------------------------------------- diagram


def test_cd_diagram_writes_a_png(tmp_path):
    r = S.rank_methods(DEMSAR_AUC, DEMSAR_METHODS, [f"d{i}" for i in range(14)])
    out = S.cd_diagram(r, tmp_path / "cd.png", title="Demšar 2006, table 6")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    img = imread(out)
    assert img.shape[0] > 150 and img.shape[1] > 600  # a drawing, not an empty canvas
    assert (img[..., :3] < 0.5).any()
    # two methods and no Friedman test still draw
    two = S.rank_methods(np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 2.0]]), ["lora", "eblora"], ["a", "b", "c"])
    assert S.cd_diagram(two, tmp_path / "two.png").is_file()
