"""The plugin contract, run on every registered method (as timm tests every registered model).

The registry is discovered at collection time, so a method that a built-in module or an installed plugin
package registers is covered without editing this file. Per method: registration (name, documented params
that reject typos, hooks that match the spec), a two-task run on the tiny ViT (finite losses, well-formed
accuracy matrices and task updates, pre-trained weights unchanged except by merging the reported updates)
determinism on CPU, and resume (interrupted after task 1 of 3, continued bit-exactly). The checks live in ``clbench.contract`` so plugin packages can run them too; the
second half of this file proves those checks fail on methods that break the contract.
"""

from __future__ import annotations

import functools

import pytest
import torch

from clbench import contract
from clbench.methods.hookspecs import hookimpl
from clbench.methods.method import Method
from clbench.methods.registry import discover
from clbench.model.backbones import CLModel
from clbench.model.lora import inject

REGISTRY = discover(strict=False)
METHODS = sorted(REGISTRY.methods)


@functools.cache
def _stream():
    return contract.contract_stream(seed=0)


@functools.cache
def _run(name: str) -> contract.ContractRun:
    return contract.contract_run(REGISTRY.methods[name].cls, stream=_stream(), seed=0)


def test_registry_loads_cleanly():
    assert REGISTRY.errors == []
    assert "lora" in METHODS


@pytest.mark.parametrize("name", METHODS)
def test_registration(name):
    cls = REGISTRY.methods[name].cls
    contract.check_registration(cls)
    assert cls.paper.strip(), f"{name}: cite the paper in the class attribute 'paper'"


@pytest.mark.parametrize("name", METHODS)
def test_two_tasks_on_tiny_vit(name):
    run = _run(name)
    contract.check_run(run)
    assert [r.task for r in run.results] == [0, 1]


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_on_cpu(name):
    contract.check_determinism(REGISTRY.methods[name].cls, _run(name), stream=_stream(), seed=0)


@pytest.mark.parametrize("name", METHODS)
def test_resume_is_bit_exact(name):
    contract.check_resume(REGISTRY.methods[name].cls)


# -- the contract's checks must be able to fail -------------------------------------------------------------


def _lora():
    return REGISTRY.methods["lora"].cls


def test_merging_method_passes_frozen_check():
    # IncLoRA merges each task's branch into the base weights: legitimate, the contract must accept it.
    run = contract.contract_run(_lora(), {"fresh_per_task": True}, stream=_stream())
    site = next(iter(run.sites.values()))
    base = site.base_weight
    assert not torch.equal(base, run.initial[id(base)]), "IncLoRA should have merged into the base weight"
    contract.check_run(run)


def test_write_into_frozen_weight_fails():
    class Sneaky(_lora()):
        name = "sneaky"

        @hookimpl
        def after_task(self, model, ctx):
            with torch.no_grad():
                model.backbone.blocks[0].mlp.fc1.weight.add_(1e-3)

    with pytest.raises(contract.ContractError, match=r"blocks\.0\.mlp\.fc1\.weight.*changed"):
        contract.check_run(contract.contract_run(Sneaky, stream=_stream()))


def test_unreported_merge_fails():
    class Silent(_lora()):
        name = "silent"

        @hookimpl
        def task_updates(self, model, ctx):
            own = super().task_updates(model, ctx)
            return {n: u for i, (n, u) in enumerate(own.items()) if i}  # drops the first site

    with pytest.raises(contract.ContractError, match="other than the reported task update"):
        contract.check_run(contract.contract_run(Silent, {"fresh_per_task": True}, stream=_stream()))


def test_malformed_update_fails():
    class Truncated(_lora()):
        name = "truncated"

        @hookimpl
        def task_updates(self, model, ctx):
            own = super().task_updates(model, ctx)
            return {n: type(u)(u.B[:-1], u.A) for n, u in own.items()}  # one row short

    with pytest.raises(contract.ContractError, match="expected B"):
        contract.check_run(contract.contract_run(Truncated, {"fresh_per_task": True}, stream=_stream()))


