"""The suite schema: valid suites, overrides, relative paths, and malformed suites with one clear line."""

import textwrap

import pytest

from clbench.errors import ClbenchError
from clbench.suite import load_suite

GOOD = """
name: s
seeds: [0, 1]
stream: {name: synthetic, num_tasks: 2, num_classes: 4}
backbone: {name: vit_micro_clbench, image_size: 16, pretrained: false, checkpoint: weights/w.pt}
train: {epochs: 2, batch_size: 8, lr: 1.0e-3}
methods:
  - {name: lora, params: {rank: 2}}
  - {name: lora, label: inclora, params: {rank: 2, fresh_per_task: true}, train: {lr: 0.01}}
plugins_dir: myplugins
"""


def _write(tmp_path, text, name="suite.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_good_suite_and_relative_paths(tmp_path):
    s = load_suite(_write(tmp_path, GOOD))
    assert s.seeds == [0, 1] and s.methods[1].display == "inclora"
    assert s.backbone.checkpoint == str((tmp_path / "weights" / "w.pt").resolve())
    assert s.plugins_dir == str((tmp_path / "myplugins").resolve())
    assert s.train_for(s.methods[1]).lr == 0.01 and s.train_for(s.methods[0]).lr == 1e-3


def test_overrides(tmp_path):
    p = _write(tmp_path, GOOD)
    s = load_suite(p, ["train.epochs=5", "methods.inclora.params.rank=6", "methods.0.params.rank=3",
                       "seeds=[7]", "stream.class_order=[3, 2, 1, 0]"])
    assert s.train.epochs == 5 and s.methods[1].params["rank"] == 6 and s.methods[0].params["rank"] == 3
    assert s.seeds == [7] and s.stream.class_order == [3, 2, 1, 0]


def test_protocol_hash_ignores_methods_but_not_training(tmp_path):
    p = _write(tmp_path, GOOD)
    base = load_suite(p).protocol_hash()
    assert load_suite(p, ["methods.0.params.rank=9"]).protocol_hash() == base
    assert load_suite(p, ["train.lr=0.5"]).protocol_hash() != base


BAD = [
    ("name: [unclosed", "line 1"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    (GOOD.replace("seeds: [0, 1]", "seeds: [0, 1]\nsedes: [2]"), "sedes: unknown key"),
    (GOOD.replace("epochs: 2", "epochs: two"), "train.epochs"),
    (GOOD.replace("epochs: 2", "epochs: 0"), "train.epochs"),
    (GOOD.replace("lr: 1.0e-3", "lr: -1"), "train.lr"),
    (GOOD.replace("name: synthetic", "name: imagenet_q"), "unknown stream 'imagenet_q'"),
    (GOOD.replace("lr: 1.0e-3}", "lr: 1.0e-3, optimizer: lbfgs}"), "train.optimizer"),
    (GOOD.replace("{rank: 2}}\n", "{rank: 2}, traiin: {}}\n", 1), "methods.0.traiin: unknown key"),
    (GOOD.replace("train: {lr: 0.01}", "train: {lr: zero}"), "methods.1.train.lr"),
    (GOOD.replace("label: inclora", "label: lora"), "duplicate method label"),
    (GOOD.replace("methods:\n  - {name: lora, params: {rank: 2}}\n  - {name: lora, label: inclora, params: "
                  "{rank: 2, fresh_per_task: true}, train: {lr: 0.01}}\n", "methods: []\n"), "methods"),
    (GOOD.replace("image_size: 16", "image_size: 4"), "backbone.image_size"),
    (GOOD.replace("name: s\n", ""), "name: Field required"),
    (GOOD.replace("lr: 1.0e-3}", "lr: 1.0e-3, device: gpu}"), "train.device"),
]


@pytest.mark.parametrize("text,fragment", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_malformed_suite_gives_one_line(tmp_path, text, fragment):
    p = _write(tmp_path, text)
    with pytest.raises(ClbenchError) as err:
        load_suite(p)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(str(p)), msg
    assert fragment in msg, msg


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ClbenchError, match="expected key.path=value"):
        load_suite(_write(tmp_path, GOOD), ["train.epochs"])
    with pytest.raises(ClbenchError, match="no list entry 'nosuch'"):
        load_suite(_write(tmp_path, GOOD), ["methods.nosuch.params.rank=2"])
    with pytest.raises(ClbenchError, match="suite file not found"):
        load_suite(tmp_path / "missing.yaml")
