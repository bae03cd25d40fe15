"""The claim suite's figures (issue 24): the effect of each spectral intervention against ``keep``, paired by seed.

``suites/claim.yaml`` trains every arm with the same seeds; each arm differs from the reference entry labelled
``keys.CLAIM_REFERENCE`` (plain IncLoRA) only in what happens to a finished task's update before it is merged.
:func:`claim_effects` pairs each arm's ``final/forgetting`` and ``final/acc`` with the reference's by seed
(``clbench.analysis.stats.paired``: mean difference, t interval, paired t-test p); the parent run logs them as
``claim/<label>/<metric>_diff`` (+ ``_ci95``, ``_p``, ``_n``) and the HTML report draws them
(:func:`claim_plots`), beside per-layer top1_share of later tasks' updates against each task's forgetting.
"""

from __future__ import annotations

import os
import tempfile
import textwrap

import numpy as np

from clbench import keys
from clbench.analysis.leaderboard import Group, fixed
from clbench.analysis.metrics import per_task_forgetting
from clbench.analysis.plots import _plt, labelled_png, plain_text, png_base64
from clbench.analysis.stats import Paired, ci95, fmt_p, paired
from clbench.store.tracking import artifact_downloader

CLAIM_METRICS = {"forgetting": keys.FINAL_FORGETTING, "acc": keys.FINAL_ACC}


def _per_seed(group: Group, label: str, key: str) -> dict[int, float | None]:
    row = next(r for r in group.rows if r.method == label)
    return {r["seed"]: r["values"].get(key) for r in row.runs if r["seed"] is not None}


def is_claim(group: Group) -> bool:
    """A group is a claim comparison when one of its entries carries the reference label."""
    return any(r.method == keys.CLAIM_REFERENCE for r in group.rows)


def claim_effects(group: Group) -> dict[str, dict[str, Paired]]:
    """``{label: {"forgetting": Paired, "acc": Paired}}``: each arm minus the reference, paired by seed, over the
    group's finished runs (positive forgetting diff: the intervention forgets more than ``keep``)."""
    if not is_claim(group):
        return {}
    ref = {m: _per_seed(group, keys.CLAIM_REFERENCE, k) for m, k in CLAIM_METRICS.items()}
    return {row.method: {m: paired(_per_seed(group, row.method, k), ref[m]) for m, k in CLAIM_METRICS.items()}
            for row in group.rows if row.method != keys.CLAIM_REFERENCE}


def claim_metrics(effects: dict[str, dict[str, Paired]]) -> dict[str, float]:
    """The parent run's ``claim/*`` metrics; a statistic that is undefined (too few pairs) is left out."""
    out: dict[str, float] = {}
    for label, per_metric in effects.items():
        for metric, eff in per_metric.items():
            out[keys.claim_key(label, metric, "n")] = float(eff.n)
            for stat, value in (("diff", eff.diff), ("ci95", eff.ci95), ("p", eff.p)):
                if value is not None:
                    out[keys.claim_key(label, metric, stat)] = float(value)
    return out


def fmt_effect(eff: Paired) -> str:
    """``-1.50 ± 5.60 (p=0.50, n=5)``: one arm's paired difference against ``keep`` as the terminal shows it."""
    if eff.diff is None:
        return "- (no common seed)"
    text = fixed(eff.diff, "+.2f") + ("" if eff.ci95 is None else " ± " + fixed(eff.ci95, ".2f"))
    if eff.p is None:
        return text + (" (1 seed: no interval)" if eff.n == 1 else f" (n={eff.n})")
    return text + f" ({fmt_p(eff.p)}, n={eff.n})"


def claim_lines(group: Group) -> list[str]:
    """The claim's answer as text: per arm, the paired difference against ``keep`` of forgetting and accuracy
    (``claim_effects``, the numbers the parent run logs as ``claim/*`` and the HTML report draws); empty for a
    group that is not a claim comparison."""
    effects = claim_effects(group)
    if not effects:
        return []
    cells = [["arm", f"{keys.FINAL_FORGETTING} - keep", f"{keys.FINAL_ACC} - keep"]]
    cells += [[label, fmt_effect(e["forgetting"]), fmt_effect(e["acc"])] for label, e in effects.items()]
    widths = [max(len(r[i]) for r in cells) for i in range(3)]
    table = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in cells]
    head = (f"claim ({', '.join(group.suites)} · suite hash {group.suite_hash}): each arm minus keep, paired by "
            "seed: mean ± t 95% half-width (paired t-test p, n seeds)")
    foot = ("negative forgetting difference: the arm forgets less than keep; an interval containing 0: no effect "
            "distinguishable at this n")
    return [*textwrap.wrap(head, 100), table[0], "  ".join("-" * w for w in widths), *table[1:],
            *textwrap.wrap(foot, 100), ""]


