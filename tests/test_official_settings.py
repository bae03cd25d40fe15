"""Official-protocol settings of issue 31: the named class-order rules, drop_last, the crop scale, PILOT's test
transform and head initialisation, and that suites which do not use them keep their hash."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from clbench.data.augment import resize_center_crop
from clbench.data.batching import Draw, batches
from clbench.data.streams import class_order_for
from clbench.errors import ClbenchError
from clbench.run.loop import init_head_kaiming_zero
from clbench.suite import load_suite
from clbench.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_coda_prompt_order_shuffles_with_python_random_only_for_positive_seeds():
    assert class_order_for(100, 0, True, "coda_prompt", "split_cifar100") == list(range(100))
    for seed in (1, 2, 4):
        expected = list(range(100))
        random.seed(seed)  # CODA-Prompt's trainer.py, literally
        random.shuffle(expected)
        assert class_order_for(100, seed, True, "coda_prompt", "split_cifar100") == expected
    # numpy's permutation (clbench's shuffle_classes) is another order
    assert class_order_for(100, 1, True, None, "split_cifar100") != class_order_for(100, 1, True, "coda_prompt",
                                                                                     "split_cifar100")
    with pytest.raises(ClbenchError, match="coda_prompt"):
        class_order_for(345, 1, True, "coda_prompt", "domainnet")


def test_coda_prompt_imagenet_r_ids_are_the_split_yaml_targets():
    from clbench.data.datasets.splitfiles import class_list, read_pinned

    ours = class_list("imagenet_r")
    theirs = read_pinned("coda_prompt_imagenet_r_targets.txt").decode().split()
    order = class_order_for(200, 0, True, "coda_prompt", "imagenet_r")  # seed 0: official targets 0, 1, 2, ...
    assert [ours[c] for c in order] == theirs and order != list(range(200))
    shuffled = list(range(200))
    random.Random(3).shuffle(shuffled)
    assert [ours[c] for c in class_order_for(200, 3, True, "coda_prompt", "imagenet_r")] == [theirs[k] for k in
                                                                                             shuffled]


def test_pilot_order_is_np_random_seed_permutation():
    np.random.seed(1993)
    assert class_order_for(100, 1993, False, "pilot", "split_cifar100") == np.random.permutation(100).tolist()


def test_drop_last_leaves_out_the_partial_batch():
    model = tiny_model()
    x, y = torch.zeros(10, 1, 16, 16, dtype=torch.uint8), torch.arange(10)
    sizes = lambda **kw: [len(b) for _, b in batches(x, y, 4, torch.device("cpu"), model, Draw(**kw))]  # noqa: E731
    assert sizes() == [4, 4, 2] and sizes(drop_last=True) == [4, 4]
    assert [len(b) for _, b in batches(x[:3], y[:3], 4, torch.device("cpu"), model, Draw(drop_last=True))] == []


def test_kaiming_zero_head_is_pilots_simple_linear():
    head = torch.nn.Linear(768, 10)
    torch.manual_seed(0)
    init_head_kaiming_zero(head)
    assert torch.all(head.bias == 0)
    bound = (3 / 768) ** 0.5  # kaiming_uniform_ with gain 1 (nonlinearity='linear'): U(-sqrt(3/fan_in), ...)
    assert head.weight.abs().max() <= bound and head.weight.abs().max() > 0.9 * bound
    assert head.weight.abs().max() > 1.5 / 768 ** 0.5  # wider than nn.Linear's default U(-1/sqrt(fan_in), ...)


def test_resize_center_crop_takes_the_central_seven_eighths():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[..., :2, :] = 255  # a border band of 2 rows: outside the central 28 x 28
    out = resize_center_crop(x, 224)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    assert out[..., 8:, :].max() < 0.05  # the band is cropped away (only bicubic ringing reaches in)
    x[..., 16, 16] = 255
    assert resize_center_crop(x, 224)[0, 0, 112 - 4:112 + 4, 112 - 4:112 + 4].max() > 0.5  # the centre stays


def test_new_keys_at_their_defaults_keep_the_hash_and_change_it_when_set():
    path = ROOT / "suites" / "quickstart.yaml"
    base = load_suite(path)
    assert "drop_last" not in base.protocol_identity()["train"]
    assert "crop_scale" not in base.protocol_identity()["stream"]
    for override in ("train.drop_last=true", "train.head_init=kaiming_zero", "stream.crop_scale=[0.05,1.0]",
                     "stream.class_order=pilot"):
        assert load_suite(path, [override]).protocol_hash() != base.protocol_hash(), override
    with pytest.raises(ClbenchError, match="crop_scale"):
        load_suite(path, ["stream.crop_scale=[0.5,0.2]"])
    with pytest.raises(ClbenchError, match="class_order"):
        load_suite(path, ["stream.class_order=official"])


def test_protocol_command_prints_the_loops_own_protocol():
    """`clbench protocol`: lr per epoch and group (the lagged official cosine), the official class order of each
    seed, normalisation, drop_last, the crop scale and the test transform."""
    from typer.testing import CliRunner

    from clbench.cli import app

    result = CliRunner().invoke(app, ["protocol", str(ROOT / "suites" / "repro" / "sdlora-cifar100.yaml"),
                                      "--tasks", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    np.random.seed(1994)
    first = np.random.permutation(100)[:10].tolist()
    assert f"seed 1994: {' '.join(map(str, first))} ..." in out  # logs/C100.log's first task
    assert "SGD: lr 0.008, momentum 0.9" in out and "inputs in [0, 1]" in out and "head init   kaiming_zero" in out
    assert "scale [0.05, 1]" in out and "Resize(256, bicubic) + CenterCrop(224)" in out
    result = CliRunner().invoke(app, ["protocol", str(ROOT / "suites" / "quickstart.yaml"), "--set",
                                      "train.schedule=inflora_cosine", "--set", "train.epochs=5",
                                      "--set", "train.drop_last=true"])
    assert result.exit_code == 0, result.output
    assert "lr[adapters] per epoch: 0.005, 0.005, 0.004627, 0.003563, 0.001968" in result.output
    assert "drop_last True" in result.output
    bad = CliRunner().invoke(app, ["protocol", str(ROOT / "suites" / "quickstart.yaml"), "--method-index", "9"])
    assert bad.exit_code == 1 and "--method-index 9" in bad.output
