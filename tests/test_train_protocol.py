"""Trustworthy protocols (issue 16): learning-rate schedules and the head's lr, the suite hash (protocol plus the
data's identity; runtime settings and local paths outside it), the reproduction suites' reference: blocks in the
leaderboard, input normalisation, and the augmented statistics loader."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from clbench import keys
from clbench.analysis import leaderboard as lb
from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.run.loop import (
    Loop,
    LoopOptions,
    inflora_cosine_factor,
    make_task_optimizer,
    multistep_factor,
    task_context,
    train_task,
)
from clbench.suite import TrainConfig, load_suite
from clbench.testing import tiny_model, tiny_stream

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "suites" / "quickstart.yaml"
REPRO = ROOT / "suites" / "repro"


# -- schedules ------------------------------------------------------------------------------------------------

def _optimizer(cfg: TrainConfig, steps_per_epoch: int = 3):
    model = tiny_model()
    stream = tiny_stream(num_tasks=2)
    model.add_head(len(stream.tasks[0].classes))
    ctx = task_context(Loop(model, stream, cfg, 0), 0)
    ctx = type(ctx)(**{**ctx.__dict__, "steps_per_epoch": steps_per_epoch})
    groups = [{"params": [p for n, p in model.backbone.named_parameters() if n.endswith("qkv.weight")],
               "name": "adapters"}]
    return make_task_optimizer(model, model.heads[0], groups, cfg, ctx)


def _lrs_per_epoch(cfg: TrainConfig, steps_per_epoch: int = 3) -> list[list[float]]:
    """Each group's lr in each epoch, stepping the schedule as the loop does."""
    optimizer, schedule = _optimizer(cfg, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs):
        out.append([g["lr"] for g in optimizer.param_groups])
        for _ in range(steps_per_epoch):
            if schedule is not None:
                schedule.step()
        if schedule is not None:
            schedule.epoch_end()
    return out


def _official_cosine(e: int, K: int) -> float:
    """The official CosineSchedule's factor in epoch e: [1, 1, f(1), ..., f(K-2)] (the constructor's step and
    the reset of last_epoch make the first per-epoch step apply f(0) again)."""
    return math.cos(99 * math.pi * max(e - 1, 0) / (200 * (K - 1)))


def test_inflora_cosine_is_the_official_per_epoch_quarter_cosine_with_its_lag():
    K, lr = 20, 5e-4
    lrs = _lrs_per_epoch(TrainConfig(epochs=K, lr=lr, schedule="inflora_cosine"))
    expected = [lr * _official_cosine(e, K) for e in range(K)]
    assert [row[0] for row in lrs] == pytest.approx(expected, rel=1e-12, abs=0)
    assert [row[1] for row in lrs] == pytest.approx(expected, rel=1e-12, abs=0)  # the head follows it
    assert lrs[0][0] == lrs[1][0] == lr  # the lag: epochs 0 and 1 both at cos(0)
    assert lrs[-1][0] == pytest.approx(lr * math.cos(99 * math.pi * (K - 2) / (200 * (K - 1))))
    K5 = [inflora_cosine_factor(e, 5) for e in range(5)]
    assert K5 == pytest.approx([1, 1, 0.925, 0.713, 0.394], abs=5e-4)  # issue 31's numbers for K = 5
    assert inflora_cosine_factor(0, 1) == 1.0  # one epoch: the base lr (the official K == 1 divides by zero)


def test_multistep_and_head_lr():
    cfg = TrainConfig(epochs=5, lr=5e-3, head_lr=1e-2, optimizer="sgd", schedule="multistep", milestones=[4],
                      gamma=0.1)
    lrs = _lrs_per_epoch(cfg)
    assert [row[0] for row in lrs] == pytest.approx([5e-3] * 4 + [5e-4], rel=1e-12)  # adapters
    assert [row[1] for row in lrs] == pytest.approx([1e-2] * 4 + [1e-3], rel=1e-12)  # head at head_lr
    assert multistep_factor(7, [2, 5], 0.5) == 0.25 and multistep_factor(1, [2, 5], 0.5) == 1.0
    optimizer, schedule = _optimizer(TrainConfig(lr=1e-3))
    assert schedule is None and [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3]  # head_lr unset: lr
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(schedule="multistep", milestones=[4, 2])


