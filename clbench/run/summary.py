"""The suite's summary on its parent run: run counts, the imbalance-forgetting Spearman correlation, a claim
suite's paired effects and the HTML leaderboard, over every finished child run of the protocol (suite hash) in the
suite's experiment, this invocation's and earlier ones alike. One run's own record is ``clbench.run.recorder``'s.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from clbench import keys
from clbench.analysis import plots
from clbench.analysis.claim import claim_effects, claim_metrics
from clbench.analysis.leaderboard import aggregate
from clbench.analysis.report import log_report
from clbench.errors import ClbenchError
from clbench.run.plan import RunRecord
from clbench.store.diskfull import on_disk_full
from clbench.store.tracking import Tracker, read_runs
from clbench.suite import Suite


def record_suite(tracker: Tracker, parent: str, suite: Suite, records: list[RunRecord],
                 progress: Callable[[str], None]) -> None:
    """The parent run's figures over every finished child run of this protocol (suite hash) in the suite's
    experiment, this invocation's and earlier ones alike: run counts, the imbalance-forgetting Spearman
    correlation (``clbench.analysis.leaderboard.imbalance_forgetting``: one definition, the report plots the same
    number) and the HTML leaderboard. A store that cannot be read back (a null tracker) gets this
    invocation's counts only; a failing report never fails the runs already logged."""
    experiment = suite.experiment
    try:
        runs = read_runs(experiment, tracker.uri) if tracker.readable else []
    except ClbenchError:
        runs = []
    runs = [r for r in runs if r.tags.get(keys.SUITE_HASH) == suite.protocol_hash()]
    if not runs:
        tracker.log_metrics(parent, {
            keys.SUITE_RUNS_FINISHED: float(len([r for r in records if r.status == "FINISHED"])),
            keys.SUITE_RUNS_FAILED: float(len([r for r in records if r.status != "FINISHED"]))})
        tracker.flush(parent)
        return
    [group] = aggregate(runs)
    ev = group.imbalance_forgetting
    failed = [u for u in group.unfinished if u["status"] in ("FAILED", "KILLED")]
    figures = {keys.SUITE_RUNS_FINISHED: float(sum(row.n for row in group.rows)),
               keys.SUITE_RUNS_FAILED: float(len(failed)), keys.SUITE_SPEARMAN_N: float(ev.n)}
    if ev.rho is not None:  # at least 3 runs, neither side constant
        figures.update({keys.SUITE_SPEARMAN: ev.rho, keys.SUITE_SPEARMAN_P: ev.p})
    n_excluded, why = spectra_exclusions(group)
    figures[keys.SUITE_SPECTRA_EXCLUDED] = float(n_excluded)
    if n_excluded:  # say why the Spearman covers fewer runs than finished
        tracker.set_tags(parent, {keys.SPECTRA_EXCLUDED: why})
    figures.update(claim_metrics(claim_effects(group)))  # a claim suite's paired effects vs keep (else nothing)
    tracker.log_metrics(parent, figures)
    tracker.flush(parent)
    if ev.rho is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "imbalance_vs_forgetting.png"
            plots.scatter(ev.x, ev.y, ev.labels, path, (f"{keys.SPECTRA_MEAN_TOP1} (spectral imbalance)",
                                                         keys.FINAL_FORGETTING, ev.title()))
            store = tracker.uri
            with on_disk_full(f"the figures of suite run {parent} to the artifact store of {store}",
                              "every run is finished; the rerun only records the suite's figures"):
                tracker.log_artifacts(parent, tmp)
    leaderboard_report(tracker, parent, suite, progress)


def spectra_exclusions(group) -> tuple[int, str]:
    """How many finished runs of ``group`` the spectra statistics leave out (no ``spectra/mean_top1_share``),
    and why, per method: methods without a low-rank update (``low_rank_updates = False``: prompts) report none;
    any other run without spectra is named as such."""
    none, missing = [], []
    for row in group.rows:
        n = sum(1 for r in row.runs if r["values"].get(keys.SPECTRA_MEAN_TOP1) is None)
        if n:
            (none if not row.low_rank else missing).append(f"{row.method} ({n})")
    parts = ([f"no low-rank update: {', '.join(none)}"] if none else []) + (
        [f"no spectra logged: {', '.join(missing)}"] if missing else [])
    total = sum(int(x.rsplit("(", 1)[1].rstrip(")")) for x in none + missing)
    return total, f"{total} finished runs left out of the spectra statistics; " + "; ".join(parts) if total else ""


def leaderboard_report(tracker: Tracker, parent: str, suite: Suite, progress: Callable[[str], None]) -> None:
    """This protocol's leaderboard in the suite's experiment as ``leaderboard.html`` on the parent run; guarded,
    because a failing report must never fail or lose the runs already logged."""
    if not tracker.readable:  # a null or test tracker stores nothing to read back
        return
    try:
        log_report(tracker, parent, suite.experiment, suite.protocol_hash(),
                   title=f"clbench leaderboard: {suite.name}")
    except Exception as exc:  # noqa: BLE001
        progress(f"leaderboard report not written ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
