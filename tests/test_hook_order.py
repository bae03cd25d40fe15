"""The exact order in which the loop calls the hooks, pinned over two tasks."""

from pydantic import BaseModel

from clbench.hookspecs import hookimpl
from clbench.lora import inject
from clbench.method import Method
from clbench.testing import run_method, tiny_stream


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
    def before_task(self, model, ctx):
        assert len(model.heads) == ctx.task + 1  # the new head exists before before_task
        self._log("before_task", ctx)

    @hookimpl
    def param_groups(self, model, ctx):
        self._log("param_groups", ctx)
        return [{"params": [p for s in self.sites.values() for p in s.parameters()]}]

    @hookimpl
    def loss_terms(self, model, batch, logits, ctx):
        self._log("loss_terms", ctx)
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


def test_hook_order_over_two_tasks():
    rec = Recorder()
    run = run_method(rec, stream=tiny_stream(num_tasks=2), epochs=1, max_steps_per_epoch=2)
    per_task = ["before_task", "param_groups", "loss_terms", "before_optimizer_step", "after_optimizer_step",
                "loss_terms", "before_optimizer_step", "after_optimizer_step", "after_task", "merge_task",
                "task_updates"]
    # two steps per task: the step triple appears twice
    expected = ["configure_model"] + [f"{h}:0" for h in per_task] + [f"{h}:1" for h in per_task]
    assert rec.calls == expected
    assert run.results[0].loss_terms == {"zero": 0.0}
    assert len(run.results) == 2
