"""Issue 23, the run-side remainder: params that do not fit the backbone are refused before any run exists,
trainable parameters the method did not declare fail that run (the suite goes on), any method label draws in
every figure, and a full disk names what it could not write and resumes on the rerun.

The bad-input corpus (tests/bad_suites, run by tests/test_bad_input.py) holds the suite-file cases of blocks and
ranks; here are the properties behind them (the limits are exact: one above fails, the limit itself trains) and
the cases that need a plugin, a figure or a simulated full disk (``OSError(ENOSPC)`` raised by the patched write
function; no disk is filled).
"""

from __future__ import annotations

import errno
import inspect
from pathlib import Path

import numpy as np
import pytest
from clbench_plugins.lora import NaiveLoRA
from typer.testing import CliRunner

from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.methods.hookcheck import MethodHookError
from clbench.methods.hookspecs import hookimpl
from clbench.methods.registry import discover
from clbench.run.plan import plan_runs
from clbench.suite import Suite
from clbench.testing import mlflow_runs, run_method, tiny_stream, tiny_suite, write_plugin

MICRO = {"name": "vit_micro_clbench", "image_size": 16, "pretrained": False}  # depth 2, width 32


def _check(entry: dict, backbone: dict = MICRO) -> None:
    """``method_problems`` on a one-entry suite, as the runner calls it after planning."""
    from clbench.run.preflight import method_problems

    suite = Suite.model_validate({"name": "s", "stream": {"name": "synthetic", "num_tasks": 2, "num_classes": 4},
                                  "backbone": backbone, "methods": [entry]})
    method_problems(suite, plan_runs(suite, "s.yaml", discover([]), None), "s.yaml")


# -- 1. blocks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry, key, what", [
    ({"name": "lora", "params": {"blocks": [2]}}, "methods.0.params.blocks", "block 2 does not exist"),
    ({"name": "inflora", "params": {"blocks": [0, 5]}}, "methods.0.params.blocks", "block 5 does not exist"),
    ({"name": "l2p", "params": {"blocks": [-1]}}, "methods.0.params.blocks", "block -1 does not exist"),
    ({"name": "dualprompt", "params": {"e_blocks": [1, 1]}}, "methods.0.params.e_blocks", "[1] listed twice"),
    ({"name": "cllora", "params": {"shared_blocks": [0], "specific_blocks": [3]}},
     "methods.0.params.specific_blocks", "block 3 does not exist"),
])
def test_block_indices_the_backbone_lacks_are_refused_naming_the_key(entry, key, what):
    with pytest.raises(ClbenchError) as info:
        _check(entry)
    msg = str(info.value)
    assert msg.startswith(f"s.yaml: {key}: ") and what in msg and "\n" not in msg, msg
    if "exist" in what:
        assert "numbered 0..1" in msg or "count from 0" in msg, msg  # the valid range


@pytest.mark.parametrize("blocks, what", [([], "adapts no block"), ([-1], "count from 0"),
                                          ([1, 0, 1], "[1] listed twice")])
def test_block_lists_that_name_no_block_fail_the_params_schema(blocks, what):
    for name in ("lora", "sdlora", "inflora"):
        cls = discover([]).get(name).cls
        with pytest.raises(ValueError, match=what.replace("[", r"\[").replace("]", r"\]")):
            cls.Params(blocks=blocks)
    assert discover([]).get("lora").cls.Params(blocks=[1, 0]).blocks == [1, 0]


def test_blocks_are_checked_against_the_depth_of_any_timm_vit():
    """ViT-B/16 (12 blocks, width 768) from timm, built on the meta device: no weights, no download."""
    vitb = {"name": "vit_base_patch16_224", "pretrained": False}
    _check({"name": "lora", "params": {"blocks": [11], "rank": 768}}, vitb)
    with pytest.raises(ClbenchError, match=r"block 12 does not exist; the backbone has 12 blocks, numbered 0..11"):
        _check({"name": "lora", "params": {"blocks": [12]}}, vitb)
    with pytest.raises(ClbenchError, match=r"params.rank: 769 exceeds .* at most 768"):
        _check({"name": "lora", "params": {"rank": 769}}, vitb)


# -- 3. rank above the adapted maps' width ------------------------------------------------------------------

RANKED = ("lora", "olora", "sdlora", "eblora", "cllora", "inflora")


@pytest.mark.parametrize("name", RANKED)
def test_rank_above_the_width_is_refused_and_the_width_itself_passes(name):
    with pytest.raises(ClbenchError) as info:
        _check({"name": name, "params": {"rank": 33}})
    assert "methods.0.params.rank: 33 exceeds" in str(info.value) and "choose rank <= 32" in str(info.value)
    _check({"name": name, "params": {"rank": 32}})


