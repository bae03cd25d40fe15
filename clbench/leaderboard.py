"""The leaderboard: aggregates clbench child runs over seeds and renders them as text, Markdown, CSV or JSON.

Pure functions on ``clbench.tracking.RunInfo`` records; only :func:`load_runs` touches MLflow, through
``clbench.tracking``, and only to read. Every column is shown under the MLflow key it reads (``clbench.keys``).
The rules:

* Runs are grouped by (experiment, suite hash): runs of different protocols are never compared.
* Inside a group one row per method label (and per distinct method/train params under that label, so an edited
  suite never silently mixes configurations); the seeds of a row are aggregated as mean, sample standard
  deviation (ddof=1, None for a single seed) and n.
* Only FINISHED runs are averaged. FAILED, KILLED and RUNNING runs are listed as such, never averaged in.
* A seed run twice with the same protocol and params counts once: the latest finished run is used, earlier ones
  are listed as superseded (otherwise a rerun would inflate n and shrink the standard deviation).
* A reproduction suite's ``reference:`` block (logged as the ``clbench.reference`` tag) gives one reference row
  per (entry, metric): the published mean next to the measured mean, their difference (measured - published)
  and whether it is within the entry's tolerance; per seed too where the source gives per-seed numbers.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clbench import keys
from clbench.errors import ClbenchError
from clbench.suite import load_suite
from clbench.tracking import RunInfo, read_runs


@dataclass(frozen=True)
class MetricSpec:
    key: str
    short: str
    higher_is_better: bool
    fmt: str
    show_std: bool = True


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(keys.FINAL_ACC, "acc", True, ".2f"),
    MetricSpec(keys.FINAL_AVG_ACC, "avg_acc", True, ".2f"),
    MetricSpec(keys.FINAL_FORGETTING, "forgetting", False, ".2f"),
    MetricSpec(keys.FINAL_BWT, "bwt", True, ".2f"),
    MetricSpec(keys.FINAL_ACC_TIL, "acc_til", True, ".2f"),
    MetricSpec(keys.SPECTRA_MEAN_TOP1, "mean_top1_share", False, ".3f"),
    MetricSpec(keys.SPECTRA_MEAN_OVERLAP, "mean_overlap", False, ".3f"),
    MetricSpec(keys.COST_TRAIN_SECONDS, "train_s", False, ".1f", show_std=False),
    MetricSpec(keys.COST_IMG_PER_S, "img_per_s", True, ".0f", show_std=False),
    MetricSpec(keys.COST_PEAK_MEM_MB, "peak_mem_mb", False, ".0f", show_std=False),
    MetricSpec(keys.COST_TRAINABLE_PARAMS, "params", False, ".0f", show_std=False),
)
METRIC_KEYS = tuple(m.key for m in METRICS)
SPEC = {m.key: m for m in METRICS}
PROVENANCE_TAGS = {"version": keys.VERSION, "git_sha": keys.GIT_SHA, "device": keys.DEVICE}
FORMATS = ("table", "markdown", "csv", "json", "html")


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int


@dataclass
class Row:
    method: str
    method_name: str
    params_id: str
    n: int
    seeds: list[int]
    metrics: dict[str, Stat]
    provenance: dict[str, list[str]]
    runs: list[dict[str, Any]] = field(default_factory=list)  # per finished seed: run_id, seed, values, curve
    curve: list[Stat] = field(default_factory=list)  # eval/acc after task i, over seeds
    superseded: list[str] = field(default_factory=list)


@dataclass
class Correlation:
    """The suite's imbalance-forgetting evidence, one definition for the parent run's metrics and the report's
    plot: Spearman's rho (and its two-sided p) between ``spectra/mean_top1_share`` (the mean over tasks of the
    top singular value's share in each task's update, averaged over layers) and ``final/forgetting``, over every
    finished run of the group the leaderboard averages (the latest finished run per method row and seed) that
    logged both. ``rho`` is None below 3 runs or when either side is constant."""

    x: list[float]
    y: list[float]
    labels: list[str]
    rho: float | None = None
    p: float | None = None

    @property
    def n(self) -> int:
        return len(self.x)

    def title(self) -> str:
        runs = f"{self.n} finished runs"
        return runs if self.rho is None else f"Spearman rho = {self.rho:.3f} (p = {self.p:.3g}) over {runs}"


@dataclass
class ReferenceRow:
    """One published number next to its measurement: ``diff`` = measured mean - reference, ``within`` =
    |diff| <= tolerance (None when either side is missing). ``per_seed``: seed, reference, measured, diff."""

    method: str
    metric: str
    source: str
    reference: float | None
    measured: float | None
    n: int
    tolerance: float
    diff: float | None
    within: bool | None
    per_seed: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Group:
    experiment: str
    suites: list[str]
    suite_hash: str
    rows: list[Row]
    unfinished: list[dict[str, Any]]
    sort_key: str = keys.FINAL_ACC
    imbalance_forgetting: Correlation = field(default_factory=lambda: Correlation([], [], []))
    references: list[ReferenceRow] = field(default_factory=list)


# --- per-run values ------------------------------------------------------------------------------------------

def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def run_value(run: RunInfo, key: str) -> float | None:
    """The run's last logged value of ``key`` (None when the run lacks it or it is not finite)."""
    return _finite(run.metrics.get(key))


