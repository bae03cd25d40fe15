"""Suite group files ({group: NAME, suites: [files]}): `clbench run` runs every member suite in order with the same
options (after the others, exit 1 if one failed), `--dry-run` plans them all, `clbench leaderboard` ranks one table
per member suite (one protocol each: never one table across backbones), and a bad group file is one line, exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clbench.cli import app
from clbench.suite import load_suite, suite_files
from clbench.testing import mlflow_runs, tiny_suite

REPO = Path(__file__).resolve().parents[1]


def _two_suites(folder: Path) -> tuple[Path, Path]:
    """Two one-method tiny ViT suites of different protocols (the second at another learning rate)."""
    a = tiny_suite(folder / "suites", "grp-a", one_method=True)
    b = tiny_suite(folder / "suites", "grp-b", one_method=True)
    b.write_text(b.read_text().replace("lr: 5.0e-3", "lr: 1.0e-2"))
    assert load_suite(a).protocol_hash() != load_suite(b).protocol_hash()
    return a, b


def _group(folder: Path, text: str) -> Path:
    path = folder / "suites" / "group.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("error:")]


def test_group_runs_every_member_and_the_leaderboard_ranks_each_protocol(tmp_path, mlflow_uri):
    a, b = _two_suites(tmp_path)
    group = _group(tmp_path, "group: two\nsuites: [grp-a.yaml, grp-b.yaml]\n")
    assert suite_files(group) == [a, b]
    result = CliRunner().invoke(app, ["run", str(group)])
    assert result.exit_code == 0, result.output
    assert result.output.index("suite 1/2") < result.output.index("suite 2/2"), result.output  # in order
    for name in ("grp-a", "grp-b"):
        children = mlflow_runs(mlflow_uri, name, role="child")
        assert [r.info.status for r in children] == ["FINISHED"], name
    board = CliRunner().invoke(app, ["leaderboard", str(group)])
    assert board.exit_code == 0, board.output
    titles = [ln for ln in board.output.splitlines() if ln.startswith("suite ")]
    # one table per member, each titled by its suite and protocol: the two suites' runs are not ranked together
    assert len(titles) == 2, board.output
    for title, path in zip(sorted(titles), (a, b)):
        suite = load_suite(path)
        assert title.startswith(f"suite {suite.name} · backbone {suite.backbone.name} · suite hash "
                                f"{suite.protocol_hash()}"), board.output
    # the same tables as naming the member suites one by one
    members = CliRunner().invoke(app, ["leaderboard", str(a), str(b)])
    assert members.exit_code == 0 and board.output.split("\n", 1)[1] == members.output.split("\n", 1)[1]


def test_a_failing_member_fails_the_group_after_the_others_ran(tmp_path, mlflow_uri):
    a, b = _two_suites(tmp_path)
    a.write_text(a.read_text().replace("name: lora", "name: no_such_method"))  # valid YAML, refused when it runs
    group = _group(tmp_path, "group: two\nsuites: [grp-a.yaml, grp-b.yaml]\n")
    result = CliRunner().invoke(app, ["run", str(group)])
    assert result.exit_code == 1, result.output
    errors = _error_lines(result.output)
    assert "no_such_method" in errors[0] and "1 of 2 suites failed" in errors[-1] and "grp-a.yaml" in errors[-1]
    assert [r.info.status for r in mlflow_runs(mlflow_uri, "grp-b", role="child")] == ["FINISHED"]


def test_dry_run_plans_every_member_and_writes_nothing(tmp_path, mlflow_uri):
    _two_suites(tmp_path)
    group = _group(tmp_path, "group: two\nsuites: [grp-a.yaml, grp-b.yaml]\n")
    result = CliRunner().invoke(app, ["run", str(group), "--dry-run", "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    assert "suite grp-a: suite hash" in result.output and "suite grp-b: suite hash" in result.output, result.output
    planned = [ln.split()[1] for ln in result.output.splitlines() if ln.startswith("  run ")]
    assert planned == ["lora", "lora"], result.output
    assert not Path(mlflow_uri.removeprefix("sqlite:///")).exists()


BAD_GROUPS = [
    ("group: g\nsuites: []\n", "suites"),
    ("group: g\nsuites: grp-a.yaml\n", "suites"),
    ("group: g\nsuites: [grp-a.yaml]\nseeds: [0]\n", "seeds"),
    ("group: 'a b'\nsuites: [grp-a.yaml]\n", "group"),
    ("group: g\nsuites: [missing.yaml]\n", "suites.0: missing.yaml: no such suite file"),
    ("group: g\nsuites: [grp-a.yaml, ./grp-a.yaml]\n", "suites.1: ./grp-a.yaml: listed twice"),
    ("group: g\nsuites: [inner.yaml]\n", "suites.0: inner.yaml: a suite group itself"),
    ("group: g\nsuites: [broken.yaml, grp-a.yaml]\n", "broken.yaml"),
]


@pytest.mark.parametrize(("text", "says"), BAD_GROUPS)
def test_a_bad_group_file_is_one_line_before_anything_runs(text, says, tmp_path, mlflow_uri):
    _two_suites(tmp_path)
    (tmp_path / "suites" / "inner.yaml").write_text("group: inner\nsuites: [grp-a.yaml]\n")
    (tmp_path / "suites" / "broken.yaml").write_text("name: broken\nstream: {name: synthetic}\nbogus: 1\n")
    group = _group(tmp_path, text)
    for command in (["run", str(group)], ["leaderboard", str(group)]):
        result = CliRunner().invoke(app, command)
        errors = _error_lines(result.output)
        assert result.exit_code == 1 and len(errors) == 1, result.output
        assert says in errors[0], result.output
        assert "broken.yaml" in errors[0] if says == "broken.yaml" else "group.yaml" in errors[0], result.output
    assert not mlflow_runs(mlflow_uri, "grp-a")  # the valid member did not run either


def test_a_group_given_where_one_suite_is_needed_says_so(tmp_path):
    _two_suites(tmp_path)
    group = _group(tmp_path, "group: two\nsuites: [grp-a.yaml, grp-b.yaml]\n")
    result = CliRunner().invoke(app, ["protocol", str(group)])
    assert result.exit_code == 1 and "a suite group" in result.output and "one of the suites" in result.output


def test_the_language_model_quickstart_is_a_group_of_one_suite_per_backbone():
    members = suite_files(REPO / "suites" / "lm-quickstart.yaml")
    assert [p.name for p in members] == ["lm-quickstart-t5.yaml", "lm-quickstart-causal.yaml"]
    suites = [load_suite(p) for p in members]
    assert [s.backbone.name for s in suites] == ["t5_tiny_clbench", "llama_tiny_clbench"]
    assert [s.experiment for s in suites] == ["lm-quickstart", "lm-quickstart-causal"]
