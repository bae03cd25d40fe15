"""The leaderboard: aggregates clbench child runs over seeds and renders them as text, Markdown, CSV or JSON.

Pure functions on ``clbench.store.tracking.RunInfo`` records; only :func:`load_runs` touches MLflow, through
``clbench.store.tracking``, and only to read. Every column is shown under the MLflow key it reads (``clbench.keys``).
The rules:

* Runs are grouped by (experiment, suite hash): runs of different protocols are never compared.
* Inside a group one row per method label (and per distinct method/train params under that label, so an edited
  suite never silently mixes configurations); the seeds of a row are aggregated as mean, sample standard
  deviation (ddof=1, None for a single seed) and n.
* Every aggregate carries ``ci95``, the half-width of the Student t 95% interval of the mean over seeds
  (``clbench.analysis.stats.ci95``; None for one seed), shown as ``mean ± ci95 (n)``.
* ``--baseline NAME`` adds, per row, the difference to that method paired by seed (``clbench.analysis.stats.paired``), and
  several groups (suites) are ranked per suite with the average rank and the Friedman/Nemenyi tests
  (``rank_suites``).
* Only FINISHED runs are averaged. FAILED, KILLED and RUNNING runs are listed as such, never averaged in.
* A seed run twice with the same protocol and params counts once: the latest finished run is used, earlier ones
  are listed as superseded (otherwise a rerun would inflate n and shrink the standard deviation).
* Reference bounds (docs/METHODS.md section 8) are rows like any other, marked: ``joint`` the upper bound,
  ``finetune`` and ``frozen`` lower references, ``simplecil`` and ``ranpac`` "no continual training" (section 10); when a group has both ends, every row gets its share of the gap
  between them on the sort metric (:func:`mark_references`).
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
from clbench.store.tracking import RunInfo, read_runs, results_store
from clbench.suite import load_suite, suite_files


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
    MetricSpec(keys.COST_TOTAL_SECONDS, "total_s", False, ".1f", show_std=False),  # + the method's own hooks
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
    ci95: float | None = None  # Student t 95% half-width over the n values (None for n < 2)


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
    # metric key -> {diff, ci95, p, n}: this row minus the group's baseline row, paired by seed (None: no baseline)
    vs_baseline: dict[str, dict[str, float | int | None]] | None = None
    reference: str | None = None  # "upper bound" / "lower reference" for the bounds' rows
    gap_share: float | None = None  # (value - lower) / (upper - lower) on the sort metric
    low_rank: bool = True  # False: the method has no low-rank update, its spectra columns read n/a
    # a tuned entry (clbench sweep --then-test): where its values came from (sweep id and run, space, metric, best)
    tuned: dict[str, str] | None = None


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
    baseline: str | None = None  # the row every other row's ``vs_baseline`` is paired against
    references: list[ReferenceRow] = field(default_factory=list)
    backbone: str = ""  # the runs' backbone.name (in the suite hash: one per group)


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
    """Mean, sample standard deviation (ddof=1; None for one value), count and t 95% half-width of the finite
    values."""
    from clbench.analysis.stats import ci95

    vals = [f for f in (_finite(v) for v in values) if f is not None]
    if not vals:
        return Stat(None, None, 0)
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return Stat(mean, std, len(vals), ci95(vals))


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

def aggregate(runs: list[RunInfo], sort: str = keys.FINAL_ACC, baseline: str | None = None) -> list[Group]:
    """Group child runs by (experiment, suite hash), then by method; aggregate each method's finished seeds;
    with ``baseline``, pair every row with that method's row of its group (``compare_to_baseline``)."""
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
    if baseline is not None:
        compare_to_baseline(groups, baseline)
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
    mark_references(rows, gap_key(sort))
    backbones = sorted({r.params.get("backbone.name", "") for r in runs} - {""})
    return Group(experiment, suites, suite_hash, rows, unfinished, sort, imbalance_forgetting(rows),
                 references=reference_rows(rows, runs), backbone=", ".join(backbones))


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
               provenance=prov, runs=per_run, curve=curve, superseded=superseded,
               low_rank=any_run.tags.get(keys.LOW_RANK_UPDATES, "true") != "false", tuned=tuned_from(any_run))


