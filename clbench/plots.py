"""PNG plots for run artifacts (matplotlib, headless Agg backend)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def labelled_png(fig, ax, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> str:
    """A one-axes figure finished as the report draws them (labels, a small title, a legend, a light grid) and
    returned as :func:`png_base64`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_base64(fig)


def png_base64(fig) -> str:
    """The figure as a base64 PNG (for an HTML ``<img src="data:...">``: the report's plots and its claim panel);
    the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


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


def scatter(x, y, labels, path: Path, xlabel: str, ylabel: str, title: str) -> None:
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
    for xi, yi, lab in zip(x, y, labels):
        ax.annotate(str(lab), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
