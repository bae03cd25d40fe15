"""The exact order in which the loop calls the hooks, pinned over two tasks and a resume; every hook of the
spec is exercised (a new hook cannot be added without being pinned here)."""

import copy

import torch
from pydantic import BaseModel

from clbench import Method, hookimpl, inject
from clbench.methods.registry import HOOK_NAMES, run_manager
from clbench.run.checkpoint import rng_state
from clbench.run.loop import LoopOptions, LoopState, run_stream
from clbench.testing import run_method, tiny_model, tiny_stream, tiny_train


class Recorder(Method):
    name = "recorder"

    class Params(BaseModel):
        pass

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def _log(self, hook, ctx):
        self.calls.append(f"{hook}:{ctx.task}")

    @hookimpl
    def configure_model(self, model, ctx):
        self.calls.append("configure_model")
        self.sites = inject(model.backbone, ["q"])
        for s in self.sites.values():
            s.add_branch(2)

    @hookimpl
    def training_set(self, ctx):
        self._log("training_set", ctx)  # None: the task's own data

    @hookimpl
    def before_task(self, model, ctx):
        assert len(model.heads) == ctx.task + 1  # the new head exists before before_task
        self._log("before_task", ctx)

    @hookimpl
    def param_groups(self, model, ctx):
        self._log("param_groups", ctx)
        return [{"params": [p for s in self.sites.values() for p in s.parameters()]}]

    @hookimpl
    def replay_batch(self, batch, ctx):
        self._log("replay_batch", ctx)
        return ctx.task_samples(0).take(torch.arange(2)) if ctx.task else None  # two task-0 samples on task 1

    @hookimpl
    def loss_terms(self, model, batch, logits, ctx, replayed):
        self._log("loss_terms", ctx)
        assert (replayed is not None and len(replayed.y) == 2) == (ctx.task == 1)
        return {"zero": logits.sum() * 0}

    @hookimpl
    def before_optimizer_step(self, model, ctx):
        self._log("before_optimizer_step", ctx)

    @hookimpl
    def after_optimizer_step(self, model, ctx):
        self._log("after_optimizer_step", ctx)

    @hookimpl
    def after_task(self, model, ctx):
        self._log("after_task", ctx)

    @hookimpl
    def merge_task(self, model, ctx):
        self._log("merge_task", ctx)

    @hookimpl
    def task_updates(self, model, ctx):
        self._log("task_updates", ctx)
        return {n: s.update() for n, s in self.sites.items()}

    @hookimpl
    def replay_buffer(self, ctx):
        self._log("replay_buffer", ctx)

    @hookimpl
    def method_state(self, ctx):
        self._log("method_state", ctx)
        return {"tasks_done": ctx.task + 1}

    @hookimpl
    def load_method_state(self, model, state, ctx):
        self._log("load_method_state", ctx)
        assert state == {"tasks_done": ctx.task + 1}  # what method_state returned after that task


STEP = ["replay_batch", "loss_terms", "before_optimizer_step", "after_optimizer_step"]
PER_TASK = ["training_set", "before_task", "param_groups", *STEP, *STEP, "after_task", "merge_task",
            "task_updates", "replay_buffer", "method_state"]  # two steps per task: the step hooks appear twice


def test_hook_order_over_two_tasks():
    rec = Recorder()
    run = run_method(rec, stream=tiny_stream(num_tasks=2), epochs=1, max_steps_per_epoch=2)
    expected = ["configure_model"] + [f"{h}:0" for h in PER_TASK] + [f"{h}:1" for h in PER_TASK]
    assert rec.calls == expected
    assert run.results[0].loss_terms == {"zero": 0.0}
    assert len(run.results) == 2


def test_hook_order_on_resume_and_every_hook_exercised():
    stream, cfg = tiny_stream(num_tasks=2), tiny_train(max_steps_per_epoch=2)
    saved = {}

    def keep_after_first_task(result, state, model):
        if result.task == 0:
            saved.update(model=copy.deepcopy(model.state_dict()), method=state.method_state, rng=rng_state(),
                         R=state.R.copy(), R_til=state.R_til.copy())

    first = Recorder()
    run_stream(tiny_model(), stream, run_manager(first), cfg, 0, LoopOptions(on_task=keep_after_first_task))
    resumed = Recorder()
    state = LoopState(next_task=1, R=saved["R"], R_til=saved["R_til"], method_state=saved["method"],
                      model_state=saved["model"], rng=saved["rng"])
    run_stream(tiny_model(), stream, run_manager(resumed), cfg, 0, LoopOptions(state=state))
    assert resumed.calls == ["configure_model", "load_method_state:0"] + [f"{h}:1" for h in PER_TASK]
    # The count guard (as tox asserts its hook count): every hook of the spec was called above.
    called = {c.split(":")[0] for c in first.calls + resumed.calls}
    assert called == HOOK_NAMES, sorted(HOOK_NAMES ^ called)
    assert len(HOOK_NAMES) == 14