def tuned_from(run: RunInfo) -> dict[str, str] | None:
    """Where a tuned run's hyperparameters came from (its clbench.sweep* tags), None for other runs."""
    if run.tags.get(keys.TUNED) != "true":
        return None
    tags = {"sweep": keys.SWEEP, "sweep_run": keys.SWEEP_RUN, "search_space": keys.SEARCH_SPACE,
            "metric": keys.SWEEP_METRIC, "best": keys.SWEEP_BEST}
    return {name: run.tags.get(tag, "?") for name, tag in tags.items()}


# Registered method names (not labels, so an ablation of joint still counts) -> their role.
# ``simplecil`` / ``ranpac`` train nothing continually (prototypes, a closed-form ridge classifier on frozen
# features): what the pre-trained model gives for free, marked but outside the gap's two ends.
NO_CONTINUAL_TRAINING = "no continual training"
REFERENCES = {"joint": "upper bound", "finetune": "lower reference", "frozen": "lower reference",
              "simplecil": NO_CONTINUAL_TRAINING, "ranpac": NO_CONTINUAL_TRAINING}


def gap_key(sort: str) -> str:
    """The metric the gap shares are measured on: the sort metric (final/acc when sorted by method)."""
    return sort if sort in SPEC else keys.FINAL_ACC


def mark_references(rows: list[Row], key: str) -> None:
    """Mark the reference rows and give every row its share of the gap between them on ``key``.

    The upper end is the best ``joint`` row, the lower end the best ``finetune`` / ``frozen`` row (the stronger
    trivial reference), best in the key's own direction; a row's share is ``(value - lower) / (upper - lower)``:
    0 at the lower reference, 1 at the upper bound, negative below the lower reference. None for every row when
    the group lacks either end or they coincide."""
    for row in rows:
        row.reference, row.gap_share = REFERENCES.get(row.method_name), None
    sign = 1.0 if SPEC[key].higher_is_better else -1.0

    def best(role: str) -> float | None:
        vals = [r.metrics[key].mean for r in rows if r.reference == role and r.metrics[key].mean is not None]
        return max(vals, key=lambda v: sign * v) if vals else None

    upper, lower = best("upper bound"), best("lower reference")
    if upper is None or lower is None or upper == lower:
        return
    for row in rows:
        mean = row.metrics[key].mean
        row.gap_share = None if mean is None else (mean - lower) / (upper - lower)


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
        experiment = suite.experiment
        runs = read_runs(experiment, results_store(suite, uri)[0])
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


def build(target: str | list[str] | None, uri: str | None = None, sort: str = keys.FINAL_ACC,
          baseline: str | None = None) -> list[Group]:
    """The groups of one target, of several (their runs pooled, each run once) or of every experiment (None). A
    suite group file stands for its member suites (one group per protocol, as always)."""
    if target:
        target = [str(m) for t in ([target] if isinstance(target, str) else target) for m in suite_files(t)]
    if isinstance(target, list) and len(target) == 1:
        target = target[0]
    if isinstance(target, list) and target:
        seen: dict[str, RunInfo] = {}
        for t in target:
            seen.update((r.run_id, r) for r in load_runs(t, uri))
        runs = list(seen.values())
    else:
        runs = load_runs(target or None, uri)
    return aggregate(runs, resolve_sort_key(sort), baseline)


# --- statistics over seeds and suites (issue 17): paired comparison with a baseline, ranks across suites -------

def _by_seed(row: Row, key: str) -> dict[int | None, float | None]:
    return {r["seed"]: r["values"][key] for r in row.runs}


def compare_to_baseline(groups: list[Group], baseline: str) -> None:
    """Set every group's ``baseline`` and every other row's ``vs_baseline``: per metric, ``stats.paired`` of the
    row against the baseline row over the seeds both finished. Groups without that method get no comparison;
    a baseline no group has is an error."""
    from clbench.analysis.stats import paired

    found = False
    for g in groups:
        base = next((r for r in g.rows if r.method == baseline), None)
        if base is None:
            continue
        found, g.baseline = True, baseline
        for row in g.rows:
            if row is not base:
                row.vs_baseline = {k: paired(_by_seed(row, k), _by_seed(base, k)).as_dict() for k in METRIC_KEYS}
    if not found:
        methods = sorted({r.method for g in groups for r in g.rows})
        raise ClbenchError(f"--baseline {baseline}: no such method in the selected runs; choose from "
                           f"{', '.join(methods) or '(none)'}")