@plain_text
def plot_forgetting_by_intervention(group: Group) -> str | None:
    """Final forgetting per arm (mean and t 95% interval over seeds), the paired effect against ``keep`` in the
    tick labels."""
    if not is_claim(group):
        return None
    effects = claim_effects(group)
    plt = _plt()
    # about 0.9 inch per arm (its name and "Δ -5.7 ± 8.0" under it), so a suite with more arms gets a wider figure
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(group.rows) + 1.0), 4))
    labels, ticks = [], []
    for i, row in enumerate(group.rows):
        vals = [r["values"].get(keys.FINAL_FORGETTING) for r in row.runs]
        vals = [v for v in vals if v is not None and np.isfinite(v)]
        if not vals:
            continue
        half = ci95(vals) or 0.0
        ax.errorbar([i], [np.mean(vals)], yerr=[half], fmt="o", capsize=4)
        ax.scatter([i] * len(vals), vals, s=8, color="grey", alpha=0.6)
        eff = effects.get(row.method, {}).get("forgetting")
        extra = ""
        if eff is not None and eff.diff is not None:
            extra = f"\nΔ {eff.diff:+.1f}" + (f" ± {eff.ci95:.1f}" if eff.ci95 is not None else "")
            extra += f"\n{fmt_p(eff.p)}" if eff.p is not None else ""
        ticks.append(i)
        labels.append(f"{row.method}{extra}")
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylabel(f"{keys.FINAL_FORGETTING} (points)")
    ax.set_title("forgetting by intervention: mean ± t 95% interval over seeds; Δ = paired diff vs keep",
                 fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_base64(fig)


def layer_points(R: np.ndarray, layer_top1: np.ndarray) -> list[tuple[float, float]]:
    """(mean top1_share of the later tasks' updates in one layer, forgetting of task j) for every task j < T-1
    and layer; ``layer_top1[t, l]`` is task t's update's top1_share in layer l."""
    T = R.shape[0]
    if T < 2:
        return []
    f = per_task_forgetting(R)
    return [(float(np.nanmean(layer_top1[j + 1:, li])), float(f[j]))
            for j in range(T - 1) for li in range(layer_top1.shape[1])]


def _run_points(download, run_id: str) -> list[tuple[float, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            R = np.loadtxt(download(run_id, "acc_matrix.csv", tmp), delimiter=",", ndmin=2)
            with np.load(download(run_id, "spectra.npz", tmp)) as z:
                names = [str(n) for n in z["layer_metric_names"]]
                top1 = z["layer_metrics"][:, :, names.index("top1_share")]
        except Exception:  # noqa: BLE001  a run without spectra (or artifacts) adds no point
            return []
    return layer_points(R, top1)


def _all_points(download, run_ids: list[str]) -> list[tuple[float, float]]:
    # MLflow draws a progress bar per download; the report's reader gets no value from 60 of them on stderr
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        return [p for run_id in run_ids for p in _run_points(download, run_id)]
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


@plain_text
def plot_layer_top1_forgetting(group: Group, uri: str | None) -> str | None:
    """Per layer and earlier task, over every finished run: the top1_share of the later tasks' updates in that
    layer against the task's forgetting, coloured by arm (read from each run's spectra.npz and acc_matrix.csv)."""
    if not is_claim(group):
        return None
    download = artifact_downloader(uri)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for row in group.rows:
        pts = _all_points(download, [r["run_id"] for r in row.runs])
        if pts:
            drawn = True
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, alpha=0.5, label=row.method)
    if not drawn:
        plt.close(fig)
        return None
    return labelled_png(fig, ax, "top1_share of later tasks' updates (one layer)", "forgetting of task j (points)",
                        "per layer and task: imbalance of later updates vs forgetting", legend_size=7)


def claim_plots(group: Group, uri: str | None = None) -> list[tuple[str, str, str]]:
    """The report's claim panel: (name, base64 PNG, caption) per drawable plot; empty for other groups."""
    out = []
    png = plot_forgetting_by_intervention(group)
    if png:
        out.append(("claim-forgetting", png, "Claim suite: final forgetting per intervention (dots: seeds); "
                    "Δ is the paired difference against keep over seeds with its t 95% interval and p."))
    png = plot_layer_top1_forgetting(group, uri)
    if png:
        out.append(("claim-layers", png, "Claim suite: every (run, layer, earlier task j): the mean top1_share "
                    "of that layer's later task updates against task j's forgetting."))
    return out