def stat(values: Iterable[float | None]) -> Stat:
    """Mean, sample standard deviation (ddof=1; None for one value) and count of the finite values."""
    vals = [f for f in (_finite(v) for v in values) if f is not None]
    if not vals:
        return Stat(None, None, 0)
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return Stat(mean, std, len(vals))


def params_id(run: RunInfo) -> str:
    """Fingerprint of what a run's method did: its method params and its (possibly overridden) train config."""
    items = sorted((k, v) for k, v in run.params.items() if k.startswith(("method.", "train.")))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:8]


def _seed(run: RunInfo) -> int | None:
    raw = run.tags.get(keys.SEED, run.params.get("seed"))
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


# --- aggregation ---------------------------------------------------------------------------------------------

def aggregate(runs: list[RunInfo], sort: str = keys.FINAL_ACC) -> list[Group]:
    """Group child runs by (experiment, suite hash), then by method; aggregate each method's finished seeds."""
    sort = resolve_sort_key(sort)
    by_group: dict[tuple[str, str], list[RunInfo]] = {}
    for run in runs:
        key = (run.experiment, run.tags.get(keys.SUITE_HASH, "unknown"))
        by_group.setdefault(key, []).append(run)
    groups = []
    for (experiment, suite_hash), members in by_group.items():
        groups.append(_group(experiment, suite_hash, members, sort))
    latest = {id(g): max((r.start_time or 0) for r in by_group[(g.experiment, g.suite_hash)]) for g in groups}
    groups.sort(key=lambda g: (g.experiment, -latest[id(g)]))
    return groups


def _group(experiment: str, suite_hash: str, runs: list[RunInfo], sort: str) -> Group:
    by_row: dict[tuple[str, str], list[RunInfo]] = {}
    for run in runs:
        label = run.tags.get(keys.METHOD) or run.tags.get(keys.METHOD_NAME) or "?"
        by_row.setdefault((label, params_id(run)), []).append(run)
    ids_per_label: dict[str, int] = {}
    for label, _ in by_row:
        ids_per_label[label] = ids_per_label.get(label, 0) + 1
    rows, unfinished = [], []
    for (label, pid), members in by_row.items():
        name = label if ids_per_label[label] == 1 else f"{label} [{pid}]"
        members.sort(key=lambda r: r.start_time or 0, reverse=True)
        chosen: dict[int | None, RunInfo] = {}
        superseded = []
        for run in members:
            if run.status != "FINISHED":
                unfinished.append({"method": name, "seed": _seed(run), "status": run.status,
                                   "run_id": run.run_id, "run_name": run.run_name})
            elif _seed(run) in chosen:
                superseded.append(run.run_id)
            else:
                chosen[_seed(run)] = run
        done = sorted(chosen.values(), key=lambda r: (_seed(r) is None, _seed(r) or 0))
        rows.append(_row(name, members[0], pid, done, superseded))
    unfinished.sort(key=lambda u: (u["method"], u["seed"] if u["seed"] is not None else -1, u["run_id"]))
    suites = sorted({r.tags.get(keys.SUITE, "?") for r in runs})
    rows = sort_rows(rows, sort)
    return Group(experiment, suites, suite_hash, rows, unfinished, sort, imbalance_forgetting(rows),
                 reference_rows(rows, runs))


