"""``clbench sweep``: choose one method's hyperparameters on the validation split, never on a test image.

A sweep is planned completely before anything runs (``plan_sweep``): the swept method entry, its search space
(``--grid KEY=[v1,v2,...]``, a cartesian product; or ``--random N`` seeded draws, where a dimension may also be a
range ``uniform(a,b)``, ``loguniform(a,b)`` or ``int(a,b)``), every point validated against the method's params
schema (or the training settings), and the ranking metric checked against what a validation run logs. Every bad
input is one ``ClbenchError`` line before any MLflow run exists.

Execution (``run_sweep``) is an ordinary suite run through ``clbench.run.runner.run_suite``: the sweep's suite holds
one method entry per point (label ``LABEL[KEY=VALUE,...]``) on the validation split (``Suite.for_validation``,
clbench.data.validation), so trials go through the suite's executor (local, or Ray with ``--executor ray``), each
trial is a child of one sweep parent run, and the checkpoint/RunStore machinery resumes a killed sweep: a trial's
identity is its run key (suite hash, which includes the validation split, plus the method params and training
settings), and rerunning the same command skips finished trials and continues unfinished ones. The sweep id (a
digest of the sweep suite's protocol, the method and the points) names the sweep's checkpoint folder and is the
``clbench.sweep`` tag of the parent and of every trial.

``then_test`` reruns the best point on the test protocol with the suite's seeds as the method entry
``LABEL-tuned``, tagged ``clbench.tuned=true`` with the sweep's id, parent run id, search space and metric; the
leaderboard marks such rows and says where their values came from.

Random search draws with numpy from ``--seed`` rather than Optuna: the draws are independent of the results
(plain random search), so the whole set of points is known up front, goes to the executor at once and has a
stable identity for resuming; Optuna's adaptive samplers (TPE) would need the ask/tell loop one trial at a time.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from clbench import keys
from clbench.analysis.leaderboard import METRICS
from clbench.errors import ClbenchError
from clbench.methods.registry import discover, plugin_dirs
from clbench.run import checkpoint
from clbench.run.plan import RunRecord, plan_runs
from clbench.run.preflight import method_problems
from clbench.suite import Suite, TrainConfig, ValidationConfig

RANGE = re.compile(r"^\s*(uniform|loguniform|int)\s*\((.*)\)\s*$")
GRID_EXAMPLE = "--grid 'methods.lora.params.rank=[2,4,8]'"
DEFAULT_METRIC = keys.for_split(keys.FINAL_ACC, keys.SPLIT_VALIDATION)
# the metrics a validation run logs once, at its end: the test run's final/* renamed under val/
VAL_METRICS = {keys.for_split(m.key, keys.SPLIT_VALIDATION): m for m in METRICS if m.key.startswith("final/")}


@dataclass
class Dimension:
    """One ``--grid`` flag: a field of the swept entry's ``params`` or ``train``, with values or a range."""

    flag: str  # as typed, for error messages and the search space
    key: str  # the key path as typed (``methods.lora.params.rank``)
    section: str  # "params" or "train"
    name: str  # the field
    values: list[Any] | None = None  # grid values, validated and canonical
    dist: tuple[str, float, float] | None = None  # (uniform|loguniform|int, low, high): --random only


@dataclass
class Trial:
    label: str
    point: dict[str, Any]  # Dimension.key -> value
    entry: dict[str, Any]  # the method entry this trial runs

    def text(self, sep: str = " ") -> str:
        return sep.join(f"{k}={value_text(v)}" for k, v in self.point.items())


@dataclass
class SweepPlan:
    suite: Suite  # the sweep's suite: one entry per trial, on the validation split
    base: Suite  # the suite as given (with --set): then_test runs on its test protocol
    source: str
    label: str  # the swept entry's label
    entry_index: int
    dims: list[Dimension]
    trials: list[Trial]
    metric: str
    higher_is_better: bool
    seed: int
    space: str
    sweep_id: str
    plugins_dirs: list[str] = field(default_factory=list)