def test_the_limit_is_min_of_both_sides_of_each_adapted_map():
    _check({"name": "lora", "params": {"rank": 32, "targets": ["fc1"]}})  # fc1 is 64 x 32: at most 32
    with pytest.raises(ClbenchError, match=r"blocks.0.mlp.fc1 is 64 x 32, so .* at most 32"):
        _check({"name": "lora", "params": {"rank": 40, "targets": ["fc1"]}})
    _check({"name": "er", "params": {"trainable": "full", "rank": 99}})  # no adapter: the rank is unused


@pytest.mark.parametrize("name", ["inflora", "cllora"])
def test_the_methods_that_crashed_above_the_width_train_at_it(name):
    """Main crashed with a shape error at rank 33 in these two (their down-projection is d_in wide): the limit
    the check enforces is the one the method needs, not a stricter one."""
    cls = discover([]).get(name).cls
    run = run_method(cls(cls.Params(rank=32)), stream=tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8),
                     max_steps_per_epoch=1)
    assert run.state.next_task == 2 and np.isfinite(run.R[1, :2]).all()


def test_reduced_ranks_may_not_exceed_the_rank():
    cls = discover([]).get("sdlora").cls
    with pytest.raises(ValueError, match="must not exceed rank 4"):
        cls.Params(rank=4, rank_reduction=True, rr_tasks=[1], rr_ranks=[8])
    cls.Params(rank=4, rr_tasks=[1], rr_ranks=[8])  # no reduction: the schedule is unused


# -- params check themselves: what a params model declares, and the default for one that declares nothing -----

OUTSIDE_PLUGIN = '''
    """Two methods from elsewhere: one with a plain pydantic params model (no check of its own), one whose params
    declare their checks (check_against) and check a field the default would not look at."""
    from pydantic import BaseModel

    from clbench import BackboneFacts, Method, NoParams


    class PlainParams(BaseModel):
        blocks: list[int] | None = None
        head_blocks: list[int] | None = None
        rank: int = 4


    class Plain(Method):
        name = "plain"
        Params = PlainParams


    class DeclaredParams(NoParams):
        layers: list[int] = [0]
        width: int = 4

        def check_against(self, backbone: BackboneFacts) -> list[str]:
            problems = [backbone.blocks_problem("layers", self.layers),
                        backbone.rank_problem(self.width, ["fc1"], name="width")]
            return [p for p in problems if p]


    class Declared(Method):
        name = "declared"
        Params = DeclaredParams


    def register_methods(register):
        register(Plain)
        register(Declared)
'''


def _check_outside(tmp_path, entry: dict) -> None:
    from clbench.run.preflight import method_problems

    write_plugin(tmp_path / "outside", "outside_methods", OUTSIDE_PLUGIN)
    suite = Suite.model_validate({"name": "s", "stream": {"name": "synthetic", "num_tasks": 2, "num_classes": 4},
                                  "backbone": MICRO, "methods": [entry]})
    method_problems(suite, plan_runs(suite, "s.yaml", discover([tmp_path / "outside"]), None), "s.yaml")


def test_a_plain_params_model_from_elsewhere_gets_the_checks_by_field_name(tmp_path):
    _check_outside(tmp_path, {"name": "plain", "params": {"blocks": [1], "head_blocks": [0], "rank": 32}})
    with pytest.raises(ClbenchError, match=r"methods.0.params.head_blocks: block 2 does not exist"):
        _check_outside(tmp_path, {"name": "plain", "params": {"head_blocks": [2]}})
    with pytest.raises(ClbenchError, match=r"methods.0.params.blocks: block\(s\) \[1\] listed twice"):
        _check_outside(tmp_path, {"name": "plain", "params": {"blocks": [1, 1]}})
    with pytest.raises(ClbenchError, match=r"methods.0.params.rank: 33 exceeds"):
        _check_outside(tmp_path, {"name": "plain", "params": {"rank": 33}})


def test_params_that_declare_their_checks_are_asked_those(tmp_path):
    """The preflight asks the params, not their field names: ``layers`` and ``width`` are checked because the
    model says so (fc1 of the micro ViT is 64 x 32, so a width above 32 cannot fit)."""
    _check_outside(tmp_path, {"name": "declared", "params": {"layers": [0, 1], "width": 32}})
    with pytest.raises(ClbenchError, match=r"methods.0.params.layers: block 5 does not exist; the backbone has 2"):
        _check_outside(tmp_path, {"name": "declared", "params": {"layers": [5]}})
    with pytest.raises(ClbenchError, match=r"methods.0.params.width: 40 exceeds .*fc1 is 64 x 32.*choose width <= 32"):
        _check_outside(tmp_path, {"name": "declared", "params": {"width": 40}})