def baseline_key(g: Group) -> str:
    """The metric of the compact comparison column: the sort key (final/acc when sorted by method)."""
    return keys.FINAL_ACC if g.sort_key == "method" else g.sort_key


def fmt_paired(row: Row, baseline: str, spec: MetricSpec) -> str:
    """``+2.30 ± 1.10 (p=0.02)``: mean paired difference to the baseline, its t half-width and the paired
    t-test's p; ``baseline`` on the baseline's own row, ``-`` without common seeds."""
    if row.method == baseline:
        return "baseline"
    d = (row.vs_baseline or {}).get(spec.key) or {}
    if d.get("diff") is None:
        return "-"
    fmt = spec.fmt
    if d["diff"] != 0 and format(d["diff"], fmt).lstrip("+-").strip("0.") == "":  # +0.0004 is no +0.000
        fmt = ".2g"
    text = fixed(d["diff"], "+" + fmt)
    if d["ci95"] is not None:
        text += " ± " + fixed(d["ci95"], fmt)
    if d.get("zero_variance"):
        from clbench.analysis.stats import NO_TEST

        return f"{text} ({NO_TEST}, n={d['n']})"
    if d["p"] is not None:
        from clbench.analysis.stats import fmt_p

        return text + f" ({fmt_p(d['p'])})"
    return text + (" (1 seed: no interval)" if d["n"] == 1 else f" (n={d['n']})")


def baseline_notes(g: Group) -> list[str]:
    """Why a paired comparison has no interval: one common seed gives a difference but no spread to measure."""
    if g.baseline is None:
        return []
    key = baseline_key(g)
    single = [r.method for r in g.rows if ((r.vs_baseline or {}).get(key) or {}).get("n") == 1]
    if not single:
        return []
    return [f"vs {g.baseline}: {', '.join(single)} share{'s' if len(single) == 1 else ''} one finished seed with "
            f"{g.baseline}, so the difference has no interval and no p (a paired t interval needs 2 seeds or more: "
            "add seeds to the suite's seeds: list or run more with --seed N)"]


@dataclass
class SuiteRanks:
    """Methods ranked within every suite (group) by ``metric`` and averaged (``stats.Ranking``): over the groups
    with at least 2 methods that logged it, for the methods with a value in every one of those groups
    (Friedman and Nemenyi need complete blocks); what that leaves out is named."""

    metric: str
    ranking: Any  # clbench.analysis.stats.Ranking
    scores: dict[str, dict[str, float]]  # method -> suite label -> mean over seeds
    left_out_methods: list[str]
    left_out_suites: list[str]

    @property
    def diagram(self) -> bool:
        """A critical-difference diagram needs at least 3 suites (and the ranking's at least 2 methods)."""
        return len(self.ranking.suites) >= 3

    def order(self) -> list[int]:
        return sorted(range(len(self.ranking.methods)), key=lambda i: (self.ranking.avg_rank[i],
                                                                         self.ranking.methods[i]))

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "higher_is_better": SPEC[self.metric].higher_is_better,
                "scores": self.scores, **self.ranking.as_dict(),
                "left_out": {"methods": self.left_out_methods, "suites": self.left_out_suites}}


def suite_label(g: Group, groups: list[Group]) -> str:
    """The group's suite name(s), with its suite hash when another shown group has the same name(s)."""
    name = ", ".join(g.suites)
    same = [h for h in groups if ", ".join(h.suites) == name]
    return name if len(same) == 1 else f"{name} [{g.suite_hash[:8]}]"


def _rank_table(groups: list[Group]) -> tuple[str, dict[str, dict[str, float]], list[str], list[str]]:
    """The sort metric, method -> suite label -> mean, the suite labels with at least 2 methods and the others."""
    metric = baseline_key(groups[0])
    table: dict[str, dict[str, float]] = {}
    used, skipped = [], []
    for g in groups:
        label = suite_label(g, groups)
        means = {r.method: r.metrics[metric].mean for r in g.rows if r.metrics[metric].mean is not None}
        if len(means) < 2:
            skipped.append(label)
            continue
        used.append(label)
        for method, mean in means.items():
            table.setdefault(method, {})[label] = mean
    return metric, table, used, skipped


