"""The plugin contract, run on every registered method (as timm tests every registered model).

The registry is discovered at collection time, so a method that a built-in module or an installed plugin
package registers is covered without editing this file. Per method: registration (name, documented params
that reject typos, hooks that match the spec), a two-task run on the tiny ViT (finite losses, well-formed
accuracy matrices and task updates, pre-trained weights unchanged except by merging the reported updates)
and determinism on CPU. The checks live in ``clbench.contract`` so plugin packages can run them too; the
second half of this file proves those checks fail on methods that break the contract.
"""

from __future__ import annotations

import functools

import pytest
import torch

from clbench import contract
from clbench.backbones import CLModel
from clbench.hookspecs import hookimpl
from clbench.registry import discover

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
            return {"seen": self.seen}

    params = {"rank": 2, "replay_ratio": 2.0}
    contract.check_resume(er, contract.contract_run(er, params, stream=_stream()), params, stream=_stream())
    with pytest.raises(contract.ContractError, match="resumed after task 0 gives a different R"):
        contract.check_resume(Amnesic, contract.contract_run(Amnesic, params, stream=_stream()), params,
                              stream=_stream())


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
    from clbench.method import Method

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
