"""The HTML leaderboard report: one self-contained file (inline CSS, plots as base64 PNGs, no scripts).

Per suite-hash group: the leaderboard table, accuracy versus cost with the Pareto front, spectral imbalance
versus forgetting over every finished run (the EBLoRA claim, docs/METHODS.md), and each method's accuracy curve over
tasks. With a baseline, the paired comparisons with their significance at 0.05 and the number of comparisons;
over several suites, the ranks per suite, the average rank and the critical-difference diagram.
``log_report`` puts it on a suite's parent run at the end of ``clbench run``.
"""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path
from typing import Any

from clbench import keys
from clbench.analysis.claim import claim_lines, claim_plots
from clbench.analysis.leaderboard import (
    METRICS,
    NO_CONTINUAL_TRAINING,
    SPEC,
    Group,
    Row,
    SuiteRanks,
    aggregate,
    baseline_key,
    fmt_paired,
    group_title,
    no_ranking_reason,
    note_lines,
    provenance_lines,
    rank_suites,
    ranks_cells,
    ranks_notes,
    table_cells,
)
from clbench.analysis.leaderboard import render as render_text
from clbench.analysis.plots import (
    _plt,
    labelled_png,
    plain_linear_axis,
    plain_log_axis,
    plain_symlog_axis,
    plain_text,
    png_base64,
    spread_labels,
)
from clbench.store.tracking import Tracker, read_runs

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
th{white-space:normal;vertical-align:bottom;max-width:7em}
td.m,th.m{text-align:left}
tr.upper td{background:#eef6ee}
tr.lower td{background:#f6f0e8}
tr.nocl td{background:#eaf0f8}
th{background:#f3f3f3}
.scroll{overflow-x:auto}
.plots{display:flex;flex-wrap:wrap;gap:12px}
.plots figure{margin:0}
figcaption{font-size:12px;color:#555;max-width:520px}
ul{font-size:13px}
td.sig{font-weight:bold;background:#fff3c4}
"""
ALPHA = 0.05  # the significance level the report marks paired differences at


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (lower or equal cost and higher or equal accuracy,
    strictly better in one), sorted by cost."""
    front = []
    for i, (c, a) in enumerate(points):
        dominated = any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


MARKERS = ("o", "s", "^", "D", "v", "P")


def _styles(rows: list[Row]) -> dict[str, tuple[Any, str]]:
    """Each method's (colour, marker): ten colours, then the same colours with the next marker, so that the 12
    methods of the quickstart and its bounds suite never share a look in a legend."""
    cmap = _plt().get_cmap("tab10")
    return {row.method: (cmap(i % 10), MARKERS[(i // 10) % len(MARKERS)]) for i, row in enumerate(rows)}


@plain_text
def plot_pareto(g: Group) -> str | None:
    plt = _plt()
    # the total: gradient training plus the method's own work (a closed-form solve), so no method looks free
    costs = [(keys.COST_TOTAL_SECONDS, "training + method time (s)"),
             (keys.COST_TRAINABLE_PARAMS, "trainable parameters")]
    styles = _styles(g.rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels: dict[Any, list] = {ax: [] for ax in axes}
    drawn = False
    for ax, (ckey, clabel) in zip(axes, costs):
        rows = [r for r in g.rows if r.metrics[ckey].mean is not None and r.metrics["final/acc"].mean is not None]
        pts = [(r.metrics[ckey].mean, r.metrics["final/acc"].mean) for r in rows]
        for r, (c, a) in zip(rows, pts):
            color, marker = styles[r.method]
            ax.errorbar(c, a, yerr=r.metrics["final/acc"].std or 0, fmt=marker, color=color, capsize=3)
            labels[ax].append(ax.annotate(r.method, (c, a), fontsize=8, xytext=(4, 4), textcoords="offset points"))
        front = pareto_front(pts)
        if front:
            drawn = True
            ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="k", alpha=0.4,
                    linestyle="--", label="Pareto front")
            ax.set_title("dashed: Pareto front", fontsize=8)  # a legend box inside the axes hid points
        positive = [p[0] for p in pts if p[0] > 0]
        if positive and max(positive) / min(positive) > 50:
            # a wide range (LoRA's thousands of parameters beside full fine-tuning's) on log ticks; a method that
            # trains nothing (SimpleCIL, RanPAC: 0 parameters) keeps its 0 at the axis' start
            if min(p[0] for p in pts) > 0:
                plain_log_axis(ax, "x")
            else:
                plain_symlog_axis(ax, "x", [p[0] for p in pts])
        else:
            plain_linear_axis(ax, "x")
        ax.set_xlabel(clabel)
        ax.set_ylabel("final/acc (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("accuracy vs cost (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    if not drawn:
        plt.close(fig)
        return None
    for ax in axes:
        spread_labels(fig, ax, labels[ax])
    return png_base64(fig)


@plain_text
def plot_imbalance_forgetting(g: Group) -> str | None:
    """The group's ``Correlation`` (clbench.analysis.leaderboard): its points, and its rho in the title, the number the
    parent run logs as ``suite/spearman_imbalance_forgetting``."""
    ev = g.imbalance_forgetting
    if not ev.n:
        return None
    plt = _plt()
    styles = _styles(g.rows)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for row in g.rows:
        pts = [(x, y) for x, y, label in zip(ev.x, ev.y, ev.labels) if label.rpartition("/s")[0] == row.method]
        if pts:
            color, marker = styles[row.method]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, label=row.method)
    return labelled_png(fig, ax, f"spectral imbalance: {keys.SPECTRA_MEAN_TOP1}", f"{keys.FINAL_FORGETTING} (points)",
                        ev.title())


@plain_text
def plot_curves(g: Group) -> str | None:
    plt = _plt()
    styles = _styles(g.rows)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    drawn = False
    for row in g.rows:
        pts = [(i + 1, s.mean, s.std or 0.0) for i, s in enumerate(row.curve) if s.mean is not None]
        if not pts:
            continue
        drawn = True
        x, m, sd = zip(*pts)
        color, marker = styles[row.method]
        ax.plot(x, m, marker=marker, color=color, linestyle="-" if marker == MARKERS[0] else "--",
                label=f"{row.method} (n={row.n})")
        ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=color, alpha=0.15)
    if not drawn:
        plt.close(fig)
        return None
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return labelled_png(fig, ax, "after training task", "eval/acc: CIL accuracy on seen tasks (%)",
                        "accuracy over tasks (mean ± std over seeds)")


PLOTS = (
    ("pareto", plot_pareto, ("Final CIL accuracy against training time and trainable parameters; the dashed "
                             "line joins the methods no other method beats on both.")),
    ("imbalance", plot_imbalance_forgetting, ("Each point is one finished run: the mean share of the top singular "
                                              "value in its task updates against its forgetting.")),
    ("curves", plot_curves, "Accuracy over all seen tasks after each task."),
)


def _significant(row: Row, key: str) -> bool:
    p = ((row.vs_baseline or {}).get(key) or {}).get("p")
    return p is not None and p < ALPHA


def _header_html(key: str) -> str:
    """A column header that may wrap after each ``/`` and ``_`` (``final/<wbr>forgetting``): the headers, not the
    values, set the widths of a table with one column per metric."""
    return html.escape(key).replace("/", "/<wbr>").replace("_", "_<wbr>")


def _table_html(g: Group) -> str:
    e = html.escape
    header, body_cells = table_cells(g)  # the text table's columns, the baseline's and the bounds' included
    head = "".join(f'<th{" class=m" if i == 1 else ""}>{_header_html(h)}</th>' for i, h in enumerate(header))
    body = []
    for row, cells in zip(g.rows, body_cells):
        sig = g.baseline is not None and _significant(row, baseline_key(g))
        css = [" class=m" if j == 1 else (" class=sig" if sig and j == 3 else "") for j in range(len(cells))]
        mark = {"upper bound": " class=upper", "lower reference": " class=lower",
                NO_CONTINUAL_TRAINING: " class=nocl"}.get(row.reference or "", "")
        body.append(f"<tr{mark}>" + "".join(f"<td{c}>{e(x)}</td>" for c, x in zip(css, cells)) + "</tr>")
    return (f'<div class="scroll"><table class="leaderboard"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _baseline_html(g: Group) -> str:
    """Every row against the baseline on every seed-dependent metric, paired by seed; the cells with p < 0.05
    marked, and how many comparisons there were (so the reader can weigh the marks: about 5% of them would be
    marked by chance if no method differed; no multiplicity correction is applied)."""
    e = html.escape
    specs = [m for m in METRICS if m.show_std]  # cost columns are not outcomes of a comparison
    rows = [r for r in g.rows if r.method != g.baseline]
    tested = sum(1 for r in rows for m in specs if ((r.vs_baseline or {}).get(m.key) or {}).get("p") is not None)
    marked = sum(1 for r in rows for m in specs if _significant(r, m.key))
    head = "<th class=m>method</th>" + "".join(f"<th>{_header_html(m.key)}</th>" for m in specs)
    body = ""
    for r in rows:
        cells = "".join(f"<td{' class=sig' if _significant(r, m.key) else ''}>{e(fmt_paired(r, g.baseline, m))}"
                        f"</td>" for m in specs)
        body += f"<tr><td class=m>{e(r.method)}</td>{cells}</tr>"
    return (f"<h3>Paired comparison with {e(g.baseline)}</h3>"
            f"<p class='comparisons'>Difference to <b>{e(g.baseline)}</b> over the seeds both finished: mean ± "
            f"t 95% half-width (two-sided paired t-test p). {tested} comparisons were made (the cells with a p-value "
            f"among {len(rows)} methods × {len(specs)} metrics; a cell needs 2 seeds both finished and a logged "
            f"value); {marked} are significant at {ALPHA:g} (highlighted), uncorrected for multiple comparisons: "
            f"about {ALPHA * tested:.1f} would be by chance alone if no method differed.</p>"
            f'<div class="scroll"><table class="vs-baseline"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _cd_png(ranks: SuiteRanks) -> str:
    from clbench.analysis.stats import cd_diagram

    with tempfile.TemporaryDirectory() as tmp:
        path = cd_diagram(ranks.ranking, Path(tmp) / "cd.png", title=f"average rank by {ranks.metric}")
        return base64.b64encode(path.read_bytes()).decode("ascii")


def _ranks_html(groups: list[Group]) -> str:
    """Ranks per suite and the average rank over suites; the critical-difference diagram with 3 suites or more."""
    ranks = rank_suites(groups)
    if ranks is None:
        why = no_ranking_reason(groups)
        return "" if why is None else f"<p class='no-ranks'>{html.escape(why)}</p>"
    e = html.escape
    header, body = ranks_cells(ranks)
    head = "".join(f'<th{" class=m" if i == 0 else ""}>{e(h)}</th>' for i, h in enumerate(header))
    rows = "".join("<tr>" + "".join(f'<td{" class=m" if i == 0 else ""}>{e(c)}</td>' for i, c in enumerate(b))
                   + "</tr>" for b in body)
    better = "higher" if SPEC[ranks.metric].higher_is_better else "lower"
    parts = [f"<section id='ranks'><h2>Ranks across suites by {e(ranks.metric)}</h2>",
             f"<p>Each suite ranks the methods by their mean {e(ranks.metric)} ({better} is better; 1 = best, ties "
             "share the average rank); the last column averages the ranks over the suites.</p>",
             f'<table class="ranks"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>',
             "<ul>" + "".join(f"<li>{e(x)}</li>" for x in ranks_notes(ranks)) + "</ul>"]
    if ranks.diagram:
        parts.append(f"<figure><img class='plot' id='cd-diagram' alt='critical difference diagram' "
                     f"src='data:image/png;base64,{_cd_png(ranks)}'><figcaption>Critical-difference diagram "
                     "(Demšar 2006): methods hang from their average rank, best on the left; a thick bar joins "
                     "methods whose average ranks differ by less than the Nemenyi critical difference (CD, drawn "
                     "above the axis).</figcaption></figure>")
    return "".join(parts) + "</section>"
def _reference_html(g: Group) -> str:
    """The reproduction table: published vs measured mean, difference, within tolerance (reference: block)."""
    if not g.references:
        return ""
    e = html.escape
    head = "".join(f"<th>{h}</th>" for h in ("method", "metric", "published", "measured (n)", "diff", "verdict",
                                             "source"))
    body = []
    for r in g.references:
        verdict = "-" if r.within is None else (f"within ±{r.tolerance:g}" if r.within else
                                                f"NOT within ±{r.tolerance:g}")
        cells = [r.method, r.metric, "not retrieved" if r.reference is None else f"{r.reference:.2f}",
                 "-" if r.measured is None else f"{r.measured:.2f} ({r.n})",
                 "-" if r.diff is None else f"{r.diff:+.2f}", verdict, r.source]
        body.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    return (f'<h3>reference</h3><div class="scroll"><table class="reference"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def render_html(groups: list[Group], title: str = "clbench leaderboard", uri: str | None = None) -> str:
    e = html.escape
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style>"
              f"</head><body><h1>{e(title)}</h1>"),
             ("<p>mean ± ci95 (n): the mean over n seeds and the half-width of its Student t 95% interval "
              "(no interval for one seed); only finished runs are averaged; runs of different suite hashes "
              "(protocols) are never mixed.</p>")]
    parts.append(_ranks_html(groups))  # the summary over suites first, then each suite's own leaderboard
    for k, g in enumerate(groups):
        parts.append(f"<section id='group-{k}'><h2>{e(group_title(g))}</h2>")
        parts.append(f"<p>sorted by <code>{e(g.sort_key)}</code></p>{_table_html(g)}{_reference_html(g)}")
        parts.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in provenance_lines(g) + note_lines(g)) + "</ul>")
        if g.baseline is not None and len(g.rows) > 1:  # something besides the baseline to compare
            parts.append(_baseline_html(g))
        parts.append("<div class='plots'>")
        for name, png, caption in [(n, fn(g), c) for n, fn, c in PLOTS] + claim_plots(g, uri):
            if png:
                parts.append(f"<figure><img class='plot' id='{name}-{k}' alt='{name}' "
                             f"src='data:image/png;base64,{png}'><figcaption>{e(caption)}</figcaption></figure>")
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render(groups: list[Group], fmt: str, title: str = "clbench leaderboard") -> str:
    """The leaderboard in any format of ``clbench leaderboard --format`` (html here, the others in
    ``clbench.analysis.leaderboard``)."""
    if fmt == "html":
        return render_html(groups, title)
    text = render_text(groups, fmt)
    if fmt in ("table", "markdown"):  # the claim suite's answer under its leaderboard (the HTML draws it)
        claims = [line for g in groups for line in claim_lines(g)]
        if claims and fmt == "markdown":
            claims = [f"    {line}" for line in claims]  # a code block keeps the columns
        text = "\n".join([text, *claims]) if claims else text
    return text


def log_report(tracker: Tracker, parent: str, experiment: str, suite_hash: str, title: str | None = None) -> bool:
    """Write the leaderboard of one suite hash in ``experiment`` as ``leaderboard.html`` on the parent run."""
    runs = [r for r in read_runs(experiment, tracker.uri) if r.tags.get(keys.SUITE_HASH) == suite_hash]
    if not runs:
        return False
    groups = aggregate(runs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "leaderboard.html"
        path.write_text(render_html(groups, title or f"clbench leaderboard: {experiment}", tracker.uri))
        tracker.log_artifacts(parent, tmp)
    return True
