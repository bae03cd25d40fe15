"""Pins the facts of CONTRIBUTING.md's hook author's guide to the loop: in which hooks gradients are enabled and
the model is in train or eval mode (a method that records both inside every hook, through a resume too), what
``model(x, head=t)``, ``model(x)`` and ``ctx.loader`` give, and that state kept across steps with its autograd
graph attached fails the run with one line naming the method (not PyTorch's "backward through the graph a
second time"), while the suite goes on. Also: the CLModel constructor and ``feature_dim``, heads rewritten in
``after_task`` (evaluation uses them), what ``tiny_stream()`` returns, and ``check_method``'s ``seed``."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from clbench_plugins.lora import NaiveLoRA
from typer.testing import CliRunner

from clbench.cli import app
from clbench.methods.hookcheck import MethodHookError, graph_attached
from clbench.methods.hookspecs import hookimpl
from clbench.testing import run_method, tiny_stream

ROOT = Path(__file__).resolve().parents[1]


def _mode(model) -> str:
    modes = {m.training for m in model.modules()}
    return "train" if modes == {True} else "eval" if modes == {False} else "mixed"


class Recorder(NaiveLoRA):
    """Naive LoRA that records, inside every hook, whether gradients are enabled and the model's mode (of every
    module: 'mixed' when they disagree)."""

    name = "recorder"
    aliases = ()

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.seen: dict[str, set[tuple[bool, str]]] = {}
        self.model = None
        self.saved: dict = {}

    def _record(self, hook: str, model=None) -> None:
        model = model if model is not None else self.model
        self.seen.setdefault(hook, set()).add((torch.is_grad_enabled(), _mode(model)))

    @hookimpl
    def configure_model(self, model, ctx):
        self.model = model
        self._record("configure_model", model)
        return super().configure_model(model, ctx)

    @hookimpl
    def load_method_state(self, model, state, ctx):
        self.model = model
        self._record("load_method_state", model)

    @hookimpl
    def training_set(self, ctx):
        self._record("training_set")

    @hookimpl
    def before_task(self, model, ctx):
        self._record("before_task", model)

    @hookimpl
    def param_groups(self, model, ctx):
        self._record("param_groups", model)

    @hookimpl
    def replay_batch(self, model, batch, ctx):
        self._record("replay_batch", model)

    @hookimpl
    def loss_terms(self, model, batch, logits, ctx):
        self._record("loss_terms", model)

    @hookimpl
    def before_optimizer_step(self, model, ctx):
        self._record("before_optimizer_step", model)

    @hookimpl
    def after_optimizer_step(self, model, ctx):
        self._record("after_optimizer_step", model)

    @hookimpl
    def after_task(self, model, ctx):
        self._record("after_task", model)

    @hookimpl
    def merge_task(self, model, ctx):
        self._record("merge_task", model)

    @hookimpl
    def task_updates(self, model, ctx):
        self._record("task_updates", model)

    @hookimpl
    def replay_buffer(self, ctx):
        self._record("replay_buffer")

    @hookimpl
    def method_state(self, ctx):
        self._record("method_state")
        return {"tasks": ctx.task + 1}


def _guide_table() -> dict[str, tuple[bool, str]]:
    """The guide's table: hook -> (gradients enabled, model mode)."""
    guide = (ROOT / "CONTRIBUTING.md").read_text()
    section = guide[guide.index("### What each hook sees"):]
    rows = re.findall(r"^\| `(\w+)` \| (yes|no) \| (train|eval) \|", section, flags=re.M)
    return {hook: (grad == "yes", mode) for hook, grad, mode in rows}


def test_grad_and_mode_in_every_hook_are_what_the_guide_says(tmp_path):
    from clbench.methods.hookspecs import MethodSpec
    from clbench.methods.registry import run_manager
    from clbench.run import checkpoint
    from clbench.run.loop import LoopOptions, checkpoint_payload, resume_state, run_stream
    from clbench.testing import tiny_model, tiny_train

    table = _guide_table()
    hooks = sorted(h for h in vars(MethodSpec) if not h.startswith("_"))
    assert sorted(table) == hooks, "the guide's table must list every hook of clbench/methods/hookspecs.py once"
    stream = tiny_stream(num_tasks=3, num_classes=6, samples_per_class=8)
    cfg = tiny_train(max_steps_per_epoch=2)
    store = checkpoint.RunStore(tmp_path, "guide")

    def save(result, state, model):
        if result.task == 0:
            store.save(checkpoint_payload(state, model))

    first = Recorder(Recorder.Params(rank=2))
    run_stream(tiny_model(), stream, run_manager(first), cfg, 0, LoopOptions(on_task=save))
    resumed = Recorder(Recorder.Params(rank=2))  # a fresh instance continuing from task 0's checkpoint
    run_stream(tiny_model(), stream, run_manager(resumed), cfg, 0,
               LoopOptions(state=resume_state(store.load())))
    seen = {h: first.seen.get(h, set()) | resumed.seen.get(h, set()) for h in hooks}
    for hook in hooks:
        assert seen[hook] == {table[hook]}, (hook, seen[hook], table[hook])


