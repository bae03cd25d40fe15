"""The reproduction suites (suites/repro/): they validate, name the official fixed class order and seeds, and their
TODO-schema comment block (settings the schema cannot express yet, and the reference numbers) is valid YAML whose
per-seed numbers agree with the stated means."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clbench.registry import discover
from clbench.runner import plan_runs
from clbench.suite import load_suite

REPRO = Path(__file__).resolve().parents[1] / "suites" / "repro"
SUITES = sorted(p.name for p in REPRO.glob("inflora-*.yaml"))  # the InfLoRA configs; SD-LoRA, CL-LoRA, prompts test theirs


def _todo_block(path: Path) -> dict:
    lines = path.read_text().splitlines()
    start = lines.index("# todo_schema:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:] if line.startswith("# ") else line[1:])
    return yaml.safe_load("\n".join(block))["todo_schema"]


def test_the_five_official_configurations_are_there():
    assert SUITES == ["inflora-cifar100-10.yaml", "inflora-domainnet-5.yaml", "inflora-imagenet-r-10.yaml",
                      "inflora-imagenet-r-20.yaml", "inflora-imagenet-r-5.yaml"]


@pytest.mark.parametrize("name", SUITES)
def test_repro_suite_validates_and_is_the_official_protocol(name):
    suite = load_suite(REPRO / name)
    planned = plan_runs(suite, REPRO / name, discover([]), None)
    assert [p.info.name for p in planned] == ["inflora"]  # one entry, run once per seed
    assert suite.stream.shuffle_classes is False and suite.stream.class_order is None  # official fixed order
    assert suite.backbone.name == "vit_base_patch16_224.augreg_in21k" and suite.train.weight_decay == 0.0
    assert suite.train.batch_size == 128 and suite.train.precision == "fp32"
    params = suite.methods[0].params
    assert params["targets"] == ["k", "v"]
    todo = _todo_block(REPRO / name)
    assert todo["backbone"]["normalize"] == {"mean": [0.0] * 3, "std": [1.0] * 3}
    assert todo["reference"]["tolerance"] == 1.0


@pytest.mark.parametrize("name", ["inflora-cifar100-10.yaml", "inflora-imagenet-r-10.yaml"])
def test_reference_means_match_their_per_seed_numbers(name):
    logs = _todo_block(REPRO / name)["reference"]["official_logs"]
    assert sorted(logs["per_seed"]) == load_suite(REPRO / name).seeds == [0, 1, 2, 3, 4]
    for key in ("final/acc", "final/avg_acc"):
        values = [row[key] for row in logs["per_seed"].values()]
        assert abs(sum(values) / len(values) - logs["mean"][key]) < 0.011  # per-seed values are rounded


def test_domainnet_suite_marks_the_official_optimizer_and_memory():
    suite = load_suite(REPRO / "inflora-domainnet-5.yaml")
    assert suite.train.optimizer == "sgd" and suite.train.lr == 5.0e-3 and suite.train.epochs == 5
    todo = _todo_block(REPRO / "inflora-domainnet-5.yaml")
    assert todo["train"] == {"schedule": "multistep", "milestones": [4], "gamma": 0.1, "head_lr": 1.0e-2}
    assert todo["methods.inflora.params"]["memory"] == "gpm"


@pytest.mark.parametrize("name", ["vit.yaml", "vit-imagenet-r.yaml", "vit-domainnet.yaml"])
def test_comparison_suites_adapt_the_same_maps_at_the_same_rank(name):
    path = REPRO.parent / name
    planned = plan_runs(load_suite(path), path, discover([]), None)
    # the lower reference bounds (finetune, frozen) and the prompt methods adapt no weights; every entry that
    # adapts must agree
    adapted = {(p.label, tuple(p.params.targets), p.params.rank) for p in planned if hasattr(p.params, "targets")}
    assert {p.info.name for p in planned if not hasattr(p.params, "targets")} <= {"finetune", "frozen", "l2p",
                                                                                   "dualprompt", "codaprompt"}
    assert len({(t, r) for _, t, r in adapted}) == 1, f"{name}: entries differ in targets or rank: {adapted}"
    assert {t for _, t, _ in adapted} == {("k", "v")}


@pytest.mark.parametrize("name", ["prompts-cifar100-10.yaml", "prompts-imagenet-r-10.yaml"])
def test_prompt_repro_suites_run_the_official_prompt_configurations(name):
    suite = load_suite(REPRO / name)
    planned = plan_runs(suite, REPRO / name, discover([]), None)
    assert [p.info.name for p in planned] == ["l2p", "dualprompt", "codaprompt"]
    assert suite.train.lr == 1.0e-3 and suite.train.optimizer == "adam" and suite.train.schedule == "cosine"
    assert _todo_block(REPRO / name)["reference"]["sources"]