def rank_suites(groups: list[Group]) -> SuiteRanks | None:
    """Ranks across the groups by their sort metric (``SuiteRanks``); None with fewer than 2 such groups or
    fewer than 2 methods common to all of them (``no_ranking_reason`` says which)."""
    from clbench.analysis.stats import complete_block, rank_methods

    if len(groups) < 2:
        return None
    metric, table, used, skipped = _rank_table(groups)
    if len(used) < 2:
        return None
    methods, scores = complete_block(table, used)
    if len(methods) < 2:
        return None
    ranking = rank_methods(scores, methods, used, higher_is_better=SPEC[metric].higher_is_better)
    return SuiteRanks(metric, ranking, {m: table[m] for m in methods},
                      sorted(m for m in table if m not in methods), skipped)


def no_ranking_reason(groups: list[Group]) -> str | None:
    """Why several groups (suites) get no ranks across them, in one line; None when they are ranked or there is
    only one group (nothing to rank across)."""
    if len(groups) < 2 or rank_suites(groups) is not None:
        return None
    metric, table, used, skipped = _rank_table(groups)
    head = f"no ranks across these {len(groups)} suites: "
    if len(used) < 2:
        return (head + f"ranking needs 2 suites with 2 or more methods that logged {metric}; "
                + f"{', '.join(skipped)} {'has' if len(skipped) == 1 else 'have'} fewer")
    common = sorted(m for m in table if all(label in table[m] for label in used))
    per_suite = "; ".join(f"{label}: {', '.join(sorted(m for m in table if label in table[m]))}" for label in used)
    return (head + f"ranks compare methods (labels) that ran in every suite, and {len(common)} "
            f"{'does' if len(common) == 1 else 'do'} ({', '.join(common) or 'none'}; a ranking needs 2) [{per_suite}]")


def ranks_notes(r: SuiteRanks) -> list[str]:
    """The tests under the ranks, in words: Friedman, Iman-Davenport, the Nemenyi CD and its cliques."""
    rk = r.ranking
    lines = []
    if rk.friedman_stat is None:
        lines.append("Friedman test: undefined (every suite ties every method)")
    else:
        f = "inf" if not math.isfinite(rk.iman_davenport_f) else f"{rk.iman_davenport_f:.3g}"
        lines.append(f"Friedman chi2 = {rk.friedman_stat:.3g} (p = {rk.friedman_p:.3g}); Iman-Davenport F = {f} "
                     f"(p = {rk.iman_davenport_p:.3g}); {len(rk.methods)} methods over {len(rk.suites)} suites")
    if rk.cd is not None:
        groups = "; ".join("{" + ", ".join(rk.methods[i] for i in c) + "}" for c in rk.cliques) or "none"
        lines.append(f"Nemenyi critical difference (alpha = {rk.alpha:g}) = {rk.cd:.3f}; not significantly "
                     f"different: {groups}")
    if r.left_out_methods:
        lines.append(f"left out (not in every ranked suite): {', '.join(r.left_out_methods)}")
    if r.left_out_suites:
        lines.append(f"suites left out (fewer than 2 methods with {r.metric}): {', '.join(r.left_out_suites)}")
    return lines


def ranks_cells(r: SuiteRanks) -> tuple[list[str], list[list[str]]]:
    """Methods by average rank: their rank in every suite (1 = best, ties averaged), then the average."""
    rk = r.ranking
    header = ["method", *rk.suites, "average rank"]
    body = [[rk.methods[i], *[f"{v:g}" for v in rk.ranks[i]], f"{rk.avg_rank[i]:.2f}"] for i in r.order()]
    return header, body


def render_ranks_table(r: SuiteRanks) -> list[str]:
    header, body = ranks_cells(r)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    direction = "higher" if SPEC[r.metric].higher_is_better else "lower"
    return [f"ranks across suites by {r.metric} ({direction} is better; 1 = best)", fmt(header),
            fmt(["-" * w for w in widths]), *[fmt(b) for b in body], *ranks_notes(r), ""]