def test_per_step_cosine_reaches_zero_at_the_last_step():
    lrs = _lrs_per_epoch(TrainConfig(epochs=2, lr=1.0, schedule="cosine"), steps_per_epoch=2)
    assert [row[0] for row in lrs] == pytest.approx([1.0, 0.5])  # epoch starts: steps 0 and 2 of 4


def test_train_task_reports_the_lr_of_each_epoch():
    from clbench_plugins.lora import NaiveLoRA

    from clbench.methods.hookcheck import checked_hooks
    from clbench.methods.registry import run_manager

    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, schedule="inflora_cosine", max_steps_per_epoch=1)
    model, stream = tiny_model(), tiny_stream(num_tasks=2)
    pm = run_manager(NaiveLoRA({"rank": 2}))
    ctx = task_context(Loop(model, stream, cfg, 0), 0)
    pm.hook.configure_model(model=model, ctx=ctx)
    model.add_head(len(stream.tasks[0].classes))
    optimizer, schedule = make_task_optimizer(model, model.heads[0], pm.hook.param_groups(model=model, ctx=ctx),
                                              cfg, ctx)
    loop = Loop(model, stream, cfg, 0, LoopOptions(clock=lambda: 0.0), checked_hooks(pm))
    trained = train_task(loop, ctx, optimizer, schedule)
    assert trained.epoch_lrs == pytest.approx([1e-2 * _official_cosine(e, 3) for e in range(3)], rel=1e-12)