@dataclass
class SweepResult:
    plan: SweepPlan
    records: list[RunRecord]
    parent_run: str | None
    best: Trial | None = None
    best_value: float | None = None


def value_text(v: Any) -> str:
    """A value as ``--set`` reads it back to the same value (YAML; floats always with a dot and signed
    exponent, which PyYAML needs to read them as floats)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        text = repr(v)
        if "e" in text:
            mantissa, exp = text.split("e")
            mantissa = mantissa if "." in mantissa else mantissa + ".0"
            text = f"{mantissa}e{'' if exp[0] in '+-' else '+'}{exp}"
        return text
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _entry_index(suite: Suite, label: str, source: str) -> int:
    labels = [m.display for m in suite.methods]
    if label in labels:
        return labels.index(label)
    named = [i for i, m in enumerate(suite.methods) if m.name == label]
    if len(named) == 1:
        return named[0]
    if named:
        raise ClbenchError(f"--method {label}: {len(named)} entries of {source} use method '{label}' (labels "
                           f"{[labels[i] for i in named]}); sweep one of them by its label")
    close = difflib.get_close_matches(label, labels, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ClbenchError(f"--method {label}: not a method label of {source}{hint}; suite methods: {', '.join(labels)}")


def _field_path(flag: str, key: str, suite: Suite, index: int) -> tuple[str, str]:
    """(section, field) of a grid key addressing the swept entry: ``methods.<label|name|index>.params.X``,
    ``methods.<...>.train.X`` or ``train.X`` (the swept entry's training settings)."""
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "train":
        return "train", parts[1]
    if len(parts) == 4 and parts[0] == "methods" and parts[2] in ("params", "train"):
        entry = suite.methods[index]
        if parts[1] not in (entry.display, entry.name, str(index)):
            raise ClbenchError(f"--grid {flag}: '{parts[1]}' is not the swept method entry '{entry.display}'; a "
                               f"sweep varies one entry: methods.{entry.display}.{parts[2]}.{parts[3]}")
        if parts[1] == entry.name and parts[1] != entry.display and \
                sum(m.name == entry.name for m in suite.methods) > 1:
            raise ClbenchError(f"--grid {flag}: several entries use method '{entry.name}'; address the swept one "
                               f"by its label: methods.{entry.display}.{parts[2]}.{parts[3]}")
        return parts[2], parts[3]
    raise ClbenchError(f"--grid {flag}: unknown key '{key}'; a sweep varies the swept method's params or training "
                       f"settings: methods.LABEL.params.NAME, methods.LABEL.train.NAME or train.NAME, e.g. "
                       f"{GRID_EXAMPLE}")


def _range(flag: str, kind: str, args: str) -> tuple[str, float, float]:
    try:
        low, high = (float(a) for a in args.split(","))
    except ValueError:
        raise ClbenchError(f"--grid {flag}: {kind}(LOW,HIGH) takes two numbers, e.g. loguniform(1.0e-4,1.0e-2)") \
            from None
    if not low < high or (kind == "loguniform" and low <= 0) or not all(map(math.isfinite, (low, high))):
        need = "0 < LOW < HIGH" if kind == "loguniform" else "LOW < HIGH"
        raise ClbenchError(f"--grid {flag}: {kind}({low:g},{high:g}) needs {need}")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise ClbenchError(f"--grid {flag}: int(LOW,HIGH) takes integer bounds")
    return kind, low, high


class _Checker:
    """Validates a value of one dimension against the swept entry's params schema or training settings and
    returns it canonical (as the schema coerces it), or raises one line naming the --grid flag."""

    def __init__(self, suite: Suite, index: int, params_cls: Any) -> None:
        self.suite, self.entry, self.params_cls = suite, suite.methods[index], params_cls

    def fields(self, section: str) -> list[str]:
        model = self.params_cls if section == "params" else TrainConfig
        return list(model.model_fields)

    def validate(self, updates: dict[tuple[str, str], Any], what: str) -> dict[str, Any]:
        """The entry's params and train overrides with ``updates`` applied, both validated."""
        params = {**self.entry.params, **{n: v for (s, n), v in updates.items() if s == "params"}}
        train = {**self.entry.train, **{n: v for (s, n), v in updates.items() if s == "train"}}
        try:
            checked_params = self.params_cls(**params).model_dump(mode="json")
            checked_train = TrainConfig(**{**self.suite.train.model_dump(), **train}).model_dump(mode="json")
        except ValidationError as err:
            e = err.errors()[0]
            loc = ".".join(str(p) for p in e["loc"]) or "(params)"
            raise ClbenchError(f"--grid {what}: {loc}: {e['msg'].removeprefix('Value error, ')}") from None
        return {"params": checked_params, "train": checked_train,
                "overrides": {"params": params, "train": train}}

    def canonical(self, dim: Dimension, value: Any) -> Any:
        checked = self.validate({(dim.section, dim.name): value}, dim.flag)
        return checked[dim.section][dim.name]


def parse_dimension(flag: str, suite: Suite, index: int, checker: _Checker) -> Dimension:
    if "=" not in flag:
        raise ClbenchError(f"--grid {flag}: expected KEY=[v1,v2,...], e.g. {GRID_EXAMPLE}")
    key, raw = (p.strip() for p in flag.split("=", 1))
    section, name = _field_path(flag, key, suite, index)
    known = checker.fields(section)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        owner = f"method '{suite.methods[index].name}' params" if section == "params" else "train settings"
        raise ClbenchError(f"--grid {flag}: unknown key '{name}'{hint}; {owner}: {', '.join(known)}")
    dim = Dimension(flag, key, section, name)
    match = RANGE.match(raw)
    if match:
        dim.dist = _range(flag, match.group(1), match.group(2))
        for bound in dim.dist[1:]:  # both ends must be values the schema accepts
            checker.canonical(dim, int(bound) if dim.dist[0] == "int" else bound)
        return dim
    try:
        values = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        values = None
    if not isinstance(values, list):
        raise ClbenchError(f"--grid {flag}: expected a list of values [v1,v2,...] (or with --random a range "
                           f"uniform(a,b), loguniform(a,b), int(a,b)), e.g. {GRID_EXAMPLE}")
    if not values:
        raise ClbenchError(f"--grid {flag}: empty grid; give at least one value, e.g. {GRID_EXAMPLE}")
    canonical: list[Any] = []
    for v in values:
        c = checker.canonical(dim, v)
        if c not in canonical:
            canonical.append(c)
    dim.values = canonical
    return dim


def _draw(dim: Dimension, rng: np.random.RandomState) -> Any:
    if dim.values is not None:
        return dim.values[rng.randint(len(dim.values))]
    kind, low, high = dim.dist
    if kind == "int":
        return int(rng.randint(int(low), int(high) + 1))
    x = math.exp(rng.uniform(math.log(low), math.log(high))) if kind == "loguniform" else rng.uniform(low, high)
    return float(f"{x:.4g}")  # 4 significant digits: the value shown is the value run, and --set repeats it


MAX_POINTS = 10_000  # one run each: more is a typo (--random 1000000000), not a sweep


def points(dims: list[Dimension], random_n: int | None, seed: int) -> list[dict[str, Any]]:
    """The grid's cartesian product, or ``random_n`` seeded draws (duplicates dropped, order kept; drawing stops
    once every point of a finite space is drawn). At most ``MAX_POINTS`` points, refused before any is made."""
    size = math.prod(len(d.values) for d in dims) if all(d.dist is None for d in dims) else None
    if random_n is None:
        ranged = [d.flag for d in dims if d.dist is not None]
        if ranged:
            raise ClbenchError(f"--grid {ranged[0]}: a range is sampled, not enumerated; add --random N, or give "
                               "a list of values")
        if size > MAX_POINTS:
            raise ClbenchError(f"--grid: the grid has {size} points, more than {MAX_POINTS} (one run each); give "
                               "fewer values, or sample some with --random N")
        return [dict(zip([d.key for d in dims], combo)) for combo in itertools.product(*(d.values for d in dims))]
    if random_n > MAX_POINTS:
        raise ClbenchError(f"--random {random_n}: at most {MAX_POINTS} points (one run each)")
    rng = np.random.RandomState(seed)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(random_n):
        if size is not None and len(out) == size:  # the whole finite space is drawn: no draw adds a point
            break
        p = {d.key: _draw(d, rng) for d in dims}
        key = json.dumps(p, sort_keys=True, default=repr)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def check_metric(metric: str) -> tuple[str, bool]:
    """The ranking metric and whether higher is better; one of the val/* metrics a validation run logs."""
    spec = VAL_METRICS.get(metric)
    if spec is None:
        raise ClbenchError(f"--metric {metric}: the trials do not log it; a validation run logs "
                           f"{', '.join(VAL_METRICS)}")
    return metric, spec.higher_is_better


@dataclass(kw_only=True)
class SweepOptions:
    """How a sweep samples and where its methods come from: ``random_n`` sampled points (None: the full grid)
    drawn with ``seed`` (default: the suite's first seed), the validation ``metric`` to pick the best point by,
    the allowed ``plugins_dirs`` (and the suite's own with ``trust_suite_plugins``)."""

    random_n: int | None = None
    metric: str = DEFAULT_METRIC
    seed: int | None = None
    plugins_dirs: list[str] = field(default_factory=list)
    trust_suite_plugins: bool = False


def plan_sweep(suite: Suite, source: str, label: str, grid: list[str],
               opts: SweepOptions | None = None) -> SweepPlan:
    """Everything a sweep will run, checked (see the module docstring), sampled and sourced as ``opts``
    (:class:`SweepOptions`; default: the full grid, the built-in and installed methods). Raises one ClbenchError
    line."""
    opts = opts or SweepOptions()
    random_n, seed = opts.random_n, opts.seed
    metric, higher = check_metric(opts.metric)
    if random_n is not None and random_n < 1:
        raise ClbenchError(f"--random {random_n}: the number of sampled points must be at least 1")
    if not grid:
        what = "the ranges to sample" if random_n is not None else "the values to try"
        raise ClbenchError(f"sweep: no --grid given; give {what}, e.g. {GRID_EXAMPLE}"
                           + (" or --grid 'methods.lora.train.lr=loguniform(1.0e-4,1.0e-2)'" if random_n else ""))
    index = _entry_index(suite, label, source)
    dirs = plugin_dirs(suite.plugins_dir, opts.plugins_dirs, opts.trust_suite_plugins, source)
    registry = discover(dirs)
    [planned] = [p for p in plan_runs(suite, source, registry, [suite.methods[index].display])
                 if p.entry_index == index]
    checker = _Checker(suite, index, planned.info.cls.Params)
    dims = [parse_dimension(flag, suite, index, checker) for flag in grid]
    dup = sorted({d.key for d in dims if [e.key for e in dims].count(d.key) > 1})
    if dup:
        raise ClbenchError(f"--grid {dup[0]}: given twice; list all its values in one --grid flag")
    seed = suite.seeds[0] if seed is None else seed
    entry = suite.methods[index]
    trials = [_trial(entry.display, entry.name, p, dims, checker) for p in points(dims, random_n, seed)]
    entries = [t.entry for t in trials]
    space = " ".join(f"--grid {d.flag}" for d in dims) + (f" --random {random_n} --seed {seed}" if random_n else "")
    # not the points: a widened grid (or more --random points) continues the same sweep, its finished points
    # found in their checkpoint folders and its parent run reopened, never left RUNNING by a killed sweep
    sweep_id = checkpoint.digest({"protocol": _sweep_suite(suite, entries).protocol_hash(), "method": entry.display,
                                  "seed": seed})[:12]
    # its own name: the sweep's own checkpoint folder and parent run (clbench.run.checkpoint.suite_dir)
    sweep_suite = _sweep_suite(suite, entries, f"{suite.name}.sweep-{sweep_id}")
    for trial_entry in sweep_suite.methods:  # a grid value that does not fit the backbone names its --grid flag
        trial_entry._flags = {(d.section, d.name): f"--grid {d.flag}" for d in dims}
    method_problems(sweep_suite, plan_runs(sweep_suite, source, registry, None), source)  # before --dry-run's plan
    return SweepPlan(sweep_suite, suite, source, entry.display, index, dims, trials, metric, higher, seed, space,
                     sweep_id, list(dirs))


def label_text(value: Any) -> str:
    """A point's value as it reads in a trial's label: ``value_text`` within the label's safe set (a list's JSON
    quotes dropped, any other character outside it as ``_``; clbench.suite.check_label)."""
    return re.sub(r"[^A-Za-z0-9_.+=,:\[\]()-]", "_", value_text(value).replace('"', ""))


def _trial(label: str, name: str, point: dict[str, Any], dims: list[Dimension], checker: _Checker) -> Trial:
    flags = " ".join(f"--grid {d.flag}" for d in dims)
    checked = checker.validate({(d.section, d.name): point[d.key] for d in dims}, flags)
    short = ",".join(f"{d.name if d.section == 'params' else 'train.' + d.name}={label_text(point[d.key])}"
                     for d in dims)
    trial_label = f"{label}[{short}]"
    entry = {"name": name, "label": trial_label, **checked["overrides"]}
    return Trial(trial_label, point, entry)


def _sweep_suite(suite: Suite, entries: list[dict[str, Any]], name: str | None = None) -> Suite:
    data = suite.model_dump(mode="json")
    data.update(name=name or suite.name, methods=entries, reference=[], validation=(suite.validation or ValidationConfig()).model_dump(),
                tracking={**data["tracking"], "experiment": suite.experiment})
    return Suite.model_validate(data).for_validation()


def run_sweep(plan: SweepPlan, *, executor=None, checkpoint_dir: str | None = None,
              progress: Callable[[str], None] = print, restart: bool = False,
              tracking_uri: str | None = None) -> SweepResult:
    """Run (or resume) every trial as a child of the sweep's parent run and pick the best finished one (on a
    tie, the first in the plan's order). ``restart``: forget the sweep's trials and run them afresh.
    ``tracking_uri``: ``--tracking-uri`` (clbench.tracking.results_store's precedence)."""
    from clbench.run.runner import RunOptions, open_results_store, run_suite

    suite = plan.suite
    experiment = suite.tracking.experiment
    tracker = open_results_store(suite, experiment, tracking_uri)
    tags = {keys.SUITE: plan.base.name, keys.SWEEP: plan.sweep_id, keys.SEARCH_SPACE: plan.space,
            keys.SWEEP_METRIC: plan.metric}
    label_tags = {t.label: {keys.TRIAL: t.text()} for t in plan.trials}
    opts = RunOptions(seeds=[plan.seed], plugins_dirs=plan.plugins_dirs, tracker=tracker, progress=progress,
                      checkpoint_dir=checkpoint_dir, executor=executor, tags=tags, label_tags=label_tags,
                      restart=restart)
    records = run_suite(suite, plan.source, opts)
    busy = sum(r.status == "BUSY" for r in records)
    if busy:  # the same sweep started twice: only the one that trains every point picks the best
        raise ClbenchError(f"sweep {plan.sweep_id}: {busy} of its {len(records)} points are being trained by another "
                           "clbench process now (the same sweep, started twice?); the best point is chosen once every "
                           "point has finished: run the same command again after that process ends")
    sdir = checkpoint.suite_dir(checkpoint_dir, suite.protocol_hash(), suite.name, experiment, tracker.uri)
    parent = (checkpoint.read_json(sdir / "parent.json") or {}).get("run_id")
    result = SweepResult(plan, records, parent)
    scored = [(t, r.metrics.get(plan.metric)) for t, r in zip(plan.trials, records) if r.status == "FINISHED"]
    scored = [(t, v) for t, v in scored if v is not None and math.isfinite(v)]
    if scored:
        result.best, result.best_value = (max if plan.higher_is_better else min)(scored, key=lambda tv: tv[1])
        if parent:
            tracker.set_tags(parent, {keys.SWEEP_BEST: result.best.text()})
            tracker.log_metrics(parent, {plan.metric: result.best_value})
            tracker.flush(parent)
    return result


def table_lines(result: SweepResult) -> list[str]:
    """The points, one line each: the point's values, status, the ranking metric and the val/ summary."""
    plan = result.plan
    cols = [d.key for d in plan.dims]
    shown = [plan.metric] + [m for m in (DEFAULT_METRIC, keys.for_split(keys.FINAL_FORGETTING, "validation"))
                             if m != plan.metric]
    header = [*cols, "status", *shown, "run"]
    rows = []
    for t, r in zip(plan.trials, result.records):
        vals = [f"{r.metrics[m]:.2f}" if m in r.metrics else "-" for m in shown]
        mark = " *" if t is result.best else ""
        rows.append([*(value_text(t.point[c]) for c in cols), r.status, *vals, (r.run_id or "-")[:12] + mark])
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    direction = "higher" if plan.higher_is_better else "lower"
    return [f"sweep {plan.sweep_id} of {plan.label} on the validation split ({len(plan.trials)} points, seed "
            f"{plan.seed}; {plan.metric}: {direction} is better; * = best)", fmt(header),
            fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def plan_lines(plan: SweepPlan) -> list[str]:
    """``--dry-run``: the sweep's id, split, metric and every point it would run."""
    v = plan.suite.validation
    held = f"fraction {v.fraction:g}, seed {plan.seed if v.seed is None else v.seed}"
    lines = [f"sweep {plan.sweep_id} of {plan.label}: {len(plan.trials)} points on the validation split ({held}), "
             f"seed {plan.seed}, ranked by {plan.metric}; suite hash {plan.suite.protocol_hash()}"]
    return lines + [f"would run {t.label}: {t.text()}" for t in plan.trials]


def best_line(result: SweepResult) -> str:
    return f"best: {result.best.text(', ')} {result.plan.metric}={result.best_value:.2f}"


def tuned_label(plan: SweepPlan) -> str:
    return f"{plan.label}-tuned"


def then_test(result: SweepResult, *, executor=None, checkpoint_dir: str | None = None,
              progress: Callable[[str], None] = print, tracking_uri: str | None = None) -> list[RunRecord]:
    """The best point on the test protocol with the suite's seeds: the entry ``LABEL-tuned`` appended to the
    suite, tagged as tuned with where its values came from (clbench.analysis.leaderboard marks it)."""
    from clbench.run.runner import RunOptions, run_suite

    plan, base = result.plan, result.plan.base
    label = tuned_label(plan)
    data = base.model_dump(mode="json")
    if label in [m.display for m in base.methods]:
        raise ClbenchError(f"--then-test: the suite already has a method labelled '{label}'; rename it")
    data["methods"].append({**result.best.entry, "label": label})
    suite = Suite.model_validate(data)
    tags = {keys.TUNED: "true", keys.SWEEP: plan.sweep_id, keys.SWEEP_RUN: result.parent_run or "",
            keys.SEARCH_SPACE: plan.space, keys.SWEEP_METRIC: plan.metric, keys.SWEEP_BEST: result.best.text()}
    opts = RunOptions(methods=[label], plugins_dirs=plan.plugins_dirs, progress=progress,
                      checkpoint_dir=checkpoint_dir, executor=executor, label_tags={label: tags},
                      tracking_uri=tracking_uri)
    return run_suite(suite, plan.source, opts)
