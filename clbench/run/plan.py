"""Planning a suite: which (method, seed) runs there are, with validated params, and the plain data that
describes one of them to whatever process trains it. Nothing here trains, logs or touches MLflow.

``plan_runs`` resolves the suite's method entries against the registry; ``run_key`` says when a checkpoint may
continue a run; ``RunJob`` is one (method, seed) as picklable data (what an executor ships to a worker);
``RunRecord`` is what comes back.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError

from clbench.errors import ClbenchError
from clbench.run import checkpoint
from clbench.suite import Suite, format_validation_error, without_new_defaults


@dataclass
class RunRecord:
    """The outcome of one (method, seed): its MLflow run, status, final metrics and accuracy matrix."""

    method: str
    seed: int
    run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    R: np.ndarray | None = None


@dataclass
class PlannedRun:
    """One method entry of the suite, resolved: its label, registry entry and validated params."""

    label: str
    info: Any  # registry.MethodInfo
    params: Any  # validated Params instance
    entry_index: int


@dataclass(kw_only=True)
class RunJob:
    """One (method, seed) as plain picklable data, built by keyword: everything another process (a Ray worker on
    another machine) needs to train it and log it into the driver's parent MLflow run, rebuilding registry,
    stream, model and tracker itself. Paths in it are absolute. A torchrun follower's job keeps only the suite,
    the label and the seed (nothing logged, nothing checkpointed)."""

    suite: Suite
    source: str
    label: str
    seed: int
    plugins_dirs: list[str] = field(default_factory=list)
    tracking_uri: str = ""
    experiment: str = ""
    parent: str = ""
    base_tags: dict[str, str] = field(default_factory=dict)
    suite_yaml: str = ""
    store_dir: str = ""
    store_key: str = ""
    store_identity: dict[str, str] = field(default_factory=dict)


def plan_runs(suite: Suite, source: str, registry, methods: list[str] | None) -> list[PlannedRun]:
    """Resolve every method entry against the registry and validate its params (one clear line on error)."""
    planned = []
    labels = {e.display for e in suite.methods}
    for i, entry in enumerate(suite.methods):
        # `--method X` picks the entry labelled X; a method name that is no label picks all its entries
        if methods and entry.display not in methods and not (entry.name in methods and entry.name not in labels):
            continue
        where, prefix = entry.source_and_prefix(source, i)  # the suite file or the --add-method flag
        try:
            info = registry.get(entry.name)
        except ClbenchError as exc:
            flag = entry.set_flag(("name",))
            raise ClbenchError(f"{f'--set {flag}' if flag else where}: {prefix}name: {exc}") from None
        try:
            params = info.cls.Params(**entry.params)
        except ValidationError as err:  # a key the command line wrote names its --set flag, not the suite file
            flag = entry.set_flag(("params", *err.errors()[0]["loc"]))
            raise ClbenchError(format_validation_error(f"--set {flag}" if flag else where, err,
                                                       prefix=f"{prefix}params.")) from None
        planned.append(PlannedRun(entry.display, info, params, i))
    check_distinct_labels(planned, source)
    if methods:
        known = {p.label for p in planned} | {suite.methods[p.entry_index].name for p in planned}
        missing = [m for m in methods if m not in known]
        if missing:
            raise ClbenchError(f"--method {missing[0]}: not in the suite {source}; suite methods: "
                               f"{', '.join(m.display for m in suite.methods)}")
    return planned


def safe_label(label: str) -> str:
    """A method label as the readable part of a folder name (``checkpoint.run_folder`` adds a digest)."""
    return checkpoint.readable(label)


def check_distinct_labels(planned: list[PlannedRun], source: str) -> None:
    """Refuse labels that differ only in Unicode form or case (``é`` composed or not, ``LoRA``/``lora``): they
    read as one method in every table and figure, so their runs could not be told apart."""
    seen: dict[str, str] = {}
    for run in planned:
        norm = unicodedata.normalize("NFKC", run.label).casefold()
        if norm in seen and seen[norm] != run.label:
            raise ClbenchError(f"{source}: methods: labels {seen[norm]!r} and {run.label!r} cannot be told apart "
                               "(they differ only in Unicode form or case); give one of them another label")
        seen[norm] = run.label


def run_identity(run: PlannedRun) -> dict[str, str]:
    """The code a run is trained with: the method's source digest (clbench.registry.code_identity, the one also
    in its provenance) and clbench's version. A checkpoint or finished run of other code is refused, not
    continued (clbench.checkpoint.RunStore.check_identity); unlike ``run_key`` it does not move the run's folder,
    so an edit is noticed instead of silently starting a second run."""
    import clbench

    return {"method_code": run.info.code_digest(), "clbench": clbench.__version__}


def run_key(suite: Suite, run: PlannedRun, seed: int) -> str:
    """What must be equal for a checkpoint to continue a run: method, params, training settings, seed, data."""
    cfg = suite.train_for(suite.methods[run.entry_index])
    return checkpoint.digest({"method": run.info.name, "params": run.params.model_dump(mode="json"),
                              "train": without_new_defaults(cfg.model_dump()), "seed": seed, "protocol": suite.protocol_hash()})