def test_quickstart_logs_train_lr_per_epoch(tmp_path, monkeypatch):
    """`--method lora --set train.schedule=inflora_cosine --set train.epochs=5` on the quickstart: a real run
    through the loop; train/lr read back from MLflow at step task * epochs + epoch is the official CosineSchedule,
    lag included: [1, 1, .925, .713, .394] x lr in every task (random backbone, two steps per epoch)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", str(QUICKSTART), "--method", "lora", "--checkpoint-dir",
                                      str(tmp_path / "ck"), "--set", "train.schedule=inflora_cosine",
                                      "--set", "train.epochs=5",
                                      "--set", "backbone.pretrained=false", "--set", "train.max_steps_per_epoch=2",
                                      "--set", "runtime.device=cpu"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("quickstart")
    [child] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(keys.ROLE) == keys.ROLE_CHILD]
    history = sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, keys.TRAIN_LR))
    K, T, lr = 5, 5, 5e-3
    assert [s for s, _ in history] == list(range(T * K))
    assert [v for _, v in history] == pytest.approx([lr * f for _ in range(T) for f in (1, 1, .925, .713, .394)],
                                                     abs=lr * 5e-4)
    assert [v for _, v in history] == pytest.approx([lr * _official_cosine(e, K) for _ in range(T) for e in range(K)],
                                                     rel=1e-12)
    tags = child.data.tags
    assert tags[keys.runtime_tag("device")] == "cpu" and tags[keys.runtime_tag("cpu_threads")] == "1"
    assert tags[keys.PRECISION] == "fp32"


# -- the suite hash -------------------------------------------------------------------------------------------

RUNTIME_SETS = ["runtime.log_every=7", "runtime.cpu_threads=2", "runtime.device=cpu", "runtime.eval_batch_size=100",
                "runtime.deterministic=true"]


def test_hash_ignores_runtime_but_not_protocol():
    base = load_suite(QUICKSTART).protocol_hash()
    assert load_suite(QUICKSTART, RUNTIME_SETS).protocol_hash() == base
    assert load_suite(QUICKSTART, ["runtime.compile=true"]).protocol_hash() == base
    assert load_suite(QUICKSTART, ["train.lr=0.001"]).protocol_hash() != base
    assert load_suite(QUICKSTART, ["train.precision=bf16"]).protocol_hash() != base
    assert load_suite(QUICKSTART, ["backbone.normalize=none"]).protocol_hash() != base
    assert load_suite(QUICKSTART, ["stream.num_tasks=10"]).protocol_hash() != base


def test_dry_run_prints_the_same_hash_under_runtime_settings():
    def hash_of(*sets: str) -> str:
        args = ["run", str(QUICKSTART), "--dry-run"] + [x for s in sets for x in ("--set", s)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        [line] = [ln for ln in result.output.splitlines() if " suite hash " in ln]
        return line.split(" suite hash ")[1].split()[0]

    base = hash_of()
    assert len(base) == 12 and hash_of(*RUNTIME_SETS) == base and hash_of("train.lr=0.001") != base


def test_hash_never_sees_a_local_path(tmp_path):
    """The same suite in two folders, with its data root and weights file at different places (same content)."""
    weights = tmp_path / "w.pt"
    torch.save(tiny_model().backbone.state_dict(), weights)
    hashes = []
    for where in ("a", "b/c"):
        folder = tmp_path / where
        (folder / "data").mkdir(parents=True)
        shutil.copy(weights, folder / "weights.pt")
        text = QUICKSTART.read_text().replace(
            "backbone: {name: vit_tiny_clbench, image_size: 16, pretrained: true}",
            "backbone: {name: vit_tiny_clbench, image_size: 16, pretrained: true, checkpoint: weights.pt}")
        text = text.replace("stream: {name: mnist5k, num_tasks: 5}",
                            f"stream: {{name: mnist5k, num_tasks: 5, root: {folder / 'data'}}}")
        (folder / "s.yaml").write_text(text)
        hashes.append(load_suite(folder / "s.yaml").protocol_hash())
    assert hashes[0] == hashes[1]
    torch.save({k: v + 1 for k, v in tiny_model().backbone.state_dict().items()}, tmp_path / "b/c/weights.pt")
    assert load_suite(tmp_path / "b/c/s.yaml").protocol_hash() != hashes[0]  # other weights, other protocol


@pytest.mark.parametrize("key,value", [("device", "cpu"), ("log_every", 5), ("cpu_threads", 1),
                                       ("eval_batch_size", 64), ("compile", "false")])
def test_runtime_keys_under_train_name_their_new_place(tmp_path, key, value):
    data = yaml.safe_load(QUICKSTART.read_text())
    data["train"][key] = value
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ClbenchError) as err:
        load_suite(tmp_path / "old.yaml")
    assert f"train.{key} has moved to runtime.{key}" in str(err.value) and "\n" not in str(err.value)
    data["train"].pop(key)
    data["methods"][0]["train"] = {key: value}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ClbenchError, match=f"methods.0.train.{key} has moved to runtime.{key}"):
        load_suite(tmp_path / "old.yaml")


def test_every_suite_uses_the_runtime_section():
    from clbench.suite import suite_files

    paths = [*ROOT.glob("suites/*.yaml"), *REPRO.glob("*.yaml")]
    members = {member for path in paths for member in suite_files(path)}  # a group file stands for its suites
    assert len(members) > 10
    for path in sorted(members):
        load_suite(path)  # an old train: key would raise


# -- reproduction suites ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.name for p in REPRO.glob("*.yaml")))
def test_repro_suite_dry_run_and_reference(name):
    result = CliRunner().invoke(app, ["run", str(REPRO / name), "--dry-run"])
    assert result.exit_code == 0, result.output
    suite = load_suite(REPRO / name)
    assert suite.reference and all(r.method in [m.display for m in suite.methods] for r in suite.reference)
    assert all(r.tolerance == 1.0 and r.source for r in suite.reference)


def test_imagenet_r_repro_suites_use_the_shipped_split():
    """Their hash covers the shipped split's checksum, the one the stream logs as clbench.stream.split_sha256
    (clbench.data.streams.image_stream: split.sha256 of the pinned split)."""
    from clbench.data.datasets.splitfiles import pinned_split, pinned_sums

    sha = pinned_split("imagenet_r").sha256
    assert sha == pinned_sums()["imagenet_r_split.tsv.gz"]
    for path in REPRO.glob("*imagenet-r*.yaml"):
        suite = load_suite(path)
        if suite.stream.name == "imagenet_r":
            assert suite.protocol_identity()["splits"]["imagenet_r_split.tsv.gz"] == sha


def _reference_store(uri: str, artifacts: Path, finals: dict[int, tuple[float, float]]) -> None:
    """Child runs of suites/repro/inflora-cifar100-10.yaml as the runner tags them, with given final numbers."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    suite = load_suite(REPRO / "inflora-cifar100-10.yaml")
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(suite.tracking.experiment, artifact_location=artifacts.as_uri())
    ref = json.dumps([r.model_dump(mode="json") for r in suite.reference])
    for seed, (acc, avg) in finals.items():
        tags = {keys.SUITE: suite.name, keys.SUITE_HASH: suite.protocol_hash(), keys.METHOD: "inflora",
                keys.METHOD_NAME: "inflora", keys.SEED: str(seed), keys.ROLE: keys.ROLE_CHILD, keys.REFERENCE: ref,
                keys.runtime_tag("device"): "auto", keys.PRECISION: "fp32"}
        run = client.create_run(exp, start_time=1_800_000_000_000 + seed, run_name=f"inflora-s{seed}", tags=tags)
        client.log_batch(run.info.run_id, metrics=[Metric(keys.FINAL_ACC, acc, 0, 9),
                                                   Metric(keys.FINAL_AVG_ACC, avg, 0, 9)])
        client.set_terminated(run.info.run_id, "FINISHED")