# -- 2. trainable parameters outside the method's groups ----------------------------------------------------


# Both unfreeze in before_task: what configure_model leaves trainable of the backbone, the loop freezes (contract 3,
# tests/test_contract_default.py); a backbone parameter unfrozen later meets the trainable rule.


class Unfrozen(NaiveLoRA):
    """Naive LoRA that unfreezes a backbone norm before each task (its groups hold the LoRA only)."""

    name = "unfrozen"
    aliases = ()

    @hookimpl
    def before_task(self, model, ctx):
        super().before_task(model, ctx)
        model.backbone.blocks[1].norm1.requires_grad_(True)


class FineTunedUnderLoRA(NaiveLoRA):
    """Unfreezes the backbone and lets the loop train every trainable parameter (param_groups None)."""

    name = "finetuned"
    aliases = ()

    @hookimpl
    def before_task(self, model, ctx):
        super().before_task(model, ctx)
        model.backbone.patch_embed.requires_grad_(True)

    @hookimpl
    def param_groups(self, model, ctx):
        return None


def _tiny():
    return tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8)


def test_a_trainable_parameter_in_no_group_fails_naming_it():
    with pytest.raises(MethodHookError) as info:
        run_method(Unfrozen(Unfrozen.Params(rank=2)), stream=_tiny(), max_steps_per_epoch=1)
    msg = str(info.value)
    assert msg.startswith("method 'unfrozen': hook param_groups left 'backbone.blocks.1.norm1.weight', "
                          "'backbone.blocks.1.norm1.bias' requiring grad"), msg
    assert "in no parameter group of the method and in no head" in msg


def test_pre_trained_weights_in_the_groups_of_an_adapter_method_fail():
    with pytest.raises(MethodHookError, match=r"hook param_groups trains pre-trained backbone parameters: "
                                              r"'backbone.patch_embed.proj.weight'"):
        run_method(FineTunedUnderLoRA(FineTunedUnderLoRA.Params(rank=2)), stream=_tiny(), max_steps_per_epoch=1)
    declared = FineTunedUnderLoRA(FineTunedUnderLoRA.Params(rank=2))
    declared.trains_backbone = True  # a method that says it fine-tunes the backbone may
    assert run_method(declared, stream=_tiny(), max_steps_per_epoch=1).state.next_task == 2


# The same class as a plugin file, for a run through the command line.
UNFROZEN_PLUGIN = ("from clbench.methods.hookspecs import hookimpl\nfrom clbench_plugins.lora import NaiveLoRA\n\n\n"
                   + inspect.getsource(Unfrozen) + "\n\ndef register_methods(register):\n    register(Unfrozen)\n")

SUITE = """\
name: {name}
seeds: [0]
stream: {{name: synthetic, num_tasks: {tasks}, num_classes: {classes}, samples_per_class: 8}}
backbone: {{name: vit_micro_clbench, image_size: 16, pretrained: false}}
train: {{epochs: 1, batch_size: 16, max_steps_per_epoch: 1}}
runtime: {{device: cpu, log_every: 1000}}
methods:
{methods}
tracking: {{experiment: {name}}}
"""


def _suite(tmp_path: Path, name: str, methods: list[str], tasks: int = 2) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SUITE.format(name=name, tasks=tasks, classes=2 * tasks,
                                 methods="\n".join(f"  - {m}" for m in methods)))
    return path


def _statuses(uri: str, experiment: str) -> list[str]:
    return [r.info.status for r in mlflow_runs(uri, experiment)]


