"""The stream registry (clbench.data.registry): every stream is one registered spec, and a new stream is one file
that registers itself: the suite accepts its name, the preflight asks its check and class count, ``build_stream``
builds it with the augmentation its spec names."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from clbench.data import registry, sources
from clbench.data.registry import StreamSpec, register_stream, stream_names, stream_spec
from clbench.data.streams import build_stream
from clbench.data.validation import build_run_stream
from clbench.errors import ClbenchError
from clbench.run.preflight import split_problem, stream_problem
from clbench.suite import load_suite

# a stream in one file: four classes of constant grey levels, its data "present" when a marker file exists
STREAM_FILE = '''
from pathlib import Path

from clbench.data.registry import StreamSpec, register_stream


def build(cfg, seed, with_test):
    import torch

    from clbench.data.streams import tensor_stream

    y = torch.arange(4).repeat_interleave(12)
    x = (y * 60).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 6, 6).contiguous()
    return tensor_stream(cfg, seed, with_test, x, y, test_per_class=2)


def check(cfg):
    if cfg.root and (Path(cfg.root) / "grey.ok").is_file():
        return None
    return f"stream.root: no grey.ok under {cfg.root}; create it"


register_stream(StreamSpec("grey_levels", build, num_classes=4, check=check, augment="rrc_flip"))
'''

SUITE = """
name: grey
seeds: [3]
stream: {name: grey_levels, num_tasks: 2, root: data}
backbone: {name: vit_micro_clbench, image_size: 16, pretrained: false}
methods: [{name: lora}]
"""


@pytest.fixture()
def one_file_stream(tmp_path, monkeypatch):
    (tmp_path / "grey_stream.py").write_text(STREAM_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("grey_stream")
    yield tmp_path
    registry._SPECS.pop("grey_levels", None)
    sys.modules.pop("grey_stream", None)


def test_builtin_streams_are_one_module_each():
    names = set(stream_names())
    assert {"split_cifar100", "mnist5k", "digits", "synthetic", "imagenet_r", "domainnet"} <= names
    files = {p.stem for p in Path(sources.__file__).parent.glob("*.py")} - {"__init__"}
    assert {stream_spec(n).build.__module__.rsplit(".", 1)[-1] for n in names} <= files
    assert stream_spec("imagenet_r").images == "cached" and stream_spec("digits").images == "device"
    assert stream_spec("split_cifar100").augment == "rrc_flip" and stream_spec("mnist5k").augment == "none"


def test_a_stream_registered_in_one_file_runs_through_the_suite(one_file_stream):
    tmp = one_file_stream
    (tmp / "suite.yaml").write_text(textwrap.dedent(SUITE))
    suite = load_suite(tmp / "suite.yaml")
    assert "stream.root: no grey.ok" in stream_problem(suite.stream)  # the preflight asks the stream's own check
    (tmp / "data").mkdir()
    (tmp / "data" / "grey.ok").touch()
    assert stream_problem(suite.stream) is None
    assert "3 tasks do not divide the 4 classes" in split_problem(suite.stream.model_copy(update={"num_tasks": 3}))
    stream = build_run_stream(suite, 3)
    assert [len(t.classes) for t in stream.tasks] == [2, 2] and stream.meta["augment"] == "rrc_flip"
    labels = torch.cat([t.train_y for t in stream.tasks]).unique().tolist()
    assert labels == [0, 1, 2, 3] and len(stream.tasks[0].test_y) == 4  # 2 test images per class
    # its grey level follows the class order drawn from the seed: task 0's classes are the first two in order
    level = {int(y): int(x.flatten()[0]) for x, y in zip(stream.tasks[0].train_x, stream.tasks[0].train_y)}
    assert level == {0: stream.class_order[0] * 60, 1: stream.class_order[1] * 60}


def test_unknown_and_twice_registered_names(one_file_stream, tmp_path):
    (tmp_path / "suite.yaml").write_text(textwrap.dedent(SUITE).replace("grey_levels", "grey_level"))
    with pytest.raises(ClbenchError, match=r"stream.name: unknown stream 'grey_level'; choose from \[.*'grey_levels'"):
        load_suite(tmp_path / "suite.yaml")
    with pytest.raises(ClbenchError, match="unknown stream 'nope'"):
        build_stream(load_suite(tmp_path / "suite.yaml", ["stream.name=synthetic"]).stream.model_copy(
            update={"name": "nope"}), 0)
    with pytest.raises(ClbenchError, match="'grey_levels' is registered twice"):
        register_stream(StreamSpec("grey_levels", lambda cfg, seed, with_test: None, num_classes=4))
