"""End to end on a language model: `clbench run suites/lm-quickstart.yaml` (the group of the tiny T5 and the tiny
causal LM suites) into a temporary MLflow store logs the accuracy matrices, forgetting and spectra of every method on
both, and `clbench leaderboard` ranks them, one table per backbone (marked slow: the
default run covers the language track in tests/test_lm.py and tests/test_contract_lm.py, without MLflow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("transformers", reason="the language-model extra is not installed: pip install 'clbench[lm]'")

from clbench.cli import app  # noqa: E402

SUITES = Path(__file__).resolve().parents[1] / "suites"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def _children(uri: str, experiment: str) -> dict:
    from clbench.testing import mlflow_runs

    return {r.data.tags["clbench.method"]: r for r in mlflow_runs(uri, experiment, "child")}


def _check_store(uri: str, experiment: str, methods: list[str], tasks: int) -> None:
    runs = _children(uri, experiment)
    assert sorted(runs) == sorted(methods)
    for run in runs.values():
        m = run.data.metrics
        assert run.info.status == "FINISHED"
        assert all(f"eval/acc/task_{j:02d}" in m for j in range(tasks))  # the accuracy matrix's last row
        for key in ("final/acc", "final/forgetting", "final/bwt", "spectra/mean_top1_share", "spectra/top1_share"):
            assert key in m, key
        assert 0.0 < m["spectra/mean_top1_share"] <= 1.0


@pytest.mark.slow  # ~30 s on a loaded 2-core machine (MLflow store, two CLI calls); tests/test_lm.py covers the rest
def test_quickstart_runs_two_methods_and_ranks_them(mlflow_uri, tmp_path):
    import yaml

    data = yaml.safe_load((SUITES / "lm-quickstart-t5.yaml").read_text())  # the suite, shortened
    data["stream"]["num_tasks"] = 2
    data["train"].update(epochs=1, max_steps_per_epoch=2)
    data["methods"] = [m for m in data["methods"] if m["name"] in ("lora", "olora")]
    suite = tmp_path / "lm-short.yaml"
    suite.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(suite)])
    assert result.exit_code == 0, result.output
    _check_store(mlflow_uri, "lm-quickstart", ["lora", "olora"], 2)
    board = CliRunner().invoke(app, ["leaderboard", str(suite)])
    assert board.exit_code == 0, board.output
    ranked = [ln.split()[1] for ln in board.output.splitlines() if ln[:2] in ("1 ", "2 ")]
    assert sorted(ranked) == ["lora", "olora"], board.output


@pytest.mark.slow  # about a minute of CPU per suite, two suites
def test_whole_quickstart_learns_and_ranks(mlflow_uri):
    """The issue's one command: the group trains lora, inflora, olora and eblora on the tiny T5 and on the tiny
    causal LM, and the leaderboard of the group ranks them in one table per backbone."""
    from mlflow.tracking import MlflowClient

    group = str(SUITES / "lm-quickstart.yaml")
    result = CliRunner().invoke(app, ["run", group])
    assert result.exit_code == 0, result.output
    methods = ["lora", "inflora", "olora", "eblora"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    for name in ("lm-quickstart", "lm-quickstart-causal"):
        _check_store(mlflow_uri, name, methods, 4)
        # every method learns the tasks well above chance (1/3) right after training each: the matrix's diagonal,
        # logged as eval/acc/task_t at step t
        for label, run in _children(mlflow_uri, name).items():
            diagonal = [next(m.value for m in client.get_metric_history(run.info.run_id, f"eval/acc/task_{t:02d}")
                             if m.step == t) for t in range(4)]
            assert sum(diagonal) / 4 > 60.0, (name, label, diagonal)
    board = CliRunner().invoke(app, ["leaderboard", group])
    assert board.exit_code == 0, board.output
    titles = [ln for ln in board.output.splitlines() if ln.startswith("suite ")]
    assert len(titles) == 2 and {t.split(" · ")[1] for t in titles} == {"backbone t5_tiny_clbench",
                                                                         "backbone llama_tiny_clbench"}, board.output
    ranked = [ln.split()[1] for ln in board.output.splitlines() if ln[:2] in ("1 ", "2 ", "3 ", "4 ")]
    assert sorted(ranked) == sorted(methods * 2), board.output
