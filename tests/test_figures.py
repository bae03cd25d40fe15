"""Every figure clbench draws, rendered and read back: no two texts overlap (bounding boxes in display space) and
tick labels keep a gap, no tick label is left as unparsed mathtext (``$\\mathdefault{10^{2}}$``) while a ``$`` in a
method label stays literal, a legend never covers the data it labels, and no two legend entries look alike."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from clbench import keys
from clbench.analysis import leaderboard as lb

# labels that sat on top of each other in the accuracy-vs-cost plot (one point each, equal cost, close accuracy)
METHODS = {"mymethod": 40.0, "lora": 40.4, "lora-tuned": 40.8, "inflora": 45.0, "olora": 30.0, "$x$ lora": 35.0,
           "keep": 41.0, "flat": 39.0,
           # the quickstart's bounds beside them: 12 methods (more than one colour cycle), two that train no
           # parameter at all and full fine-tuning's 136k on the same parameter axis
           "simplecil": 52.0, "ranpac": 84.5, "finetune": 19.0, "joint": 87.0}
PARAMS = {"simplecil": 0.0, "ranpac": 0.0, "finetune": 136_000.0, "joint": 5_000.0}


def _rows() -> list[lb.Row]:
    rows = []
    for i, (label, acc) in enumerate(METHODS.items()):
        runs = []
        for seed in range(3):
            values = {k: None for k in lb.METRIC_KEYS}
            values.update({keys.FINAL_ACC: acc + seed, keys.FINAL_FORGETTING: 20.0 + i + seed,
                           keys.FINAL_AVG_ACC: acc + 10, keys.SPECTRA_MEAN_TOP1: 0.3 + 0.05 * i,
                           keys.COST_TRAIN_SECONDS: 60.0 + (i % 3), keys.COST_TOTAL_SECONDS: 61.0 + (i % 3) + i,
                           keys.COST_TRAINABLE_PARAMS:
                           PARAMS.get(label, 4226.0 if i < 3 else 100.0 * 10 ** (i % 4))})
            runs.append({"run_id": f"{label}{seed}", "seed": seed, "values": values,
                         "curve": [90.0 - 10 * t - i for t in range(5)]})
        metrics = {k: lb.stat(r["values"][k] for r in runs) for k in lb.METRIC_KEYS}
        curve = [lb.stat(r["curve"][t] for r in runs) for t in range(5)]
        rows.append(lb.Row(method=label, method_name="lora", params_id="p", n=3, seeds=[0, 1, 2], metrics=metrics,
                           provenance={"version": [], "git_sha": [], "device": []}, runs=runs, curve=curve))
    return rows


def _group() -> lb.Group:
    rows = lb.sort_rows(_rows(), keys.FINAL_ACC)
    return lb.Group("claim", ["claim"], "h" * 12, rows, [], keys.FINAL_ACC, lb.imbalance_forgetting(rows))


def _tick_labels(fig, drawn_only: bool = True) -> list:
    """The figure's tick labels; with ``drawn_only``, only those of ticks inside the view (the ones drawn)."""
    out = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            span = (hi - lo) * 1e-9
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if not drawn_only or lo - span <= tick.get_loc() <= hi + span:
                    out.append(tick.label1)
    return out


