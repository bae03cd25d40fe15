"""The InfLoRA reproduction suites (suites/repro/): they validate, state the official protocol as keys (fixed
class order, seeds, schedule, inputs, statistics passes) and carry reference: blocks whose per-seed numbers agree
with the stated means."""

from __future__ import annotations

from pathlib import Path

import pytest

from clbench.methods.registry import discover
from clbench.run.runner import plan_runs
from clbench.suite import load_suite

REPRO = Path(__file__).resolve().parents[1] / "suites" / "repro"
SUITES = sorted(p.name for p in REPRO.glob("inflora-*.yaml"))  # the InfLoRA configs; SD-LoRA, CL-LoRA, prompts test theirs


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
    assert suite.backbone.normalize == "none"  # official Normalize(0, 1): inputs in [0, 1]
    assert planned[0].params.targets == ["k", "v"] and planned[0].params.stats_data == "augmented"
    assert [r.tolerance for r in suite.reference] == [1.0] and suite.reference[0].method == "inflora"
    if suite.train.optimizer == "adam":
        assert suite.train.schedule == "inflora_cosine" and suite.train.head_lr is None


@pytest.mark.parametrize("name", ["inflora-cifar100-10.yaml", "inflora-imagenet-r-10.yaml"])
def test_reference_means_match_their_per_seed_numbers(name):
    suite = load_suite(REPRO / name)
    [ref] = suite.reference
    assert sorted(ref.per_seed) == suite.seeds == [0, 1, 2, 3, 4]
    for key in ("final/acc", "final/avg_acc"):
        values = [row[key] for row in ref.per_seed.values()]
        assert abs(sum(values) / len(values) - ref.mean[key]) < 0.011  # per-seed values are rounded
    assert "logs/" in ref.source and "@e08b00e" in ref.source


def test_domainnet_suite_is_the_official_optimizer_and_schedule():
    suite = load_suite(REPRO / "inflora-domainnet-5.yaml")
    t = suite.train
    assert (t.optimizer, t.momentum, t.lr, t.head_lr, t.epochs) == ("sgd", 0.9, 5.0e-3, 1.0e-2, 5)
    assert (t.schedule, t.milestones, t.gamma) == ("multistep", [4], 0.1)


@pytest.mark.parametrize("name", ["vit.yaml", "vit-imagenet-r.yaml", "vit-domainnet.yaml"])
def test_comparison_suites_adapt_the_same_maps_at_the_same_rank(name):
    path = REPRO.parent / name
    planned = plan_runs(load_suite(path), path, discover([]), None)
    # the lower reference bounds (finetune, frozen), the prompt methods and the references with no continual
    # training (simplecil; ranpac without first-session adaptation, whose LoRA params then go unused) adapt no
    # weights; every entry that adapts must agree
    def adapts(p) -> bool:
        return hasattr(p.params, "targets") and getattr(p.params, "first_session_adaptation", True)

    adapted = {(p.label, tuple(p.params.targets), p.params.rank) for p in planned if adapts(p)}
    assert {p.info.name for p in planned if not adapts(p)} <= {"finetune", "frozen", "l2p", "dualprompt",
                                                               "codaprompt", "simplecil", "ranpac"}
    assert len({(t, r) for _, t, r in adapted}) == 1, f"{name}: entries differ in targets or rank: {adapted}"
    assert {t for _, t, _ in adapted} == {("k", "v")}


@pytest.mark.parametrize("name", ["prompts-cifar100-10.yaml", "prompts-imagenet-r-10.yaml"])
def test_prompt_repro_suites_run_the_official_prompt_configurations(name):
    suite = load_suite(REPRO / name)
    planned = plan_runs(suite, REPRO / name, discover([]), None)
    assert [p.info.name for p in planned] == ["l2p", "dualprompt", "codaprompt"]
    assert suite.train.lr == 1.0e-3 and suite.train.optimizer == "adam"
    # CODA-Prompt's per-epoch CosineSchedule (lag included), [0, 1] inputs, drop_last, its class-order rule
    assert suite.train.schedule == "inflora_cosine" and suite.train.drop_last
    assert suite.backbone.normalize == "none" and suite.stream.class_order == "coda_prompt"
    assert [r.method for r in suite.reference] == ["l2p", "dualprompt", "codaprompt"]
    assert all(r.source for r in suite.reference)
