"""Statistics a reader can cite: t intervals over seeds, paired comparisons by seed, ranks across suites
(Friedman test, Nemenyi critical difference, Demšar 2006) and the critical-difference diagram.

Pure functions over plain numbers (numpy + scipy); nothing here reads MLflow, so the leaderboard, the report
and the claim suites call the same code and tests check it against scipy directly.

Reference: J. Demšar, "Statistical Comparisons of Classifiers over Multiple Data Sets", JMLR 7:1-30, 2006
(section 3.2.2: Friedman test and Nemenyi post-hoc test; figure 1: the critical-difference diagram).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sps


def _finite(values: Iterable[float | None]) -> np.ndarray:
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def ci95(values: Iterable[float | None]) -> float | None:
    """Half-width of the Student t 95% interval of the mean: ``t_{0.975, n-1} * sd / sqrt(n)``, sd with ddof=1.

    None and non-finite values are dropped first (a seed that did not log the metric does not count), so n is
    the number of finite values; None for n < 2 (no spread to estimate). Identical values give 0.0.
    """
    x = _finite(values)
    n = x.size
    if n < 2:
        return None
    return float(sps.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))


@dataclass(frozen=True)
class Paired:
    """A paired comparison of ``a - b`` over the keys (seeds) both have a finite value for.

    diff: mean paired difference (None when n = 0); ci95: t half-width of that mean (None when n < 2);
    p: two-sided paired t-test p-value, equal to ``scipy.stats.ttest_rel(a, b).pvalue`` (None when n < 2);
    n: number of pairs. zero_variance: every difference is the same number (up to float rounding): there is no
    t-test (t is 0/0 or infinite; scipy's p = 0 or 3.8e-15 would claim a certainty n seeds cannot give), so p is
    None and nothing is marked significant; readers say "no t-test (zero variance)".
    """

    diff: float | None
    ci95: float | None
    p: float | None
    n: int
    zero_variance: bool = False

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return {"diff": self.diff, "ci95": self.ci95, "p": self.p, "n": self.n, "zero_variance": self.zero_variance}


NO_TEST = "no t-test (zero variance)"


def fmt_p(p: float) -> str:
    """``p=0.50``, ``p=0.004``, ``p<0.001``: a p-value as every table prints it (two decimals, so a column of
    them lines up; three below 0.01; the JSON and MLflow keep the exact value)."""
    if p < 0.001:
        return "p<0.001"
    return f"p={p:.2f}" if p >= 0.01 else f"p={p:.3f}"


def paired(a: Mapping[Hashable, float | None], b: Mapping[Hashable, float | None]) -> Paired:
    """Compare ``a`` with ``b`` (each seed -> value) over the seeds both ran; positive diff means a > b."""
    keys = [k for k in a if k in b and _finite([a[k], b[k]]).size == 2]
    if not keys:
        return Paired(None, None, None, 0)
    x = np.array([float(a[k]) for k in keys])
    y = np.array([float(b[k]) for k in keys])
    d = x - y
    n = d.size
    diff = float(d.mean())
    if n < 2:
        return Paired(diff, None, None, n)
    # zero variance, also up to float rounding (0.1 - 0.0 vs 0.3 - 0.2): scipy's t is +-inf or 0/0
    if np.all(np.abs(d - d[0]) <= 1e-9 * max(1.0, float(np.abs(d).max()))):
        return Paired(diff, 0.0, None, n, zero_variance=True)
    p = float(sps.ttest_rel(x, y).pvalue)
    return Paired(diff, ci95(d), p, n)


def paired_effects(values: Mapping[str, Mapping[Hashable, float | None]], reference: str) -> dict[str, Paired]:
    """The effect of every arm (a method, an intervention) against ``reference``, each paired by seed:
    ``{arm: paired(values[arm], values[reference])}`` for every arm other than the reference."""
    if reference not in values:
        raise KeyError(f"reference {reference!r} is not among {sorted(values)}")
    return {arm: paired(v, values[reference]) for arm, v in values.items() if arm != reference}


# ----------------------------------------------------------------------------------------------- ranks


def rank_matrix(scores: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Rank the methods (rows) within every suite (column): 1 = best, ties get the average of their ranks."""
    s = np.asarray(scores, dtype=float)
    if s.ndim != 2 or s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("scores must be a complete, non-empty methods x suites matrix of finite numbers")
    return sps.rankdata(-s if higher_is_better else s, axis=0)


def complete_block(table: Mapping[str, Mapping[str, float | None]],
                   suites: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """From ``{method: {suite: score}}`` keep the methods with a finite score in every one of ``suites`` and
    return them with their methods x suites matrix (Friedman and Nemenyi need complete blocks)."""
    methods = [m for m, row in table.items()
               if all(s in row and _finite([row[s]]).size == 1 for s in suites)]
    return methods, np.array([[float(table[m][s]) for s in suites] for m in methods], dtype=float).reshape(
        len(methods), len(suites))


def friedman(ranks: np.ndarray) -> tuple[float | None, float | None]:
    """Friedman chi-square statistic and p-value of a methods x suites rank matrix (with scipy's tie correction).

    For k >= 3 methods this is ``scipy.stats.friedmanchisquare`` (which refuses fewer than 3 methods, i.e.
    3 samples); for k = 2 the same formula is evaluated here (it reduces to (wins - losses)^2 / (wins + losses)
    over the suites without a tie, a sign test, chi-square with 1 degree of freedom). (None, None) when there are
    fewer than 2 methods or 2 suites, or when every suite ties every method (the statistic is 0/0).
    """
    k, n = ranks.shape
    if k < 2 or n < 2:
        return None, None
    ties = sum(float(np.sum(c**3 - c)) for c in (np.unique(col, return_counts=True)[1] for col in ranks.T))
    correction = 1.0 - ties / (n * k * (k * k - 1))
    if correction <= 0:
        return None, None
    if k >= 3:
        res = sps.friedmanchisquare(*ranks)
        return float(res.statistic), float(res.pvalue)
    r = ranks.sum(axis=1)
    chi2 = (12.0 / (n * k * (k + 1)) * float(np.sum(r**2)) - 3.0 * n * (k + 1)) / correction
    return chi2, float(sps.chi2.sf(chi2, k - 1))


def iman_davenport(chi2: float | None, k: int, n: int) -> tuple[float | None, float | None]:
    """Iman and Davenport's F form of the Friedman statistic, ``(N - 1) chi2 / (N (k - 1) - chi2)`` with
    (k - 1, (k - 1)(N - 1)) degrees of freedom, which Demšar 2006 recommends over the conservative chi-square.
    (None, None) when chi2 is None; F is infinite and p is 0.0 when every suite ranks the methods identically."""
    if chi2 is None:
        return None, None
    denom = n * (k - 1) - chi2
    if denom <= 0:
        return math.inf, 0.0
    f = (n - 1) * chi2 / denom
    return f, float(sps.f.sf(f, k - 1, (k - 1) * (n - 1)))


def nemenyi_q(k: int, alpha: float = 0.05) -> float:
    """Nemenyi's critical value q_alpha: the studentized range quantile for k groups and infinite degrees of
    freedom, divided by sqrt(2) (Demšar 2006, table 5a: 2.569 for k = 4 at alpha = 0.05)."""
    if k < 2:
        raise ValueError("the Nemenyi test compares at least 2 methods")
    return float(sps.studentized_range.ppf(1.0 - alpha, k, np.inf) / math.sqrt(2.0))


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks, ``q_alpha * sqrt(k (k + 1) / (6 N))`` for k methods over
    N suites: two methods whose average ranks differ by at least this much differ significantly."""
    if n < 1:
        raise ValueError("the critical difference needs at least 1 suite")
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n))


def cliques(avg_ranks: Sequence[float], cd: float) -> list[tuple[int, ...]]:
    """Groups of methods that are not significantly different: the maximal runs, in order of average rank,
    whose extreme average ranks differ by less than ``cd``; runs of a single method are left out.

    Returned as tuples of method indices (into ``avg_ranks``), best average rank first, the groups ordered by
    their best member; these are the bars of the diagram.
    """
    order = [int(i) for i in np.argsort(np.asarray(avg_ranks, dtype=float), kind="stable")]
    r = [float(avg_ranks[i]) for i in order]
    runs: list[tuple[int, int]] = []
    for i in range(len(r)):
        j = i
        while j + 1 < len(r) and r[j + 1] - r[i] < cd:
            j += 1
        if j > i and not (runs and runs[-1][1] >= j):  # not inside the previous (wider or equal) run
            runs.append((i, j))
    return [tuple(order[a:b + 1]) for a, b in runs]


@dataclass(frozen=True)
class Ranking:
    """Methods ranked over suites: per-suite ranks (methods x suites, 1 = best), average ranks, the Friedman
    test over them, the Nemenyi critical difference at ``alpha`` and the cliques it leaves (indices into
    ``methods``)."""

    methods: list[str]
    suites: list[str]
    ranks: np.ndarray
    avg_rank: np.ndarray
    friedman_stat: float | None
    friedman_p: float | None
    iman_davenport_f: float | None
    iman_davenport_p: float | None
    cd: float | None
    alpha: float
    cliques: list[tuple[int, ...]]

    def as_dict(self) -> dict:
        return {"methods": self.methods, "suites": self.suites, "ranks": self.ranks.tolist(),
                "avg_rank": dict(zip(self.methods, self.avg_rank.tolist())),
                "friedman": {"statistic": self.friedman_stat, "p": self.friedman_p},
                "iman_davenport": {"f": self.iman_davenport_f, "p": self.iman_davenport_p},
                "nemenyi": {"alpha": self.alpha, "cd": self.cd,
                            "cliques": [[self.methods[i] for i in c] for c in self.cliques]}}


def rank_methods(scores: np.ndarray, methods: Sequence[str], suites: Sequence[str], *,
                 higher_is_better: bool = True, alpha: float = 0.05) -> Ranking:
    """Rank ``methods`` (rows of ``scores``) within every suite (columns), average the ranks, and run the
    Friedman test and the Nemenyi post-hoc test (see :func:`friedman` for when the test is undefined; the
    critical difference is None with fewer than 2 methods)."""
    s = np.asarray(scores, dtype=float)
    if s.shape != (len(methods), len(suites)):
        raise ValueError(f"scores has shape {s.shape}, expected {(len(methods), len(suites))} (methods x suites)")
    ranks = rank_matrix(s, higher_is_better)
    avg = ranks.mean(axis=1)
    stat, p = friedman(ranks)
    k, n = ranks.shape
    cd = critical_difference(k, n, alpha) if k >= 2 and n >= 1 else None
    return Ranking(list(methods), list(suites), ranks, avg, stat, p, *iman_davenport(stat, k, n), cd, alpha,
                   cliques(avg, cd) if cd is not None else [])


# ----------------------------------------------------------------------------------------- the diagram


def cd_diagram(ranking: Ranking, path: str | Path, title: str | None = None) -> Path:
    """Draw the critical-difference diagram of ``ranking`` (Demšar 2006, figure 1) as a PNG at ``path``.

    An axis of average ranks (1, the best, on the left); every method hangs from its average rank, the better
    half to the left, the worse half to the right; a thick bar joins each clique of methods that are not
    significantly different; the CD interval is drawn above the axis. Built on a bare matplotlib Figure (Agg
    canvas, no pyplot state), so it is safe in worker processes and tests.
    """
    import matplotlib

    # method names are the user's labels, shown as written: "$\\x$" is a name, not TeX math to parse (which
    # fails at savefig); the same setting as every other clbench figure (clbench.analysis.plots.plain_text)
    with matplotlib.rc_context({"text.parse_math": False}):
        return _draw_cd(ranking, Path(path), title)


def _draw_cd(ranking: Ranking, out: Path, title: str | None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(ranking.methods)
    order = [int(i) for i in np.argsort(ranking.avg_rank, kind="stable")]
    left, right = order[: (k + 1) // 2], order[(k + 1) // 2:]
    span = max(k - 1, 1)
    u = span / 4.0  # rank units per inch: the rank axis is 4 inches wide whatever k is
    labels = {i: f"{ranking.methods[i]} ({ranking.avg_rank[i]:.2f})" for i in left}
    labels |= {i: f"({ranking.avg_rank[i]:.2f}) {ranking.methods[i]}" for i in right}
    # the side margins fit the longest label (about 0.09 inch a character at 10 points)
    margin_l = 0.45 + 0.09 * max((len(labels[i]) for i in left), default=0)
    margin_r = 0.45 + 0.09 * max((len(labels[i]) for i in right), default=0)
    x_lo, x_hi = 1 - (0.3 + margin_l) * u, k + (0.3 + margin_r) * u
    step, n_clq = 0.55, len(ranking.cliques)
    first_row = 0.9 + 0.35 * n_clq  # room below the axis for the clique bars
    rows = max(len(left), len(right))
    width = max((x_hi - x_lo) / u, 6.0)
    height = 1.6 + 0.32 * (first_row + step * rows) + (0.2 if title else 0.0)
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    pad = (width - (x_hi - x_lo) / u) / 2 * u  # centre the drawing when the minimum width applies
    ax.set_xlim(x_lo - pad, x_hi + pad)
    top = (-2.3 if ranking.cd is not None else -1.2) - (0.6 if title else 0.0)
    ax.set_ylim(first_row + step * rows + 0.5, top)  # y grows downward
    ink = "black"
    # axis of average ranks with integer ticks and half ticks
    ax.plot([1, k], [0, 0], color=ink, lw=1.2)
    for t in np.arange(1, k + 0.01, 0.5):
        major = float(t).is_integer()
        ax.plot([t, t], [0, -0.22 if major else -0.12], color=ink, lw=1.0)
        if major:
            ax.text(t, -0.32, f"{int(t)}", ha="center", va="bottom", fontsize=10)
    if ranking.cd is not None:
        cd_end = min(1 + ranking.cd, x_hi)
        ax.plot([1, cd_end], [-1.45, -1.45], color=ink, lw=1.4)
        for x in (1, cd_end):
            ax.plot([x, x], [-1.6, -1.3], color=ink, lw=1.4)
        ax.text((1 + cd_end) / 2, -1.65, f"CD = {ranking.cd:.2f}", ha="center", va="bottom", fontsize=10)
    # methods: a drop from the axis to its row, then out to the side, with the name and the average rank
    x_left, x_right = 1 - 0.3 * u, k + 0.3 * u
    for row, i in enumerate(left):
        y, r = first_row + step * row, float(ranking.avg_rank[i])
        ax.plot([r, r, x_left], [0, y, y], color=ink, lw=1.0)
        ax.text(x_left - 0.05 * u, y, labels[i], ha="right", va="center", fontsize=10)
    for row, i in enumerate(reversed(right)):
        y, r = first_row + step * row, float(ranking.avg_rank[i])
        ax.plot([r, r, x_right], [0, y, y], color=ink, lw=1.0)
        ax.text(x_right + 0.05 * u, y, labels[i], ha="left", va="center", fontsize=10)
    # cliques: thick bars just under the axis, slightly wider than their extreme ranks
    for level, members in enumerate(ranking.cliques):
        lo = min(float(ranking.avg_rank[i]) for i in members)
        hi = max(float(ranking.avg_rank[i]) for i in members)
        y = 0.45 + 0.35 * level
        ax.plot([lo - 0.04, hi + 0.04], [y, y], color=ink, lw=3.0, solid_capstyle="butt")
    notes = [f"{len(ranking.suites)} suites, {k} methods"]
    if ranking.friedman_p is not None:
        notes.append(f"Friedman chi2 = {ranking.friedman_stat:.2f}, p = {ranking.friedman_p:.3g}")
    if ranking.cd is not None:
        notes.append(f"Nemenyi alpha = {ranking.alpha:g}")
    ax.text(x_lo - pad + 0.15 * u, first_row + step * rows + 0.3, "; ".join(notes), ha="left", va="bottom",
            fontsize=8, color="#444444")
    if title:
        ax.text(x_lo - pad + 0.15 * u, top + 0.1, title, ha="left", va="top", fontsize=11, weight="bold")
    fig.savefig(out, dpi=120)
    return out
