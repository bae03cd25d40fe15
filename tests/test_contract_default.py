"""The contract's default training and its version (issue 34, item 1).

A plugin written to the first contract (one ``loss_terms`` hook: "the harness's default training with an extra L2
penalty", no ``configure_model``, no ``param_groups``) failed every run under contract 2: its default, the whole
backbone, broke the trainable-parameter rule. Contract 3 freezes the pre-trained backbone after ``configure_model``
unless the method declares ``trains_backbone``: such a plugin trains the heads on the frozen backbone, runs a suite
to FINISHED and prints one line naming the contract change and the fix; with ``trains_backbone = True`` it
fine-tunes the backbone, as contract 1 did. The changelog holds an entry for the current version.
"""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import clbench
from clbench import contract
from clbench.cli import app
from clbench.testing import mlflow_runs, run_method, tiny_model, tiny_suite_yaml

ROOT = Path(__file__).resolve().parents[1]

# An outside package's module, written from the first contract's docs: one hook, nothing configured.
FIRST_CONTRACT = '''
from clbench import Method, hookimpl


class FirstL2(Method):
    """The harness's default training with an extra L2 penalty on what trains."""

    name = "first_l2"

    @hookimpl
    def loss_terms(self, model, logits):
        return {"l2": 1e-3 * sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad)}


def register_methods(register):
    register(FirstL2)
'''


@pytest.fixture
def first_l2(tmp_path, monkeypatch):
    """The package installed as pip lays it out (module + dist-info with the clbench entry point)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "clbench_first_l2.py").write_text(FIRST_CONTRACT)
    info = site / "clbench_first_l2-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clbench-first-l2\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[clbench]\nfirst_l2 = clbench_first_l2\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield importlib.import_module("clbench_first_l2").FirstL2
    sys.modules.pop("clbench_first_l2", None)


def test_first_contract_plugin_runs_a_suite_to_finished_and_names_the_change(first_l2, tmp_path, monkeypatch,
                                                                             mlflow_uri):
    monkeypatch.chdir(tmp_path)
    suite = tmp_path / "first.yaml"
    suite.write_text(tiny_suite_yaml("first", one_method=True).replace("name: lora, params: {rank: 2}",
                                                                        "name: first_l2"))
    res = CliRunner().invoke(app, ["run", str(suite)])
    assert res.exit_code == 0, res.output
    [run] = mlflow_runs(mlflow_uri, "first", role="child")
    assert run.info.status == "FINISHED" and "final/acc" in run.data.metrics
    assert "train/l2" in run.data.metrics
    notice = [line for line in res.output.splitlines() if "contract 3" in line]
    assert len(notice) == 1, res.output  # once per run, one line
    assert f"contract {clbench.CONTRACT_VERSION}: the loop froze" in notice[0]
    assert "set trains_backbone = True to fine-tune it" in notice[0] and "CONTRACT_CHANGELOG" in notice[0]


def test_the_default_trains_the_heads_on_the_frozen_backbone(first_l2):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    run = run_method(first_l2(), model=model, max_steps_per_epoch=2)
    assert all(torch.equal(before[n], p) for n, p in run.model.backbone.named_parameters())
    assert all(not p.requires_grad for p in run.model.backbone.parameters())
    assert run.results[0].trainable_params == sum(p.numel() for p in run.model.heads[0].parameters())
    assert run.results[1].loss_terms["l2"] > 0
    contract.check_method(first_l2)  # the whole contract holds for it


def test_trains_backbone_restores_contract_1s_full_fine_tuning(first_l2):
    class FullL2(first_l2):
        name = "full_l2"
        trains_backbone = True

    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    run = run_method(FullL2(), model=model, max_steps_per_epoch=2)
    changed = [n for n, p in run.model.backbone.named_parameters() if not torch.equal(before[n], p)]
    assert "blocks.0.attn.qkv.weight" in changed
    backbone = sum(p.numel() for p in run.model.backbone.parameters())
    assert run.results[0].trainable_params == backbone + sum(p.numel() for p in run.model.heads[0].parameters())


def test_a_method_that_freezes_its_backbone_gets_no_notice():
    from clbench_plugins.frozen import Frozen
    from clbench_plugins.lora import NaiveLoRA

    for cls in (Frozen, NaiveLoRA):
        lines = []
        from clbench.methods.registry import run_manager
        from clbench.run.loop import LoopOptions, run_stream
        from clbench.testing import tiny_stream, tiny_train

        run_stream(tiny_model(), tiny_stream(), run_manager(cls()), tiny_train(max_steps_per_epoch=1), 0,
                   LoopOptions(progress=lines.append))
        assert not [ln for ln in lines if "contract" in ln], lines


def test_methods_states_what_a_method_trains(first_l2):
    res = CliRunner().invoke(app, ["methods", "first_l2"])
    assert res.exit_code == 0, res.output
    assert "trains: each task's head on the frozen pre-trained backbone" in res.output
    res = CliRunner().invoke(app, ["methods", "finetune"])
    assert "trains: the pre-trained backbone" in res.output
    res = CliRunner().invoke(app, ["methods", "lora"])
    assert "(the pre-trained backbone stays frozen)" in res.output


def test_the_changelog_has_an_entry_for_the_current_version_and_the_docs_state_the_default():
    log = (ROOT / "docs" / "CONTRACT_CHANGELOG.md").read_text()
    versions = [int(v) for v in re.findall(r"^## Contract (\d+) ", log, flags=re.M)]
    assert versions and versions[0] == clbench.CONTRACT_VERSION == max(versions)
    from clbench.methods.hookspecs import MethodSpec

    doc = " ".join(textwrap.dedent(MethodSpec.param_groups.__doc__).split())
    assert "since the pre-trained backbone is frozen after ``configure_model`` unless the method sets" in doc
    contributing = " ".join((ROOT / "CONTRIBUTING.md").read_text().split())
    assert "the loop freezes the pre-trained backbone" in contributing