def reference_rows(rows: list[Row], runs: list[RunInfo]) -> list[ReferenceRow]:
    """The reference rows of a group: from the latest run's ``clbench.reference`` tag (the suite's block)."""
    tagged = sorted((r for r in runs if r.tags.get(keys.REFERENCE)), key=lambda r: r.start_time or 0)
    if not tagged:
        return []
    try:
        entries = json.loads(tagged[-1].tags[keys.REFERENCE])
    except ValueError:
        return []
    out = []
    for entry in entries:
        label = entry.get("method")
        matches = [row for row in rows if row.method == label or row.method.startswith(f"{label} [")] or [None]
        for row in matches:
            for metric, ref in entry.get("mean", {}).items():
                out.append(_reference_row(row, label, metric, ref, entry))
    return out


def _reference_row(row: Row | None, label: str, metric: str, ref: float | None, entry: dict) -> ReferenceRow:
    tol = float(entry.get("tolerance", 1.0))
    measured = row.metrics[metric] if row is not None and metric in row.metrics else Stat(None, None, 0)
    diff = None if ref is None or measured.mean is None else measured.mean - float(ref)
    by_seed = {r["seed"]: r["values"].get(metric) for r in (row.runs if row is not None else [])}
    per_seed = []
    for seed, values in sorted(entry.get("per_seed", {}).items(), key=lambda kv: int(kv[0])):
        if metric in values:
            got = by_seed.get(int(seed))
            per_seed.append({"seed": int(seed), "reference": values[metric], "measured": got,
                             "diff": None if got is None else got - values[metric]})
    return ReferenceRow(row.method if row is not None else label, metric, entry.get("source", "?"),
                        None if ref is None else float(ref), measured.mean, measured.n, tol, diff,
                        None if diff is None else abs(diff) <= tol, per_seed)


def imbalance_forgetting(rows: list[Row]) -> Correlation:
    """Spearman correlation between spectral imbalance and forgetting over the rows' runs (``Correlation``)."""
    pts = [(r["values"][keys.SPECTRA_MEAN_TOP1], r["values"][keys.FINAL_FORGETTING], f"{row.method}/s{r['seed']}")
           for row in rows for r in row.runs]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    ev = Correlation([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])
    if ev.n >= 3 and len(set(ev.x)) > 1 and len(set(ev.y)) > 1:
        from scipy.stats import spearmanr

        res = spearmanr(ev.x, ev.y)
        ev.rho, ev.p = float(res.statistic), float(res.pvalue)
    return ev


def _row(name: str, any_run: RunInfo, pid: str, done: list[RunInfo], superseded: list[str]) -> Row:
    per_run = []
    for run in done:
        curve = [v for _, v in run.history.get(keys.EVAL_ACC, [])]
        per_run.append({"run_id": run.run_id, "seed": _seed(run),
                        "values": {k: run_value(run, k) for k in METRIC_KEYS}, "curve": curve})
    steps = max((len(r["curve"]) for r in per_run), default=0)
    curve = [stat(_finite(r["curve"][i]) for r in per_run if i < len(r["curve"])) for i in range(steps)]
    prov = {name_: sorted({r.tags[tag] for r in done if r.tags.get(tag)})
            for name_, tag in PROVENANCE_TAGS.items()}
    prov["precision"] = sorted({r.tags[keys.PRECISION] for r in done if r.tags.get(keys.PRECISION)})
    prov["runtime"] = sorted({runtime_text(r) for r in done} - {""})
    return Row(method=name, method_name=any_run.tags.get(keys.METHOD_NAME, name), params_id=pid,
               n=len(done), seeds=[s for s in (_seed(r) for r in done) if s is not None],
               metrics={k: stat(r["values"][k] for r in per_run) for k in METRIC_KEYS},
               provenance=prov, runs=per_run, curve=curve, superseded=superseded)


