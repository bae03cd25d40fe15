"""PNG plots for run artifacts (matplotlib, headless Agg backend).

Every figure clbench draws (here, in the HTML report, the claim plots and the critical-difference diagram) is
drawn under :func:`plain_text`: method labels, suite names and layer names are the user's text, and matplotlib
would read a label such as ``$\\x$`` as TeX math and fail when the figure is saved, after the training.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

F = TypeVar("F", bound=Callable[..., Any])


def plain_text(draw: F) -> F:
    """Run ``draw`` (a function that builds and saves a figure) with matplotlib's math parsing off, so every
    text of the figure is shown as written: ``$`` and ``\\`` in a label are characters, never TeX. Text
    objects read the setting when they are created (tick labels at drawing), so the whole function runs
    under it."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def labelled_png(fig, ax, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> str:
    """A one-axes figure finished as the report draws them (labels, a small title, a light grid, the legend
    outside the axes on the right, where it covers no line or point) and returned as :func:`png_base64`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_base64(fig)


def si_number(value: float) -> str:
    """``1234567`` -> ``1.23457M``; plain ``%g`` below a thousand: a log axis's tick labels as literal text."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def plain_linear_axis(ax, which: str = "x") -> None:
    """At most five literal tick labels on a linear axis, in SI form from 100k on (0, 50k, 100k): matplotlib's
    plain ``100000 120000`` (or ``4226 4227 ... 4234`` on a narrow range) run into each other at the report's
    figure widths."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(MaxNLocator(nbins=5))

    def label(v: float, _pos: int) -> str:
        return si_number(v) if max(abs(t) for t in axis.get_view_interval()) >= 1e5 else f"{v:g}"

    axis.set_major_formatter(FuncFormatter(label))


def plain_symlog_axis(ax, which: str, values: list[float]) -> None:
    """Like :func:`plain_log_axis` for data that holds 0 as well (a method with no trainable parameters):
    linear from 0 to the lowest decade of the positive ``values``, logarithmic above it; 0 and every decade
    labelled as literal text."""
    import math

    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    positive = [v for v in values if v > 0]
    low = 10.0 ** math.floor(math.log10(min(positive))) if positive else 1.0
    high = max(positive) if positive else low
    (ax.set_xscale if which == "x" else ax.set_yscale)("symlog", linthresh=low, linscale=0.5)
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(FixedLocator([0.0] + [10.0 ** k for k in range(round(math.log10(low)),
                                                                          math.floor(math.log10(high)) + 1)]))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: si_number(v)))


def plain_log_axis(ax, which: str = "x") -> None:
    """Log scale on ``ax``'s ``which`` axis with literal tick labels (100, 1k, 20k): matplotlib's own log labels
    are mathtext (``$\\mathdefault{10^{2}}$``), printed raw under :func:`plain_text`. Decades are labelled;
    2 and 5 times a decade too when the axis spans fewer than 3 decades (so a short span still has labels)."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(LogLocator(base=10))
    axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))

    def minor(value: float, _pos: int) -> str:
        lo, hi = sorted(axis.get_view_interval())
        return si_number(value) if lo > 0 and math.log10(hi / lo) < 3 else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: si_number(v)))
    axis.set_minor_formatter(FuncFormatter(minor))


def spread_labels(fig, ax, labels: list) -> None:
    """Move point labels (annotations in offset points) apart until none overlaps another label, a tick label or
    the title: each label, lowest point first, takes the first free slot above or below its point, and a thin
    line joins a moved label to its point. Call after the figure's layout is final."""
    from matplotlib.text import Text

    if not labels:
        return
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    fixed_texts = [ax.title, *ax.get_xticklabels(), *ax.get_yticklabels()]
    taken = [t.get_window_extent(renderer) for t in fixed_texts if t.get_visible() and t.get_text()]
    def text_box(label):  # the text alone (an annotation's own extent includes its line)
        label.update_positions(renderer)
        return Text.get_window_extent(label, renderer)

    for label in sorted(labels, key=lambda a: (a.xy[1], a.xy[0])):
        x0, y0 = label.xyann
        height = text_box(label).height * 72.0 / fig.dpi + 1.0
        for k in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6, 7, -7, 8, -8):
            label.xyann = (x0, y0 + k * height)
            box = text_box(label)
            if not any(box.overlaps(other) for other in taken):
                break
        if label.xyann != (x0, y0):  # the same label again, with a line to its point
            moved = ax.annotate(label.get_text(), label.xy, xytext=label.xyann, textcoords="offset points",
                                fontsize=label.get_fontsize(), color=label.get_color(),
                                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5, "shrinkA": 0,
                                            "shrinkB": 2, "relpos": (0.0, 0.5)})
            label.remove()
            label = moved
        taken.append(text_box(label))


def png_base64(fig) -> str:
    """The figure as a base64 PNG (for an HTML ``<img src="data:...">``: the report's plots and its claim panel);
    the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@plain_text
def accuracy_heatmap(R: np.ndarray, path: Path, title: str) -> None:
    plt = _plt()
    T = R.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * T, 0.8 + 0.55 * T))
    im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    for i in range(T):
        for j in range(i + 1):
            ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if R[i, j] < 60 else "black")
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@plain_text
def spectrum_heatmap(task_sv: np.ndarray, layers: list[str], path: Path, title: str) -> None:
    """Normalised spectrum s_k^2 / sum s^2 of each task's update: rows = (task, layer), columns = k."""
    plt = _plt()
    T, L, K = task_sv.shape
    if K == 0:
        return
    s2 = np.nan_to_num(task_sv) ** 2
    norm = s2 / np.maximum(s2.sum(-1, keepdims=True), 1e-30)
    K = min(K, 32)
    # constrained layout keeps the figure title clear of the per-task subplot titles
    fig, axes = plt.subplots(1, T, figsize=(1.2 + 1.4 * T, 1.4 + 0.18 * L), squeeze=False, sharey=True,
                             layout="constrained")
    for t in range(T):
        ax = axes[0, t]
        im = ax.imshow(norm[t, :, :K], vmin=0, vmax=1, cmap="magma", aspect="auto")
        ax.set_title(f"task {t}", fontsize=8)
        ax.set_xlabel("k")
    axes[0, 0].set_yticks(range(L))
    axes[0, 0].set_yticklabels(layers, fontsize=5)
    fig.suptitle(title + ": s_k^2 / sum s^2 per layer", fontsize=9)
    fig.colorbar(im, ax=axes[0, -1])
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


@plain_text
def scatter(x, y, labels, path: Path, text: tuple[str, str, str]) -> None:
    """Points ``(x, y)`` annotated with ``labels``, into ``path``; ``text``: (x label, y label, title)."""
    xlabel, ylabel, title = text
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(x, y)
    # a flat spectrum gives equal x values: matplotlib would label the axis as an offset (e.g. "+1") over the
    # axis label; plain tick labels and a visible span instead
    ax.ticklabel_format(axis="both", style="plain", useOffset=False)
    for values, set_lim in ((x, ax.set_xlim), (y, ax.set_ylim)):
        finite = [float(v) for v in values if np.isfinite(v)]
        if finite and max(finite) - min(finite) < 1e-9:
            pad = max(abs(finite[0]) * 0.05, 0.05)
            set_lim(finite[0] - pad, finite[0] + pad)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # plain tick labels are long (0.5025): fewer of them
    texts = [ax.annotate(str(lab), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
             for xi, yi, lab in zip(x, y, labels)]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    spread_labels(fig, ax, texts)
    fig.savefig(path, dpi=110)
    plt.close(fig)