def test_the_run_with_an_undeclared_trainable_fails_and_the_suite_goes_on(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_plugin(tmp_path / "plugs", "unfrozen", UNFROZEN_PLUGIN)
    suite = _suite(tmp_path, "trainable", ["{name: unfrozen, params: {rank: 2}}", "{name: lora, params: {rank: 2}}"])
    res = CliRunner().invoke(app, ["run", str(suite), "--plugins-dir", "plugs", "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    [failed] = [ln for ln in res.stderr.splitlines() if "FAILED:" in ln]
    assert "unfrozen.py" in failed and "'backbone.blocks.1.norm1.weight'" in failed, failed
    runs = {r.data.tags["clbench.method"]: r for r in mlflow_runs(mlflow_uri, "trainable", "child")}
    assert runs["unfrozen"].info.status == "FAILED"
    assert "hook param_groups" in runs["unfrozen"].data.tags["clbench.error"]
    assert runs["lora"].info.status == "FINISHED" and "final/acc" in runs["lora"].data.metrics
    assert "RUNNING" not in _statuses(mlflow_uri, "trainable")


# -- 4. labels are text, never TeX ------------------------------------------------------------------------

LABELS = ["$\\x$", "$", "a$b$c^", "lora_{r}$\\frac$", "\\$x$"]


def test_every_figure_draws_labels_with_dollars_and_backslashes(tmp_path):
    from clbench.analysis import plots, stats
    from clbench.analysis.claim import plot_forgetting_by_intervention

    R = np.array([[50.0, np.nan], [20.0, 60.0]])
    for i, label in enumerate(LABELS):
        plots.accuracy_heatmap(R, tmp_path / f"h{i}.png", f"{label} seed 0: CIL accuracy R[i, j]")
        plots.spectrum_heatmap(np.ones((2, 1, 3)), [label], tmp_path / f"s{i}.png", label)
        plots.scatter([0.1, 0.2], [1.0, 2.0], [label, label], tmp_path / f"x{i}.png", (label, label, label))
    ranking = stats.rank_methods(np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 2.0], [2.0, 2.0, 4.0]]), LABELS[:3],
                                 ["a", "b", "c"])
    stats.cd_diagram(ranking, tmp_path / "cd.png", title=LABELS[0])
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in tmp_path.glob("*.png"))
    assert len(list(tmp_path.glob("*.png"))) == 3 * len(LABELS) + 1
    from clbench.analysis.leaderboard import Group, Row

    rows = [Row(method=label, method_name="lora", params_id="x", n=2, seeds=[0, 1], metrics={}, provenance={},
                runs=[{"run_id": f"r{i}{s}", "seed": s, "values": {"final/forgetting": 10.0 + s + i,
                                                                   "final/acc": 50.0 - s}} for s in (0, 1)])
            for i, label in enumerate(["keep", *LABELS])]
    assert plot_forgetting_by_intervention(Group("claim", ["claim"], "h", rows, []))