def resolve_sort_key(key: str) -> str:
    """A full metric key, its short name (``acc``, ``forgetting``, ``train_s``...) or ``method``."""
    if key in SPEC or key == "method":
        return key
    for m in METRICS:
        if key in (m.short, m.key.split("/")[-1]):
            return m.key
    raise ClbenchError(f"--sort {key}: unknown key; choose from method, "
                       + ", ".join(f"{m.key} ({m.short})" for m in METRICS))


def sort_rows(rows: list[Row], key: str) -> list[Row]:
    """Best first in the key's own direction (higher accuracy, lower forgetting or cost); missing values last."""
    key = resolve_sort_key(key)
    if key == "method":
        return sorted(rows, key=lambda r: r.method)

    def order(row: Row):
        mean = row.metrics[key].mean
        if mean is None:
            return (1, 0.0, row.method)
        return (0, -mean if SPEC[key].higher_is_better else mean, row.method)

    return sorted(rows, key=order)


def load_runs(target: str | None, uri: str | None = None) -> list[RunInfo]:
    """Runs for ``clbench leaderboard [SUITE]``: a suite file, an experiment name, a suite name, or everything."""
    if target is None:
        runs = read_runs(None, uri)
        if not runs:
            raise ClbenchError("leaderboard: no clbench runs in the tracking store; run `clbench run SUITE` first")
        return runs
    path = Path(target)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        suite = load_suite(path)
        experiment = suite.tracking.experiment or suite.name
        runs = read_runs(experiment, uri or suite.tracking.uri)
        if not runs:
            raise ClbenchError(f"leaderboard: experiment '{experiment}' has no clbench runs; run "
                               f"`clbench run {target}` first")
        return runs
    try:
        runs = read_runs(target, uri)
    except ClbenchError as exc:  # not an experiment name: maybe a suite name logged under another experiment
        runs = [r for r in read_runs(None, uri) if r.tags.get(keys.SUITE) == target]
        if not runs:
            raise exc from None
    if not runs:
        raise ClbenchError(f"leaderboard: experiment '{target}' has no clbench runs")
    return runs


def build(target: str | None, uri: str | None = None, sort: str = keys.FINAL_ACC) -> list[Group]:
    return aggregate(load_runs(target, uri), resolve_sort_key(sort))


# --- rendering -----------------------------------------------------------------------------------------------

def fmt_stat(s: Stat, spec: MetricSpec, std: bool = True) -> str:
    if s.mean is None:
        return "-"
    text = format(s.mean, spec.fmt)
    if std and spec.show_std and s.std is not None:
        text += " ± " + format(s.std, spec.fmt)
    return text


def group_title(g: Group) -> str:
    return f"suite {', '.join(g.suites)} · suite hash {g.suite_hash} · experiment {g.experiment}"


def runtime_text(run: RunInfo) -> str:
    """The run's runtime settings (suite ``runtime:``, outside the hash) as ``key=value`` pairs."""
    pairs = sorted((k.removeprefix(keys.RUNTIME_PREFIX), v) for k, v in run.tags.items()
                   if k.startswith(keys.RUNTIME_PREFIX))
    return " ".join(f"{k}={v}" for k, v in pairs)


def provenance_lines(g: Group) -> list[str]:
    """One line per distinct provenance, naming the methods it applies to."""
    seen: dict[str, list[str]] = {}
    for row in g.rows:
        p = row.provenance
        line = (f"clbench {', '.join(p['version']) or '?'} · git {', '.join(s[:10] for s in p['git_sha']) or '?'}"
                f" · device {', '.join(p['device']) or '?'}")
        if p.get("precision"):
            line += f" · precision {', '.join(p['precision'])}"
        if p.get("runtime"):
            line += f" · runtime {'; '.join(p['runtime'])}"
        seen.setdefault(line, []).append(row.method)
    if len(seen) == 1:
        return [f"provenance: {next(iter(seen))}"]
    return [f"provenance ({', '.join(methods)}): {line}" for line, methods in seen.items()]