def test_heads_and_loader_are_what_the_guide_says():
    seen = {}

    class Probe(NaiveLoRA):
        name, aliases = "probe", ()

        @hookimpl
        def before_task(self, model, ctx):
            x, y = next(ctx.loader(batch_size=5))
            with torch.no_grad():
                seen[ctx.task] = dict(
                    x=x, y=y, all=model(x), head=[model(x, head=j) for j in range(ctx.task + 1)],
                    sub=[len(b) for b, _ in ctx.loader(batch_size=100, fraction=0.25)],
                    sub_labels=torch.cat([b for _, b in ctx.loader(batch_size=100, fraction=0.25)]),
                    again=torch.cat([b for _, b in ctx.loader(batch_size=100, fraction=0.25)]),
                    gen=[torch.cat([b for _, b in ctx.loader(shuffle=True, generator=torch.Generator().manual_seed(3))])
                         for _ in range(2)])

    stream = tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8)
    run = run_method(Probe(Probe.Params(rank=2)), stream, max_steps_per_epoch=1)
    for t, s in seen.items():
        assert s["x"].dtype == torch.float32 and s["x"].shape[-1] == run.model.image_size  # preprocessed
        assert s["x"].requires_grad is False and s["x"].device.type == "cpu"
        assert set(s["y"].tolist()) <= {0, 1}  # task-local labels: the current head's classes
        assert s["all"].shape == (5, 2 * (t + 1))  # every head so far (this task's untrained one included)
        assert torch.equal(s["all"], torch.cat(s["head"], 1))  # model(x) is the heads concatenated
        assert s["sub"] == [4]  # a quarter of the 16 images
        assert torch.equal(s["sub_labels"], s["again"])  # deterministic subset
        assert torch.equal(s["gen"][0], s["gen"][1])  # a seeded generator repeats the shuffle
        assert sorted(s["gen"][0].tolist()) == [0] * 8 + [1] * 8  # the whole task, once


class Attached(NaiveLoRA):
    """A Fisher-weighted pull whose 'Fisher' is computed from the factors without detaching: the graph it
    carries is freed by the first step's backward, so the second step's backward fails."""

    name, aliases = "attached", ()

    @hookimpl
    def after_task(self, model, ctx):
        self.fisher = [q * q for s in self.sites.values() for q in (s.branches[0].A, s.branches[0].B)]
        self.anchor = [q.detach().clone() for s in self.sites.values() for q in (s.branches[0].A, s.branches[0].B)]

    @hookimpl
    def loss_terms(self, model, batch, logits, ctx):
        if ctx.task == 0:
            return None
        params = [q for s in self.sites.values() for q in (s.branches[0].A, s.branches[0].B)]
        return {"ewc": sum((f * (q - a) ** 2).sum() for f, q, a in zip(self.fisher, params, self.anchor))}


def test_state_with_a_graph_attached_is_one_line_naming_the_method():
    with pytest.raises(MethodHookError) as info:
        run_method(Attached(Attached.Params(rank=2)), tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8),
                   batch_size=8, max_steps_per_epoch=2)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("method 'attached': the training step's backward (loss terms ewc)")
    assert "state kept across steps" in msg and "must be detached" in msg
    assert "attached now: self.fisher[0], self.fisher[1], self.fisher[2] (+" in msg  # where the graph is held


def test_graph_attached_lists_only_tensors_with_a_graph():
    p = torch.nn.Parameter(torch.ones(2))

    class Holder:
        pass

    h = Holder()
    h.param, h.detached, h.nested = p, (p * 2).detach(), {"a": [p * 2, p], "b": (p + 1,)}
    h.module = torch.nn.Linear(2, 2)
    assert graph_attached(h) == ["self.nested['a'][0]", "self.nested['b'][0]"]


ATTACHED_PLUGIN = '''
    """A test method whose Fisher keeps its autograd graph (not detached)."""
    from clbench.methods.hookspecs import hookimpl
    from clbench_plugins.lora import NaiveLoRA

    class Attached(NaiveLoRA):
        name = "attached"
        aliases = ()

        @hookimpl
        def after_task(self, model, ctx):
            self.fisher = [s.branches[0].A * s.branches[0].A for s in self.sites.values()]

        @hookimpl
        def loss_terms(self, model, batch, logits, ctx):
            if ctx.task == 0:
                return None
            return {"ewc": sum((f * s.branches[0].A).sum() for f, s in zip(self.fisher, self.sites.values()))}

    def register_methods(register):
        register(Attached)
'''