def test_a_label_that_would_break_a_figure_is_refused_before_training(tmp_path, mlflow_uri, monkeypatch):
    """Main trained, then failed at the accuracy heatmap with a traceback (ParseFatalException: Unknown
    symbol: \\x), leaving both runs FAILED. Labels now hold a safe character set (issue 32 case 4): '$' is refused
    with one line before any run exists; every label of that set draws (the figure test above)."""
    monkeypatch.chdir(tmp_path)
    suite = _suite(tmp_path, "math", ["{name: lora, label: '$\\x$', params: {rank: 2}}"])
    res = CliRunner().invoke(app, ["run", str(suite), "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.exit_code == 1 and "methods.0.label" in res.stderr and "'$'" in res.stderr, res.output
    assert "Traceback" not in res.output and not mlflow_runs(mlflow_uri, "math")


# -- 5. a full disk ---------------------------------------------------------------------------------------


def _enospc(path: str | None = None) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", path)


def _full_after(n: int, error: BaseException):
    """A replacement for a write function: the first ``n`` calls go through, then the disk is full."""
    calls = []

    def patch(original):
        def write(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise error
            return original(*args, **kwargs)

        return write

    return patch


def _one_error(res) -> str:
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output, res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), repr(res.exception)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and res.stderr.rstrip().splitlines()[-1] == errors[0], res.stderr
    return errors[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, float]:
    """The final metrics of the 3-task suite the full-disk tests use, run without interruption (once)."""
    work = tmp_path_factory.mktemp("uninterrupted")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as m:
        m.chdir(work)
        m.setenv("MLFLOW_TRACKING_URI", uri)
        m.setenv("CLBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "clbench-cache"))
        m.setenv("HF_HUB_OFFLINE", "1")
        suite = tiny_suite(work, "clean", one_method=True)
        res = CliRunner().invoke(app, ["run", str(suite), "--checkpoint-dir", str(work / "ck")])
        assert res.exit_code == 0, res.output
        [ref] = mlflow_runs(uri, "clean", "child")
    return ref.data.metrics


def _resume_and_compare(tmp_path: Path, suite: Path, uri: str, name: str, expect_in_output: str,
                        reference: dict[str, float]) -> None:
    """The rerun (disk free again) finishes the same MLflow run, with the metrics of an uninterrupted run."""
    res = CliRunner().invoke(app, ["run", str(suite), "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.exit_code == 0, res.output
    assert expect_in_output in res.stderr, res.stderr
    [child] = mlflow_runs(uri, name, "child")
    assert child.info.status == "FINISHED"
    assert "RUNNING" not in _statuses(uri, name)
    for key in ("final/acc", "final/forgetting"):
        assert child.data.metrics[key] == pytest.approx(reference[key]), key


def test_a_full_checkpoint_disk_names_the_checkpoint_and_the_rerun_resumes(tmp_path, mlflow_uri, monkeypatch,
                                                                          uninterrupted):
    from clbench.run import checkpoint

    monkeypatch.chdir(tmp_path)
    suite = tiny_suite(tmp_path, "fullck", one_method=True)
    with monkeypatch.context() as m:
        m.setattr(checkpoint.RunStore, "save", _full_after(1, _enospc())(checkpoint.RunStore.save))
        err = _one_error(CliRunner().invoke(app, ["run", str(suite), "--checkpoint-dir", str(tmp_path / "ck")]))
    assert err.startswith("error: disk full: cannot write the checkpoint ") and "checkpoint.pt after task 2" in err
    assert "No space left on device" in err and "run the same command again: the run resumes after task 1" in err
    _resume_and_compare(tmp_path, suite, mlflow_uri, "fullck", "after task 1/3", uninterrupted)


def test_a_full_artifact_store_names_it_and_the_rerun_only_writes_them(tmp_path, mlflow_uri, monkeypatch,
                                                                       uninterrupted):
    from clbench.store.tracking import MlflowTracker

    monkeypatch.chdir(tmp_path)
    suite = tiny_suite(tmp_path, "fullart", one_method=True)
    with monkeypatch.context() as m:
        m.setattr(MlflowTracker, "log_artifacts", _full_after(0, _enospc())(MlflowTracker.log_artifacts))
        err = _one_error(CliRunner().invoke(app, ["run", str(suite), "--checkpoint-dir", str(tmp_path / "ck")]))
    assert err.startswith("error: disk full: cannot write the artifacts of MLflow run "), err
    assert "(lora seed 0) to the artifact store of sqlite:///" in err
    assert "every task is trained and checkpointed" in err and "only writes the artifacts" in err
    _resume_and_compare(tmp_path, suite, mlflow_uri, "fullart", "after task 3/3", uninterrupted)


@pytest.mark.parametrize("error", [_enospc(), RuntimeError("(sqlite3.OperationalError) database or disk is full")],
                         ids=["enospc", "sqlite-full"])
def test_a_full_tracking_database_names_it_and_the_rerun_resumes(tmp_path, mlflow_uri, monkeypatch, error,
                                                                  uninterrupted):
    """Once full, every write of the store fails (ending the runs too): the error stays the disk's, and the
    rerun continues the runs the store still holds."""
    from clbench.store.tracking import MlflowTracker

    monkeypatch.chdir(tmp_path)
    suite = tiny_suite(tmp_path, "fulldb", one_method=True)
    full = []
    with monkeypatch.context() as m:
        for method in ("flush", "set_tags", "end_run"):
            original = getattr(MlflowTracker, method)

            def write(self, *args, _original=original, _method=method, **kwargs):
                if _method == "flush" and self._buffers.get(args[0] if args else kwargs.get("run_id")):
                    full.append(1)  # the second task's metrics: from there on the disk is full
                if len(full) > 1:
                    raise error
                return _original(self, *args, **kwargs)

            m.setattr(MlflowTracker, method, write)
        err = _one_error(CliRunner().invoke(app, ["run", str(suite), "--checkpoint-dir", str(tmp_path / "ck")]))
    assert err.startswith(f"error: disk full: cannot write the MLflow tracking store {mlflow_uri}"), err
    assert "resumes from its last checkpoint" in err and "nothing computed is lost" in err
    if isinstance(error, OSError):
        return  # the same path as sqlite's own error below: the message is what differs
    _resume_and_compare(tmp_path, suite, mlflow_uri, "fulldb", "after task 2/3", uninterrupted)


def test_a_full_disk_elsewhere_is_one_line_naming_the_file():
    from clbench.store.diskfull import DiskFullError, on_disk_full

    with pytest.raises(DiskFullError, match=r"cannot write a file \(No space left on device: /x/y\)"):
        with on_disk_full(None):
            raise _enospc("/x/y")
    with pytest.raises(ZeroDivisionError):  # any other error is left alone
        with on_disk_full("the checkpoint"):
            raise ZeroDivisionError
    with pytest.raises(DiskFullError, match="the checkpoint .*Disk quota exceeded"):
        with on_disk_full("the checkpoint"):
            try:
                raise OSError(errno.EDQUOT, "Disk quota exceeded")
            except OSError as exc:
                raise RuntimeError("wrapped") from exc