def test_leaderboard_shows_reference_next_to_measured_mean(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # measured: final/acc mean 85.0 (1.33 below 86.33: outside 1 point), avg_acc mean 91.0 (0.18 below: within)
    _reference_store(uri, tmp_path / "art", {0: (84.0, 90.5), 1: (86.0, 91.5)})
    [group] = lb.build("repro-inflora-cifar100-10", uri)
    refs = {r.metric: r for r in group.references}
    assert set(refs) == {keys.FINAL_ACC, keys.FINAL_AVG_ACC}
    acc, avg = refs[keys.FINAL_ACC], refs[keys.FINAL_AVG_ACC]
    assert acc.reference == 86.33 and acc.measured == pytest.approx(85.0) and acc.n == 2
    assert acc.diff == pytest.approx(-1.33) and acc.within is False and acc.tolerance == 1.0
    assert avg.reference == 91.18 and avg.diff == pytest.approx(-0.18) and avg.within is True
    assert [(p["seed"], p["reference"]) for p in acc.per_seed] == [(0, 86.34), (1, 84.92), (2, 86.88),
                                                                   (3, 86.82), (4, 86.67)]
    assert acc.per_seed[0]["diff"] == pytest.approx(84.0 - 86.34) and acc.per_seed[1]["diff"] == pytest.approx(1.08)
    assert acc.per_seed[2]["measured"] is None and acc.per_seed[2]["diff"] is None
    assert "logs/cifar100/10_10_sip" in acc.source
    text = lb.render([group], "table")
    assert "reference inflora final/acc: published 86.33 vs measured 85.00 (n 2), diff -1.33: NOT within ±1" in text
    assert "reference inflora final/avg_acc: published 91.18 vs measured 91.00 (n 2), diff -0.18: within ±1" in text
    assert "precision fp32" in text and "runtime device=auto" in text
    from clbench.analysis.report import render_html

    html = render_html([group])
    assert "NOT within ±1" in html and "86.33" in html and "-1.33" in html
    assert json.loads(lb.render([group], "json"))["groups"][0]["references"][0]["reference"] == 86.33
    [line] = csv.DictReader(io.StringIO(lb.render([group], "csv")))  # the CSV carries the same values
    assert line["final/acc_published"] == "86.33" and float(line["final/acc_published_diff"]) == pytest.approx(-1.33)
    assert line["final/acc_published_within"] == "false" and line["final/avg_acc_published_within"] == "true"
    assert line["final/forgetting_published"] == "" and line["published_tolerance"] == "1.0"
    assert line["published_source"] == acc.source


def test_reference_block_is_checked():
    from pydantic import ValidationError

    from clbench.suite import Reference

    with pytest.raises(ValidationError, match="not the mean of per_seed"):
        Reference(source="x", per_seed={0: {"final/acc": 1.0}, 1: {"final/acc": 3.0}}, mean={"final/acc": 2.5})
    assert Reference(source="x", per_seed={0: {"final/acc": 1.0}, 1: {"final/acc": 3.0}}).mean == {"final/acc": 2.0}
    data = yaml.safe_load((REPRO / "inflora-cifar100-10.yaml").read_text())
    data["reference"][0]["method"] = "lora"
    with pytest.raises(ValidationError, match="not a method label"):
        from clbench.suite import Suite

        Suite.model_validate(data)


# -- inputs and the statistics loader ---------------------------------------------------------------------------

def test_normalize_none_feeds_unit_range_inputs():
    from clbench.model.backbones import Arch, build_model

    x = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    plain = build_model("vit_micro_clbench", 16, pretrained=False, checkpoint=None,
                        arch=Arch(normalize="none"))
    timm = build_model("vit_micro_clbench", 16, pretrained=False, checkpoint=None)
    assert torch.equal(plain.preprocess(x), x.float() / 255)
    assert torch.allclose(timm.preprocess(x), (x.float() / 255 - 0.5) / 0.5)


def test_loader_gives_augmented_batches_on_request():
    from clbench.data.augment import AUGMENTS

    stream = tiny_stream(num_tasks=2)
    stream.augment = AUGMENTS["rrc_flip"]
    model = tiny_model()
    cfg = TrainConfig(batch_size=8)
    ctx = task_context(Loop(model, stream, cfg, 0), 0)
    plain = torch.cat([x for x, _ in ctx.loader()])
    again = torch.cat([x for x, _ in ctx.loader()])
    first = torch.cat([x for x, _ in ctx.loader(augmented=True)])
    second = torch.cat([x for x, _ in ctx.loader(augmented=True)])
    assert torch.equal(plain, again) and not torch.equal(first, plain) and not torch.equal(first, second)
    ctx2 = task_context(Loop(model, stream, cfg, 0), 0)
    assert torch.equal(torch.cat([x for x, _ in ctx2.loader(augmented=True)]), first)  # seeded: a rerun repeats
    labels = torch.cat([y for _, y in ctx.loader(augmented=True)])
    assert torch.equal(labels, torch.cat([y for _, y in ctx.loader()]))  # same images, same order, augmented


def test_inflora_collects_statistics_on_augmented_data_by_default():
    from clbench_plugins.inflora import InfLoRA

    assert InfLoRA().params.stats_data == "augmented"
    seen = []

    class Ctx:
        task, autocast = 0, None

        @staticmethod
        def loader(**kw):
            seen.append(kw)
            return iter(())

    method = InfLoRA({"rank": 2})
    method.configure_model(tiny_model(), Ctx)
    with pytest.raises(ClbenchError):  # no data: but the request is what matters here
        method.collect(tiny_model(), Ctx)
    assert seen[-1]["augmented"] is True
    method = InfLoRA({"rank": 2, "stats_data": "plain"})
    method.configure_model(tiny_model(), Ctx)
    with pytest.raises(ClbenchError):
        method.collect(tiny_model(), Ctx)
    assert seen[-1]["augmented"] is False