def test_nondeterminism_fails():
    calls = []

    class Drifting(_lora()):
        name = "drifting"

        @hookimpl
        def configure_model(self, model, ctx):
            super().configure_model(model, ctx)
            calls.append(1)  # a different perturbation per run: state leaking between runs
            g = torch.Generator().manual_seed(len(calls))
            with torch.no_grad():
                for site in self.sites.values():
                    site.branches[0].B.normal_(0, 0.3, generator=g)

    first = contract.contract_run(Drifting, stream=_stream())
    with pytest.raises(contract.ContractError, match="different R"):
        contract.check_determinism(Drifting, first, stream=_stream())


def test_params_accepting_typos_fail():
    from pydantic import BaseModel, Field

    class Loose(BaseModel):
        rank: int = Field(4, description="rank")

    class Lax(_lora()):
        name = "lax"
        Params = Loose

    with pytest.raises(contract.ContractError, match="extra='forbid'"):
        contract.check_registration(Lax)


def test_rehearsal_buffer_lost_on_resume_fails():
    # ER whose checkpoint forgets the buffer: the resumed run replays nothing on task 1 and diverges.
    er = REGISTRY.methods["er"].cls

    class Amnesic(er):
        name = "amnesic"

        @hookimpl
        def method_state(self, ctx):
            return {"index": self.index[:0], "seen": self.seen}

    params = {"rank": 2, "replay_ratio": 2.0}
    contract.check_resume(er, params)
    with pytest.raises(contract.ContractError, match="resumed after task 0: "):
        contract.check_resume(Amnesic, params)


def test_backbone_training_method_reports_on_backbone_maps_only():
    finetune = REGISTRY.methods["finetune"].cls

    class Misnamed(finetune):
        name = "misnamed"

        @hookimpl
        def task_updates(self, model, ctx):
            return {f"x.{n}": u for n, u in self._update.items()}

    contract.check_run(_run("finetune"))  # the dense changes of every block's maps are well formed
    with pytest.raises(contract.ContractError, match="not an adapted site or a backbone map"):
        contract.check_run(contract.contract_run(Misnamed, stream=_stream()))


# -- replacement models (issue 26): copies of the backbone, batch-dependent predictions, no low-rank update ----


def _replacing(model_cls, groups=None, name="replacing"):
    """A method that freezes the backbone and replaces the model by ``model_cls(model)``."""
    from clbench.methods.method import Method

    class Replacing(Method):
        paper = "test"
        low_rank_updates = False

        @hookimpl
        def configure_model(self, model, ctx):
            model.backbone.requires_grad_(False)
            return model_cls(model)

        @hookimpl
        def param_groups(self, model, ctx):
            return groups(model) if groups else None

    Replacing.name = name
    return Replacing


class _Wrapped(CLModel):
    def __init__(self, base):
        super().__init__(base.backbone, base.image_size, base.in_chans, base.mean.flatten().tolist(),
                         base.std.flatten().tolist())
        self.heads = base.heads


class _DeepCopy(_Wrapped):
    """Fine-tunes a deep copy of the backbone; the frozen original is left untouched."""

    def __init__(self, base):
        import copy

        super().__init__(base)
        self.copy = copy.deepcopy(base.backbone).requires_grad_(True)

    def features(self, x):
        return self.copy(x)


def test_deep_copied_trainable_backbone_fails():
    run = contract.contract_run(_replacing(_DeepCopy), stream=_stream())
    with pytest.raises(contract.ContractError, match="trained copy of a pre-trained weight"):
        contract.check_run(run)


def test_trainable_parameter_outside_the_groups_fails():
    only_heads = _replacing(_DeepCopy, groups=lambda m: [])  # declares nothing, yet the copy requires grad
    with pytest.raises(contract.ContractError, match=r"copy\..*in no parameter group"):
        contract.check_run(contract.contract_run(only_heads, stream=_stream()))


class _BatchCentred(_Wrapped):
    """Subtracts the batch mean of the features: each prediction depends on the rest of its batch."""

    def features(self, x):
        f = self.backbone(x)
        return f - f.mean(0, keepdim=True)


