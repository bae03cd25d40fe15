"""``clbench run --add-method YAML``: a method entry appended to the suite's own, validated like them, with errors
that name the flag (not the suite file) when the entry came from it."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.methods.registry import discover
from clbench.run.plan import plan_runs
from clbench.suite import load_suite
from clbench.testing import tiny_suite_yaml

R8 = "{name: lora, label: lora-r8, params: {rank: 8}}"


@pytest.fixture
def suite_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_suite_yaml("addm"))
    return path


def test_added_entries_follow_the_suites_own(suite_file):
    suite = load_suite(suite_file, added=[R8, "{name: olora, params: {lambda1: 0.1}}"])
    assert [m.display for m in suite.methods] == ["lora", "inclora", "lora-r8", "olora"]
    planned = plan_runs(suite, str(suite_file), discover(strict=False), None)
    assert [(p.label, p.params.rank) for p in planned][2] == ("lora-r8", 8)
    assert planned[3].params.lambda1 == 0.1
    # what is recorded (the suite YAML artifact, MLflow params) holds the added entry like any other
    assert suite.model_dump()["methods"][2] == {"name": "lora", "label": "lora-r8", "params": {"rank": 8},
                                                 "train": {}}
    assert suite.protocol_hash() == load_suite(suite_file).protocol_hash()  # methods are not in the hash


@pytest.mark.parametrize(("raw", "message"), [
    ("lora", "--add-method lora: expected a method entry in flow YAML"),
    ("{name: lora}", "--add-method {name: lora}: the suite already has a method labelled 'lora'"),
    ("{name: lorra, label: x}", "--add-method {name: lorra, label: x}: name: unknown method 'lorra'"),
    ("{name: lora, label: x, params: {rnak: 3}}", "--add-method {name: lora, label: x, params: {rnak: 3}}: "
                                                  "params.rnak: unknown key"),
    ("{name: olora, lable: x}", "--add-method {name: olora, lable: x}: lable: unknown key"),
    ("{name: lora, label: x, train: {epochs: 0}}", "--add-method {name: lora, label: x, train: {epochs: 0}}: "
                                                   "train.epochs: Input should be greater than or equal to 1"),
])
def test_bad_added_entries_name_the_flag(suite_file, raw, message):
    with pytest.raises(ClbenchError) as exc:
        suite = load_suite(suite_file, added=[raw])
        plan_runs(suite, str(suite_file), discover(strict=False), None)
    assert str(exc.value).startswith(message), str(exc.value)


def test_suite_file_errors_still_name_the_file(suite_file):
    suite_file.write_text(suite_file.read_text().replace("rank: 2, fresh", "rnak: 2, fresh"))
    suite = load_suite(suite_file, added=[R8])
    with pytest.raises(ClbenchError, match=r"tiny\.yaml: methods\.1\.params\.rnak: unknown key"):
        plan_runs(suite, str(suite_file), discover(strict=False), None)


def test_dry_run_lists_the_suites_methods_and_the_added_one(suite_file):
    res = CliRunner().invoke(app, ["run", str(suite_file), "--dry-run", "--add-method", R8])
    assert res.exit_code == 0, res.output
    runs = [ln.split()[1] for ln in res.output.splitlines() if ln.startswith("  run ")]
    assert runs == ["lora", "inclora", "lora-r8"]


def test_real_run_trains_the_added_method_beside_the_others(suite_file, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    res = CliRunner().invoke(app, ["run", str(suite_file), "--add-method", R8, "--set", "stream.num_tasks=2",
                                   "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.exit_code == 0, res.output
    finished = [ln.split()[0] for ln in res.output.splitlines() if " FINISHED " in ln]
    assert finished == ["lora", "inclora", "lora-r8"], res.output


@pytest.mark.parametrize(("sets", "message"), [
    (["train.epochs=0"], "--set train.epochs=0: train.epochs: Input should be greater than or equal to 1"),
    (["train.epoch=3"], "--set train.epoch=3: train.epoch: unknown key"),
    (["seeds=[0]", "methods.inclora.train.lr=-1"],
     "--set methods.inclora.train.lr=-1: methods.1.train.lr: Input should be greater than 0"),
])
def test_set_errors_name_the_flag_not_the_file(suite_file, sets, message):
    with pytest.raises(ClbenchError) as exc:
        load_suite(suite_file, sets)
    assert str(exc.value).startswith(message), str(exc.value)


def test_file_errors_beside_a_set_still_name_the_file(suite_file):
    suite_file.write_text(suite_file.read_text().replace("epochs: 1", "epochs: 0"))
    with pytest.raises(ClbenchError, match=r"^\S*tiny\.yaml: train\.epochs"):
        load_suite(suite_file, ["train.lr=0.1"])
