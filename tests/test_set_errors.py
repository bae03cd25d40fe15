"""``--set`` errors found after the suite loads (method params and names, checked against the registry by
``plan_runs``) name the ``--set`` flag that wrote the key, not the suite file; the suite's own mistakes still
name the file."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.methods.registry import discover
from clbench.run.plan import plan_runs
from clbench.suite import load_suite
from clbench.testing import tiny_suite_yaml


@pytest.fixture
def suite_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_suite_yaml("sets"))
    return path


def _plan(path, sets):
    suite = load_suite(path, sets)
    return plan_runs(suite, str(path), discover(strict=False), None)


@pytest.mark.parametrize(("sets", "message"), [
    (["methods.0.params.rank=bad"],
     "--set methods.0.params.rank=bad: methods.0.params.rank: Input should be a valid integer"),
    (["methods.inclora.params.rnak=3"], "--set methods.inclora.params.rnak=3: methods.1.params.rnak: unknown key"),
    (["methods.1.name=nosuch"], "--set methods.1.name=nosuch: methods.1.name: unknown method 'nosuch'"),
    (["methods=[{name: lora, params: {rank: 0}}]"],
     "--set methods=[{name: lora, params: {rank: 0}}]: methods.0.params.rank: Input should be greater than"),
    # the last --set that wrote the key is the one named
    (["methods.0.params.rank=3", "methods.0.params={rank: x}"],
     "--set methods.0.params={rank: x}: methods.0.params.rank: Input should be a valid integer"),
])
def test_param_errors_from_set_name_the_flag(suite_file, sets, message):
    with pytest.raises(ClbenchError) as exc:
        _plan(suite_file, sets)
    assert str(exc.value).startswith(message), str(exc.value)


def test_a_set_on_another_entry_leaves_file_errors_naming_the_file(suite_file):
    suite_file.write_text(suite_file.read_text().replace("rank: 2, fresh", "rank: x, fresh"))
    with pytest.raises(ClbenchError) as exc:
        _plan(suite_file, ["methods.0.params.rank=3", "methods.1.params.alpha=2"])  # entry 1, another key
    assert str(exc.value).startswith(f"{suite_file}: methods.1.params.rank: Input should be a valid integer")


def test_cli_names_the_flag(suite_file):
    res = CliRunner().invoke(app, ["run", str(suite_file), "--dry-run", "--set", "methods.0.params.rank=bad"])
    assert res.exit_code == 1
    assert res.stderr.startswith("error: --set methods.0.params.rank=bad: methods.0.params.rank:"), res.stderr
    assert "Traceback" not in res.output