def render_ranks_markdown(r: SuiteRanks) -> list[str]:
    header, body = ranks_cells(r)
    out = [f"### Ranks across suites by `{r.metric}`", "",
           "| " + " | ".join(_md_escape(h) for h in header) + " |",
           "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(_md_escape(c) for c in b) + " |" for b in body]
    return out + [""] + [f"- {_md_escape(x)}" for x in ranks_notes(r)] + [""]


# --- rendering -----------------------------------------------------------------------------------------------

def fixed(value: float, fmt: str) -> str:
    """``format(value, fmt)`` without a negative zero: a value that rounds to 0 prints ``0.00``, never ``-0.00``
    (a ``+`` format keeps its sign: ``+0.00``)."""
    text = format(value, fmt)
    if text.lstrip("+-").strip("0.") == "" and text.startswith("-"):
        text = text[1:] if "+" not in fmt else "+" + text[1:]
    return text


def fmt_stat(s: Stat, spec: MetricSpec, std: bool = True, n_row: int | None = None) -> str:
    """``mean ± ci95``; only the mean for one seed (no interval) or when ``std`` is False. ``(n)`` follows when
    the metric has fewer values than its row has seeds (``n_row``), so the row's own n is not repeated in every
    cell."""
    if s.mean is None:
        return "-"
    text = fixed(s.mean, spec.fmt)
    if not std:
        return text
    if s.ci95 is not None:
        text += " ± " + fixed(s.ci95, spec.fmt)
    return text if n_row is None or s.n == n_row else f"{text} ({s.n})"


def fmt_cell(row: Row, spec: MetricSpec) -> str:
    """A table cell: ``n/a`` for the spectra of a method with no low-rank update (prompt methods)."""
    if not row.low_rank and spec.key.startswith("spectra/"):
        return "n/a"
    return fmt_stat(row.metrics[spec.key], spec, std=spec.show_std, n_row=row.n)


def group_title(g: Group) -> str:
    backbone = f" · backbone {g.backbone}" if g.backbone else ""
    return f"suite {', '.join(g.suites)}{backbone} · suite hash {g.suite_hash} · experiment {g.experiment}"


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
    lines += [f"tuned: {row.method}: {t['best']}, chosen by {t['metric']} on the validation split (held-out training "
              f"data) by sweep {t['sweep']} (MLflow run {t['sweep_run']}) over {t['search_space']}"
              for row in g.rows if (t := row.tuned)]
    if any(row.gap_share is not None for row in g.rows):
        lines.append(f"gap_share: a row's share of the gap between the lower reference (the better of finetune and "
                     f"frozen) and the upper bound (joint) on {gap_key(g.sort_key)}: 0 at the lower reference, 1 at "
                     "the upper bound")
    return lines


# The terminal table's columns (the rest is in --format csv, json, markdown and html), under short names.
TABLE_COLUMNS = {keys.FINAL_ACC: "acc", keys.FINAL_FORGETTING: "forgetting", keys.FINAL_AVG_ACC: "avg_acc",
                 keys.FINAL_ACC_TIL: "acc_til", keys.SPECTRA_MEAN_TOP1: "top1_share",
                 keys.COST_TOTAL_SECONDS: "total_s", keys.COST_TRAINABLE_PARAMS: "params"}  # total: training + the
# method's own hooks (a closed-form solve), so a method without gradient steps does not read as free


def table_specs(g: Group) -> list[MetricSpec]:
    """The terminal table's metrics: ``TABLE_COLUMNS`` and the sort metric when it is another."""
    return [m for m in METRICS if m.key in TABLE_COLUMNS or m.key == g.sort_key]


def table_cells(g: Group, specs: Iterable[MetricSpec] = METRICS,
                names: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the leaderboard table: each metric column under its MLflow key (or ``names[key]``)."""
    specs = list(specs)
    header = ["#", "method", "n", *[(names or {}).get(m.key, m.key) for m in specs]]
    body = [[str(i + 1), row.method + (" (tuned)" if row.tuned else ""), str(row.n),
             *[fmt_cell(row, m) for m in specs]]
            for i, row in enumerate(g.rows)]
    if g.baseline is not None:  # the compact paired comparison of the sort metric, after the method's n
        key = baseline_key(g)
        header.insert(3, f"{(names or {}).get(key, key)} vs {g.baseline}")
        for row, cells in zip(g.rows, body):
            cells.insert(3, fmt_paired(row, g.baseline, SPEC[key]))
    if any(row.reference for row in g.rows):  # the bounds' columns, only where bounds ran
        header += ["reference", "gap_share"]
        for cells, row in zip(body, g.rows):
            cells += [row.reference or "", "-" if row.gap_share is None else f"{row.gap_share:.2f}"]
    return header, body


def column_legend(specs: list[MetricSpec]) -> list[str]:
    """The terminal table's short column names spelled out as MLflow keys, wrapped to 100 characters."""
    import textwrap

    finals = [TABLE_COLUMNS[m.key] for m in specs if m.key.startswith("final/") and m.key in TABLE_COLUMNS]
    others = [f"{TABLE_COLUMNS[m.key]}: {m.key}" for m in specs if not m.key.startswith("final/")
              and m.key in TABLE_COLUMNS]
    text = "; ".join([f"{', '.join(finals)}: final/<name>", *others])
    return textwrap.wrap(f"columns: {text}; every metric: --format csv, json, markdown or html", 100)


def render_table(groups: list[Group]) -> str:
    import textwrap

    out = []
    for g in groups:
        specs = table_specs(g)
        header, body = table_cells(g, specs, TABLE_COLUMNS)
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def line(cells: list[str], widths: list[int] = widths) -> str:
            return "  ".join(c.ljust(w) if i == 1 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        out += [group_title(g), f"sorted by {g.sort_key} · mean ± ci95 over the row's n seeds ((k): a value from "
                "fewer)", line(header), line(["-" * w for w in widths])]
        out += [line(r) for r in body]
        notes = baseline_notes(g) + reference_lines(g) + provenance_lines(g) + note_lines(g)
        out += [w for n in notes for w in textwrap.wrap(n, 100, subsequent_indent="  ")] + [""]
    if groups:
        out += column_legend(table_specs(groups[0])) + [""]
    ranks = rank_suites(groups)
    if ranks is not None:
        out += render_ranks_table(ranks)
    elif (why := no_ranking_reason(groups)) is not None:
        out += textwrap.wrap(why, 100, subsequent_indent="  ") + [""]
    return "\n".join(out)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(groups: list[Group]) -> str:
    out = []
    for g in groups:
        header, body = table_cells(g)
        out += [f"### {_md_escape(group_title(g))}", "",
                f"Sorted by `{g.sort_key}`; mean ± ci95: the Student t 95% interval of the mean over the row's n seeds "
                "((k) where a value has fewer).",
                ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---:" if i != 1 else ":---" for i in range(len(header))) + "|")
        out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in body]
        out += [""] + [f"- {_md_escape(x)}" for x in baseline_notes(g) + reference_lines(g) + provenance_lines(g)
                       + note_lines(g)] + [""]
    ranks = rank_suites(groups)
    if ranks is not None:
        out += render_ranks_markdown(ranks)
    elif (why := no_ranking_reason(groups)) is not None:
        out += [_md_escape(why), ""]
    return "\n".join(out)


PAIRED_FIELDS = ("diff", "ci95", "p", "n")  # clbench.analysis.stats.Paired.as_dict, a row's vs_baseline entry per metric
PUBLISHED_FIELDS = ("published", "published_diff", "published_within")
RANK_FIELDS = ("rank_metric", "suite_rank", "avg_rank", "friedman_stat", "friedman_p", "iman_davenport_f",
               "iman_davenport_p", "nemenyi_cd")


def csv_header() -> list[str]:
    """The CSV's columns: the JSON's values, flat. ``rank`` is the row's place in its group's sorted table;
    ``reference`` the bounds' mark; ``tuned`` where a tuned row's values came from (its sweep, as JSON). Then, as in the JSON: ``vs_baseline`` per metric (``--baseline``), a
    reproduction suite's published numbers per metric (``references``: published mean, measured - published,
    within the tolerance) and the ranks across suites (``ranking``; the Friedman/Nemenyi figures are the
    whole ranking's, repeated on every line)."""
    cols = ["experiment", "suite", "suite_hash", "rank", "method", "method_name", "params_id", "n", "seeds"]
    for m in METRICS:
        cols += [f"{m.key}_mean", f"{m.key}_std", f"{m.key}_n", f"{m.key}_ci95"]
    cols += ["clbench_version", "git_sha", "device", "not_averaged", "tuned", "reference", "gap_share",
             "baseline"]
    cols += [f"{m.key}_vs_baseline_{f}" for m in METRICS for f in PAIRED_FIELDS]
    cols += [f"{m.key}_{f}" for m in METRICS for f in PUBLISHED_FIELDS] + ["published_tolerance", "published_source"]
    return cols + list(RANK_FIELDS)


def _num(v: Any) -> str:
    """A CSV cell for a number: repr (round-trips), empty for None and, as the JSON's null, for inf/NaN."""
    if v is None or isinstance(v, bool):
        return "" if v is None else str(v).lower()
    if isinstance(v, int):
        return str(v)
    return repr(float(v)) if math.isfinite(v) else ""


def _published_cells(g: Group, row: Row) -> list[str]:
    refs = {r.metric: r for r in g.references if r.method == row.method}
    cells = []
    for m in METRICS:
        r = refs.get(m.key)
        cells += ["", "", ""] if r is None else [_num(r.reference), _num(r.diff), _num(r.within)]
    tolerances = sorted({_num(r.tolerance) for r in refs.values()})
    return cells + [";".join(tolerances), ";".join(sorted({r.source for r in refs.values()}))]


def _rank_cells(ranks: SuiteRanks | None, label: str, method: str) -> list[str]:
    if ranks is None:
        return [""] * len(RANK_FIELDS)
    rk = ranks.ranking
    ranked = method in rk.methods and label in rk.suites
    i = rk.methods.index(method) if ranked else -1
    return [ranks.metric, _num(float(rk.ranks[i][rk.suites.index(label)])) if ranked else "",
            _num(float(rk.avg_rank[i])) if ranked else "", _num(rk.friedman_stat), _num(rk.friedman_p),
            _num(rk.iman_davenport_f), _num(rk.iman_davenport_p), _num(rk.cd)]


def render_csv(groups: list[Group]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(csv_header())
    ranks = rank_suites(groups)
    for g in groups:
        label = suite_label(g, groups)
        for i, row in enumerate(g.rows):
            cells: list[Any] = [g.experiment, ";".join(g.suites), g.suite_hash, i + 1, row.method, row.method_name,
                                row.params_id, row.n, ";".join(map(str, row.seeds))]
            for m in METRICS:
                s = row.metrics[m.key]
                cells += ["" if s.mean is None else repr(s.mean), "" if s.std is None else repr(s.std), s.n,
                          "" if s.ci95 is None else repr(s.ci95)]
            bad = [f"seed {u['seed']} {u['status']} {u['run_id']}" for u in g.unfinished if u["method"] == row.method]
            cells += [";".join(row.provenance[k]) for k in PROVENANCE_TAGS] + [";".join(bad)]
            cells += [json.dumps(row.tuned, sort_keys=True) if row.tuned else ""]
            cells += [row.reference or "", "" if row.gap_share is None else repr(row.gap_share), g.baseline or ""]
            paired = row.vs_baseline or {}
            cells += [_num((paired.get(m.key) or {}).get(f)) for m in METRICS for f in PAIRED_FIELDS]
            cells += _published_cells(g, row) + _rank_cells(ranks, label, row.method)
            w.writerow(cells)
    return buf.getvalue()


def to_dict(groups: list[Group]) -> dict[str, Any]:
    out = {"metrics": list(METRIC_KEYS), "std": "sample standard deviation over seeds (ddof=1)",
           "ci95": "half-width of the Student t 95% interval of the mean: t(0.975, n-1) * std / sqrt(n); "
                   "null for n = 1",
           "groups": [asdict(g) for g in groups]}
    if any(g.baseline is not None for g in groups):
        out["vs_baseline"] = ("rows[i].vs_baseline[metric]: the row minus the baseline row over the seeds both "
                              "finished; diff = mean paired difference, ci95 = its t half-width, p = two-sided "
                              "paired t-test (scipy.stats.ttest_rel), n = pairs")
    ranks = rank_suites(groups)
    if ranks is not None:
        out["ranking"] = ranks.as_dict()
    return _strict(out)


def _strict(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: strict JSON has no Infinity/NaN tokens (an infinite
    Iman-Davenport F, when every suite ranks the methods identically, is written as null; its p is 0)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def render_json(groups: list[Group]) -> str:
    return json.dumps(to_dict(groups), indent=2, allow_nan=False)


TEXT_RENDERERS = {"table": render_table, "markdown": render_markdown, "csv": render_csv, "json": render_json}


def render(groups: list[Group], fmt: str) -> str:
    """The leaderboard in a text format (``clbench.analysis.report.render`` adds ``html``)."""
    if fmt not in TEXT_RENDERERS:
        raise ClbenchError(f"--format {fmt}: choose from {', '.join(FORMATS)}")
    return TEXT_RENDERERS[fmt](groups)