def reference_lines(g: Group) -> list[str]:
    """One line per reference row: published vs measured mean, the difference and the verdict."""
    out = []
    for r in g.references:
        head = f"reference {r.method} {r.metric}: "
        if r.reference is None:
            out.append(head + f"no published number ({r.source})")
            continue
        measured = "no finished run" if r.measured is None else f"measured {r.measured:.2f} (n {r.n})"
        verdict = "" if r.diff is None else (f", diff {r.diff:+.2f}: " + ("within" if r.within else "NOT within")
                                             + f" ±{r.tolerance:g}")
        seeds = "; ".join(f"s{p['seed']} {p['reference']:.2f}"
                          + ("" if p["diff"] is None else f" ({p['diff']:+.2f})") for p in r.per_seed)
        out.append(head + f"published {r.reference:.2f} vs {measured}{verdict}"
                   + (f" [per seed: {seeds}]" if seeds else "") + f" (source: {r.source})")
    return out


def note_lines(g: Group) -> list[str]:
    lines = [f"not averaged in: {u['method']} seed {u['seed']} {u['status']} (run {u['run_id'][:8]})"
             for u in g.unfinished]
    lines += [f"superseded by a later run of the same seed: {row.method} run {rid[:8]}"
              for row in g.rows for rid in row.superseded]
    return lines


def table_cells(g: Group) -> tuple[list[str], list[list[str]]]:
    header = ["#", "method", "n", *[m.key for m in METRICS]]  # every column under the MLflow key it reads
    body = [[str(i + 1), row.method, str(row.n), *[fmt_stat(row.metrics[m.key], m) for m in METRICS]]
            for i, row in enumerate(g.rows)]
    return header, body


def render_table(groups: list[Group]) -> str:
    out = []
    for g in groups:
        header, body = table_cells(g)
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def line(cells: list[str], widths: list[int] = widths) -> str:
            return "  ".join(c.ljust(w) if i == 1 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        out += [group_title(g) + f" · sorted by {g.sort_key}", line(header), line(["-" * w for w in widths])]
        out += [line(r) for r in body]
        out += reference_lines(g) + provenance_lines(g) + note_lines(g) + [""]
    return "\n".join(out)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(groups: list[Group]) -> str:
    out = []
    for g in groups:
        header, body = table_cells(g)
        out += [f"### {_md_escape(group_title(g))}", "", f"Sorted by `{g.sort_key}`; mean ± std over seeds.", ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---:" if i != 1 else ":---" for i in range(len(header))) + "|")
        out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in body]
        out += [""] + [f"- {_md_escape(x)}" for x in reference_lines(g) + provenance_lines(g) + note_lines(g)] + [""]
    return "\n".join(out)


def csv_header() -> list[str]:
    cols = ["experiment", "suite", "suite_hash", "rank", "method", "method_name", "params_id", "n", "seeds"]
    for m in METRICS:
        cols += [f"{m.key}_mean", f"{m.key}_std", f"{m.key}_n"]
    return cols + ["clbench_version", "git_sha", "device", "not_averaged"]


def render_csv(groups: list[Group]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(csv_header())
    for g in groups:
        for i, row in enumerate(g.rows):
            cells: list[Any] = [g.experiment, ";".join(g.suites), g.suite_hash, i + 1, row.method, row.method_name,
                                row.params_id, row.n, ";".join(map(str, row.seeds))]
            for m in METRICS:
                s = row.metrics[m.key]
                cells += ["" if s.mean is None else repr(s.mean), "" if s.std is None else repr(s.std), s.n]
            bad = [f"seed {u['seed']} {u['status']} {u['run_id']}" for u in g.unfinished if u["method"] == row.method]
            cells += [";".join(row.provenance[k]) for k in PROVENANCE_TAGS] + [";".join(bad)]
            w.writerow(cells)
    return buf.getvalue()


def to_dict(groups: list[Group]) -> dict[str, Any]:
    return {"metrics": list(METRIC_KEYS), "std": "sample standard deviation over seeds (ddof=1)",
            "groups": [asdict(g) for g in groups]}


def render_json(groups: list[Group]) -> str:
    return json.dumps(to_dict(groups), indent=2, allow_nan=False)


TEXT_RENDERERS = {"table": render_table, "markdown": render_markdown, "csv": render_csv, "json": render_json}


def render(groups: list[Group], fmt: str) -> str:
    """The leaderboard in a text format (``clbench.report.render`` adds ``html``)."""
    if fmt not in TEXT_RENDERERS:
        raise ClbenchError(f"--format {fmt}: choose from {', '.join(FORMATS)}")
    return TEXT_RENDERERS[fmt](groups)