def test_batch_dependent_prediction_fails():
    with pytest.raises(contract.ContractError, match="depend on the rest of the batch"):
        contract.check_run(contract.contract_run(_replacing(_BatchCentred), stream=_stream()))


def test_plain_replacement_passes():
    contract.check_run(contract.contract_run(_replacing(_Wrapped), stream=_stream()))


def test_replacement_around_another_backbone_is_refused():
    import copy

    from clbench.errors import ClbenchError

    class Other(_Wrapped):
        def __init__(self, base):
            super().__init__(base)
            self.backbone = copy.deepcopy(base.backbone)

    with pytest.raises(ClbenchError, match="same backbone"):
        contract.contract_run(_replacing(Other), stream=_stream())
    with pytest.raises(ClbenchError, match="CLModel subclass"):
        contract.contract_run(_replacing(lambda base: torch.nn.Linear(2, 2)), stream=_stream())


def test_low_rank_flag_requires_no_updates():
    class Claims(_lora()):
        name = "claims"
        low_rank_updates = False

    with pytest.raises(contract.ContractError, match="must report none"):
        contract.check_run(contract.contract_run(Claims, stream=_stream()))


class Anchored(Method):
    """A LoRA with state across tasks (an L2 pull of the factors to where the last task left them), restored."""

    name = "anchored"

    def __init__(self, params=None):
        super().__init__(params)
        self.sites, self.anchor = {}, {}

    def _live(self):
        return {f"{n}.{k}": p for n, s in self.sites.items() for k, p in s.branches[0].named_parameters()}

    @hookimpl
    def configure_model(self, model, ctx):
        self.sites = inject(model.backbone, ("q", "v"), None)
        for site in self.sites.values():
            site.add_branch(2, scale=1.0)

    @hookimpl
    def loss_terms(self, model, batch, logits, ctx):
        if not self.anchor:
            return None
        return {"pull": 10.0 * sum(((p - self.anchor[k]) ** 2).sum() for k, p in self._live().items())}

    @hookimpl
    def after_task(self, model, ctx):
        self.anchor = {k: p.detach().clone() for k, p in self._live().items()}

    @hookimpl
    def method_state(self, ctx):
        return {"anchor": self.anchor}

    @hookimpl
    def load_method_state(self, model, state, ctx):
        self.anchor = dict(state["anchor"])


def test_stateful_method_resumes():
    contract.check_resume(Anchored)


def test_state_without_load_method_state_fails():
    class Forgetful(Anchored):
        name = "forgetful"
        load_method_state = None  # as if the plugin never defined the hook

    with pytest.raises(contract.ContractError, match=r"method_state returns state \(\['anchor'\]\) but the class has no "
                                                     "load_method_state"):
        contract.check_resume(Forgetful)


def test_state_not_restored_fails():
    class Lossy(Anchored):
        name = "lossy"

        @hookimpl
        def load_method_state(self, model, state, ctx):
            pass  # drops the anchor: the resumed task trains without the pull

    with pytest.raises(contract.ContractError, match=r"resumed after task 0: task 1 trains differently.*pull"):
        contract.check_resume(Lossy)


def test_unloadable_state_fails():
    class Pickled(Anchored):
        name = "pickled"

        @hookimpl
        def method_state(self, ctx):
            return {"anchor": self.anchor, "when": object()}

    with pytest.raises(contract.ContractError, match="cannot be checkpointed safely"):
        contract.check_resume(Pickled)


# -- `clbench check`: the same checks from the command line, from any folder ---------------------------------