def _texts(fig):
    """The texts the figure draws: every visible non-empty Text, tick labels only where a tick is drawn."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(Text) if id(t) not in {id(x) for x in _tick_labels(fig, drawn_only=False)}]
    texts += _tick_labels(fig)
    # Text's own extent: an annotation's includes the line to its point
    return [(t, Text.get_window_extent(t, renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


def _look(handle) -> tuple:
    """What tells a legend entry apart: colour, marker (a scatter's marker path) and line style."""
    from matplotlib.lines import Line2D

    if isinstance(handle, Line2D):
        return (str(handle.get_color()), str(handle.get_marker()), str(handle.get_linestyle()))
    paths = handle.get_paths()
    return (str(handle.get_facecolor().tolist()), paths[0].vertices.round(3).tobytes() if paths else b"", "")


def check_figure(fig) -> list[str]:
    """Problems of a drawn figure: overlapping texts, mathtext in tick labels, a legend over plotted data."""
    problems = []
    texts = _texts(fig)
    ticks = {id(t) for t in _tick_labels(fig)}
    for (a, ba), (b, bb) in itertools.combinations(texts, 2):
        w = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
        h = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
        # tick labels also need a gap: "100000" "120000" 0.1 pixel apart read as one number
        margin = -3 if id(a) in ticks and id(b) in ticks else 1
        if w > margin and h > margin:
            problems.append(f"overlap: {a.get_text()!r} and {b.get_text()!r}")
    for label in _tick_labels(fig):
        text = label.get_text()
        if label.get_visible() and ("mathdefault" in text or label.get_parse_math()):
            problems.append(f"mathtext tick label: {text!r}")
    for t, _ in texts:
        if "$" in t.get_text() and t.get_parse_math():  # a method label's $ is a character, never TeX
            problems.append(f"text parsed as math: {t.get_text()!r}")
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:  # every entry looks different from every other: colour, marker or line style
            looks = [_look(h) for h in legend.legend_handles]
            for (a, la), (b, lb_) in itertools.combinations(zip([t.get_text() for t in legend.get_texts()], looks), 2):
                if la == lb_:
                    problems.append(f"legend entries look alike: {a!r} and {b!r}")
        if legend is not None:
            box = legend.get_window_extent(fig.canvas.get_renderer())
            for line in ax.get_lines():
                xy = ax.transData.transform(np.column_stack(line.get_data()).astype(float))
                if any(box.contains(x, y) for x, y in xy):
                    problems.append(f"legend covers {line.get_label()!r}")
            for coll in ax.collections:
                offsets = coll.get_offsets()
                if len(offsets) and any(box.contains(x, y) for x, y in ax.transData.transform(offsets)):
                    problems.append(f"legend covers points of {coll.get_label()!r}")
    return problems


@pytest.fixture
def checked(monkeypatch):
    """Every Figure.savefig in the test checks the figure first; the problems are collected per figure."""
    from matplotlib.figure import Figure

    seen: list[tuple[str, list[str]]] = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        seen.append((self.axes[0].get_title() if self.axes else "?", check_figure(self)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return seen


def test_every_report_and_claim_figure_draws_cleanly(checked, tmp_path):
    from clbench.analysis import claim, report
    from clbench.analysis.stats import cd_diagram, rank_methods

    g = _group()
    for _, draw, _ in report.PLOTS:
        assert draw(g)
    assert claim.plot_forgetting_by_intervention(g)
    names = list(METHODS)
    scores = np.array([[METHODS[m] + s for s in range(3)] for m in names])
    cd_diagram(rank_methods(scores, names, ["a", "b", "c"]), tmp_path / "cd.png", title="average rank")
    assert len(checked) == len(report.PLOTS) + 2
    # the claim suite's arms: every one of them within a few parameters of the others (a narrow linear axis)
    for i, row in enumerate(g.rows):
        row.metrics[keys.COST_TRAINABLE_PARAMS] = lb.stat([4226.0 + 8 * (i % 2)] * 3)
    assert report.plot_pareto(g)
    assert [(name, p) for name, p in checked if p] == []


def test_every_run_artifact_figure_draws_cleanly(checked, tmp_path):
    from clbench.analysis import plots

    R = np.tril(np.full((5, 5), 55.5))
    plots.accuracy_heatmap(R, tmp_path / "acc.png", "accuracy matrix")
    sv = np.abs(np.random.default_rng(0).normal(size=(5, 6, 4)))
    plots.spectrum_heatmap(sv, [f"blocks.{i}.attn.qkv" for i in range(6)], tmp_path / "sv.png", "spectra")
    plots.scatter([0.5, 0.5, 0.52], [10.0, 10.2, 30.0], ["task 0", "task 1", "task 2"], tmp_path / "sc.png",
                  ("top1_share", "forgetting", "per task"))
    assert len(checked) == 3
    assert [(name, p) for name, p in checked if p] == []
