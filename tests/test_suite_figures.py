"""The parent run's suite figures (issue 17 items 4 and 5): computed once, from one definition, over every finished
child run of the protocol in the experiment (earlier invocations included), logged with p and n, and the same
number the HTML report's imbalance plot shows; per-run spectral means under their own keys."""

from __future__ import annotations

import math

import pytest
from scipy.stats import spearmanr

from clbench import keys
from clbench.analysis.leaderboard import aggregate
from clbench.analysis.report import render_html
from clbench.run.runner import RunOptions, run_suite
from clbench.store.tracking import MlflowTracker, read_runs
from clbench.suite import load_suite
from clbench.testing import tiny_suite_yaml


def _parents(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return [r for r in runs if r.data.tags.get(keys.ROLE) == keys.ROLE_PARENT]


def test_suite_figures_cover_earlier_runs_and_match_the_report(tmp_path, mlflow_uri):
    path = tmp_path / "figures.yaml"
    path.write_text(tiny_suite_yaml("figures").replace("seeds: [0]", "seeds: [0, 1]"))
    suite = load_suite(path)
    quiet = dict(progress=lambda m: None, checkpoint_dir=str(tmp_path / "ck"))
    # first invocation: one method; second: the suite with a second method (the first's runs are skipped)
    run_suite(suite, str(path), RunOptions(methods=["lora"], tracker=MlflowTracker("figures", mlflow_uri),
                                           **quiet))
    [parent] = _parents(mlflow_uri, "figures")
    assert parent.data.metrics[keys.SUITE_RUNS_FINISHED] == 2
    records = run_suite(suite, str(path), RunOptions(tracker=MlflowTracker("figures", mlflow_uri), **quiet))
    assert len(records) == 4
    [parent] = _parents(mlflow_uri, "figures")  # the suite's parent run, continued; its figures recomputed
    assert parent.data.metrics[keys.SUITE_RUNS_FINISHED] == 4  # this invocation trained two of them

    runs = read_runs("figures", mlflow_uri)
    for run in runs:  # the per-run means over tasks, under their own keys
        hist = MlflowTracker("figures", mlflow_uri).client.get_metric_history(run.run_id, keys.SPECTRA_TOP1)
        assert run.metrics[keys.SPECTRA_MEAN_TOP1] == pytest.approx(sum(m.value for m in hist) / len(hist))
        assert keys.SPECTRA_MEAN_OVERLAP in run.metrics
    x = [r.metrics[keys.SPECTRA_MEAN_TOP1] for r in runs]
    y = [r.metrics[keys.FINAL_FORGETTING] for r in runs]
    want = spearmanr(x, y)
    m = parent.data.metrics
    assert m[keys.SUITE_SPEARMAN_N] == 4
    if math.isnan(want.statistic):  # a constant side (possible on 4 tiny runs): nothing is claimed
        assert keys.SUITE_SPEARMAN not in m
        return
    assert m[keys.SUITE_SPEARMAN] == pytest.approx(want.statistic, abs=1e-12)
    assert m[keys.SUITE_SPEARMAN_P] == pytest.approx(want.pvalue, abs=1e-12)
    [group] = aggregate(runs)
    assert group.imbalance_forgetting.rho == m[keys.SUITE_SPEARMAN]
    assert f"Spearman rho = {m[keys.SUITE_SPEARMAN]:.3f}" in group.imbalance_forgetting.title()
    assert "alt='imbalance'" in render_html([group])  # the report plots that group's correlation