FORGETFUL_PLUGIN = '''
"""A folder plugin that keeps state across tasks and cannot restore it."""
import torch
from clbench import Method, hookimpl, inject


class Forgetful(Method):
    name = "forgetful"
    paper = "none (test plugin)"

    @hookimpl
    def configure_model(self, model, ctx):
        self.sites = inject(model.backbone, ("q", "v"), None)
        for site in self.sites.values():
            site.add_branch(2, scale=1.0)
        self.anchor = {}

    @hookimpl
    def loss_terms(self, model, batch, logits, ctx):
        live = {n: s.branches[0].B for n, s in self.sites.items()}
        if not self.anchor:
            return None
        return {"pull": 10.0 * sum(((b - self.anchor[n]) ** 2).sum() for n, b in live.items())}

    @hookimpl
    def after_task(self, model, ctx):
        self.anchor = {n: s.branches[0].B.detach().clone() for n, s in self.sites.items()}

    @hookimpl
    def method_state(self, ctx):
        return {"anchor": self.anchor}


def register_methods(register):
    register(Forgetful)
'''


def test_clbench_check_passes_a_builtin_from_any_folder(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from clbench.cli import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["check", "lora", "--set", "rank=2", "--set", "targets=[q,v]"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("contract of method 'lora'") and lines[0].endswith("with rank=2, targets=[q,v]")
    assert len(lines) == 5 and all(ln.startswith("ok    ") for ln in lines[1:]), lines
    assert "resume" in lines[-1]
    # progress on stderr while it runs: each check as it starts, and the loop's lines of each run
    progress = res.stderr.splitlines()
    assert progress[0] == "..    registration (name, params, hooks)"
    assert any(ln.startswith("      task 2/2 done: acc ") for ln in progress)
    assert any(ln.startswith("      resumed: task 3/3 done") for ln in progress)


def test_clbench_check_params_reach_the_method_and_a_bad_one_is_one_line(monkeypatch):
    from typer.testing import CliRunner

    from clbench.cli import app

    seen = []
    monkeypatch.setattr(contract, "method_checks", lambda cls, params, **kw: seen.append(params) or [])
    res = CliRunner().invoke(app, ["check", "lora", "--set", "params.rank=3", "--set", "fresh_per_task=true"])
    assert res.exit_code == 0, res.output
    defaults = type(seen[0])()
    assert (seen[0].rank, seen[0].fresh_per_task, seen[0].alpha) == (3, True, defaults.alpha) != (defaults.rank, False)
    res = CliRunner().invoke(app, ["check", "lora", "--set", "rank=0"])
    assert res.exit_code == 1 and res.stdout == "" and "Traceback" not in res.output
    assert res.stderr.startswith("error: --set rank=0: rank: Input should be greater than or equal to 1"), res.stderr


def test_clbench_check_fails_a_folder_plugin_at_resume(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from clbench.cli import app

    (tmp_path / "plugs").mkdir()
    (tmp_path / "plugs" / "forgetful.py").write_text(FORGETFUL_PLUGIN)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["check", "forgetful"])  # the folder not given: the error points at it
    assert res.exit_code == 1
    assert res.stderr.strip().endswith("'forgetful' seems to be defined in the plugins folder plugs, which is loaded "
                                       "only with --plugins-dir: add --plugins-dir plugs"), res.stderr
    res = CliRunner().invoke(app, ["check", "forgetful", "--plugins-dir", "plugs"])
    assert res.exit_code == 1, res.output
    lines = res.stdout.splitlines()
    assert [ln[:6] for ln in lines[1:5]] == ["ok    "] * 3 + ["FAIL  "], lines
    error = res.stderr.strip().splitlines()[-1]
    assert error.startswith("error: resume") and "no load_method_state hook" in error, error
    assert "Traceback" not in res.output


def test_clbench_check_unknown_name_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from clbench.cli import app

    res = CliRunner().invoke(app, ["check", "lorra"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown method 'lorra'; did you mean"), lines
    assert lines[0].endswith("; a method in a plugins folder is loaded only with --plugins-dir DIR")


def test_clbench_check_says_it_is_still_running_during_a_long_step(monkeypatch):
    import threading

    from clbench import cli

    said, first = [], threading.Event()

    def echo(msg, err=False):
        said.append((msg, err))
        first.set()

    monkeypatch.setattr(cli.typer, "echo", echo)
    with cli._ticking(0.0, every=0.01):
        assert first.wait(10)  # the block (a slow hook) runs on; the ticker speaks meanwhile
    assert said[0][1] and said[0][0].startswith("      still running (")