def test_the_run_fails_with_that_line_and_the_suite_goes_on(tmp_path, mlflow_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    (tmp_path / "plugs").mkdir()
    (tmp_path / "plugs" / "attached.py").write_text(textwrap.dedent(ATTACHED_PLUGIN))
    suite = tmp_path / "suite.yaml"
    suite.write_text(textwrap.dedent("""\
        name: graphs
        seeds: [0]
        stream: {name: synthetic, num_tasks: 2, num_classes: 4, samples_per_class: 8}
        backbone: {name: vit_micro_clbench, image_size: 16, pretrained: false}
        train: {epochs: 1, batch_size: 8, max_steps_per_epoch: 2}
        runtime: {device: cpu, log_every: 1000}
        methods:
          - {name: attached, params: {rank: 2}}
          - {name: lora, params: {rank: 2}}
        tracking: {experiment: graphs}
        """))
    res = CliRunner().invoke(app, ["run", str(suite), "--plugins-dir", "plugs", "--checkpoint-dir",
                                   str(tmp_path / "ck")])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "Trying to backward" not in res.output.replace(
        "PyTorch: 'Trying to backward", "")
    [failed] = [ln for ln in res.stderr.splitlines() if "FAILED:" in ln]
    assert "attached.py" in failed and "method 'attached'" in failed and "must be detached" in failed, failed
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("graphs")
    runs = {r.data.tags["clbench.method"]: r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("clbench.role") == "child"}
    assert runs["attached"].info.status == "FAILED" and "must be detached" in runs["attached"].data.tags["clbench.error"]
    assert runs["lora"].info.status == "FINISHED" and "final/acc" in runs["lora"].data.metrics


# -- the model's constructor, heads rewritten in after_task, tiny_stream, check_method's params and seed -----------


def test_model_constructor_and_feature_dim_are_what_the_guide_says():
    import inspect

    from clbench import CLModel
    from clbench.testing import tiny_model

    assert list(inspect.signature(CLModel.__init__).parameters) == ["self", "backbone", "image_size", "in_chans",
                                                                    "mean", "std"]
    model = tiny_model()
    assert model.feature_dim == model.backbone.num_features == 32 and len(model.heads) == 0
    head = model.add_head(3)
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (model.feature_dim, 3)
    assert len(model.backbone.blocks) == 2 and (model.image_size, model.in_chans) == (16, 1)


class HeadWriter(NaiveLoRA):
    """Rewrites every head in after_task, the finished ones (frozen) included: every image becomes class 0."""

    name, aliases = "headwriter", ()
    no_grad = True

    @hookimpl
    def after_task(self, model, ctx):
        with torch.no_grad() if self.no_grad else torch.enable_grad():
            for j, head in enumerate(model.heads):
                head.weight.zero_()
                head.bias.zero_()
                if j == 0:
                    head.bias[0] = 1.0


def test_heads_rewritten_in_after_task_are_what_evaluation_uses():
    stream = tiny_stream(num_tasks=3, num_classes=6, samples_per_class=8)
    run = run_method(HeadWriter(HeadWriter.Params(rank=2)), stream=stream, max_steps_per_epoch=1)
    share = 100.0 * float((stream.tasks[0].test_y == 0).float().mean())  # task 0's test images of class 0
    for t in range(3):
        assert run.R[t, 0] == pytest.approx(share) and all(run.R[t, j] == 0 for j in range(1, t + 1)), run.R
    assert run.model.heads[0].bias[0] == 1.0 and not run.model.heads[0].weight.requires_grad
    unguarded = HeadWriter(HeadWriter.Params(rank=2))
    unguarded.no_grad = False  # the current head requires grad: an in-place write outside no_grad fails
    with pytest.raises(MethodHookError, match="hook after_task raised RuntimeError: a leaf Variable that requires "
                                              "grad is being used in an in-place operation"):
        run_method(unguarded, stream=stream, max_steps_per_epoch=1)


def test_tiny_stream_is_what_the_guide_says():
    stream = tiny_stream()
    assert len(stream.tasks) == 2 and stream.augment is None
    for t, task in enumerate(stream.tasks):
        assert task.classes == (2 * t, 2 * t + 1)
        assert task.train_x.dtype == torch.uint8 and tuple(task.train_x.shape) == (48, 1, 16, 16)
        assert task.train_y.dtype == torch.long and set(task.train_y.tolist()) == set(task.classes)
        assert task.test_x.dtype == torch.uint8 and set(task.test_y.tolist()) == set(task.classes)
    assert len(tiny_stream(num_tasks=3, num_classes=6, samples_per_class=8).tasks[2].train_y) == 16


def test_check_method_seed_seeds_the_stream_and_the_run():
    from clbench import contract

    a, b = contract.contract_stream(0), contract.contract_stream(1)
    assert not torch.equal(a.tasks[0].train_x, b.tasks[0].train_x)
    first = contract.contract_run(NaiveLoRA, {"rank": 2}, seed=1)
    again = contract.contract_run(NaiveLoRA, NaiveLoRA.Params(rank=2), seed=1)  # a Params instance or a dict
    assert torch.equal(first.stream.tasks[1].test_x, again.stream.tasks[1].test_x)
    assert np.array_equal(first.R, again.R, equal_nan=True)
