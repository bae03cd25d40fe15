"""A method hook that raises or returns the wrong type fails that run with one line naming the plugin, the hook and
what was wrong; the suite's other runs go on (issue 23). The loop-level cases run the real loop on a micro ViT
without MLflow; one CLI run checks the run's FAILED status, its error tag and the other method finishing."""

from __future__ import annotations

import textwrap

import pytest
import torch
from clbench_plugins.lora import NaiveLoRA
from typer.testing import CliRunner

from clbench.cli import app
from clbench.methods.hookcheck import MethodHookError
from clbench.methods.hookspecs import hookimpl
from clbench.testing import run_method, tiny_stream


class Broken(NaiveLoRA):
    name = "broken"
    aliases = ()


def broken(hook: str, body):
    """A naive LoRA whose ``hook`` is replaced by ``body`` (called with the hook's arguments)."""
    impl = hookimpl(lambda self, model, ctx, **kw: body(model=model, ctx=ctx, **kw))
    if hook == "loss_terms":
        impl = hookimpl(lambda self, model, batch, logits, ctx: body(model=model, ctx=ctx, logits=logits))
    elif hook == "method_state":
        impl = hookimpl(lambda self, ctx: body(model=None, ctx=ctx))
    cls = type(f"Broken_{hook}", (Broken,), {hook: impl})
    return cls(Broken.Params(rank=2))


def boom(**kw):
    raise KeyError("no_such_site")


def quits(**kw):
    raise SystemExit(0)  # what sys.exit(0), exit() and quit() raise


CASES = {
    "loss_terms-vector": ("loss_terms", lambda logits, **kw: {"bad": logits.sum(0)},
                          "term 'bad' is a tensor of shape (2,)"),
    "loss_terms-string": ("loss_terms", lambda **kw: {"bad": "0.5"}, "term 'bad' is str"),
    "loss_terms-list": ("loss_terms", lambda **kw: [1.0], "expected a dict of named scalar loss tensors"),
    "task_updates-garbage": ("task_updates", lambda **kw: {"blocks.0.attn.qkv": 3},
                             "expected site name -> clbench.model.lora.LowRank"),
    "task_updates-string": ("task_updates", lambda **kw: "garbage", "returned str 'garbage'"),
    "param_groups-string": ("param_groups", lambda **kw: "adapters", "expected a list of optimizer groups"),
    "param_groups-no-params": ("param_groups", lambda **kw: [{"lr": 1.0}], "group 0 is dict"),
    "configure_model-42": ("configure_model", lambda **kw: 42, "returned int 42; expected a torch.nn.Module"),
    "method_state-list": ("method_state", lambda **kw: [1, 2], "returned list [1, 2]; expected a dict"),
    "before_task-raises": ("before_task", boom, "raised KeyError: 'no_such_site' (at test_hook_failures.py:"),
    "after_task-raises": ("after_task", boom, "raised KeyError"),
    "after_task-exits": ("after_task", quits, "called SystemExit(0) (sys.exit/exit/quit) (at test_hook_failures.py:"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_hook_is_one_error_naming_method_hook_and_problem(case):
    hook, body, what = CASES[case]
    with pytest.raises(MethodHookError) as info:
        run_method(broken(hook, body), stream=tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8),
                   max_steps_per_epoch=1)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"method 'broken': hook {hook} "), msg
    assert what in msg, msg


def test_a_good_method_passes_the_checks_unchanged():
    run = run_method(NaiveLoRA(NaiveLoRA.Params(rank=2)), stream=tiny_stream(num_tasks=2, num_classes=4,
                                                                             samples_per_class=8),
                     max_steps_per_epoch=1)
    assert run.state.next_task == 2 and torch.isfinite(torch.as_tensor(run.R[1, :2])).all()


BAD_PLUGIN = '''
    """A test method: naive LoRA whose loss term is a vector (the wrong type) on task 1."""
    from clbench.methods.hookspecs import hookimpl
    from clbench_plugins.lora import NaiveLoRA

    class VecLoRA(NaiveLoRA):
        name = "veclora"
        aliases = ()

        @hookimpl
        def loss_terms(self, model, batch, logits, ctx):
            return {"vec": logits.sum(0)} if ctx.task == 1 else {}

    def register_methods(register):
        register(VecLoRA)
'''


def test_the_failing_run_fails_and_the_suite_goes_on(tmp_path, mlflow_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    (tmp_path / "plugs").mkdir()
    (tmp_path / "plugs" / "veclora.py").write_text(textwrap.dedent(BAD_PLUGIN))
    suite = tmp_path / "suite.yaml"
    suite.write_text(textwrap.dedent("""\
        name: hooks
        seeds: [0]
        stream: {name: synthetic, num_tasks: 2, num_classes: 4, samples_per_class: 8}
        backbone: {name: vit_micro_clbench, image_size: 16, pretrained: false}
        train: {epochs: 1, batch_size: 16, max_steps_per_epoch: 1}
        runtime: {device: cpu, log_every: 1000}
        methods:
          - {name: veclora, params: {rank: 2}}
          - {name: lora, params: {rank: 2}}
        tracking: {experiment: hooks}
        """))
    res = CliRunner().invoke(app, ["run", str(suite), "--plugins-dir", "plugs",
                                   "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    [failed] = [ln for ln in res.stderr.splitlines() if "FAILED:" in ln]
    assert "veclora.py" in failed and "hook loss_terms" in failed and "term 'vec' is a tensor of shape (2,)" in failed
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("hooks")
    runs = {r.data.tags["clbench.method"]: r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("clbench.role") == "child"}
    assert runs["veclora"].info.status == "FAILED"
    assert "hook loss_terms" in runs["veclora"].data.tags["clbench.error"]
    assert runs["lora"].info.status == "FINISHED"  # the run after the failing one still trained
    assert "final/acc" in runs["lora"].data.metrics
