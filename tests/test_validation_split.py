"""The validation split (clbench.data.validation): a seeded, class-stratified share of each task's training data held
out, never trained on, evaluated like the test split; a validation run never builds or touches the test split and
logs under val/ only."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from clbench import keys
from clbench.data import validation
from clbench.errors import ClbenchError
from clbench.run.runner import RunOptions, run_suite
from clbench.store.tracking import MlflowTracker, read_runs
from clbench.suite import load_suite
from clbench.testing import tiny_stream, tiny_suite_yaml


def test_held_out_rows_are_stratified_seeded_and_disjoint():
    y = torch.tensor([0] * 20 + [1] * 7 + [2] * 3)
    keep, held = validation.held_out_rows(y, 0.1, seed=5)
    assert set(keep).isdisjoint(held) and sorted([*keep, *held]) == list(range(len(y)))
    per_class = {c: int((y[torch.from_numpy(held)] == c).sum()) for c in (0, 1, 2)}
    assert per_class == {0: 2, 1: 1, 2: 1}  # round(0.1 n), at least 1
    again = validation.held_out_rows(y, 0.1, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip((keep, held), again))
    other = validation.held_out_rows(y, 0.1, seed=6)[1]
    assert not np.array_equal(held, other)
    with pytest.raises(ClbenchError, match="class 3 has 1 training image"):
        validation.held_out_rows(torch.tensor([3, 4, 4]), 0.5, seed=0)


def test_holdout_evaluates_on_unseen_training_images():
    stream = tiny_stream(num_tasks=2, num_classes=4, samples_per_class=10)
    val = validation.holdout(stream, 0.25, seed=1)
    for orig, task in zip(stream.tasks, val.tasks):
        flat = lambda x: {bytes(r.numpy().tobytes()) for r in x}  # noqa: E731
        trained, held, pool = flat(task.train_x), flat(task.test_x), flat(orig.train_x)
        assert held <= pool and trained <= pool and not held & trained  # held out of training, never trained
        assert len(task.test_y) == 2 * 3 and len(task.train_y) == 2 * 7  # round(0.25 * 10) = 3 per class
        assert sorted(set(task.test_y.tolist())) == list(task.classes)


def test_center_crop_matches_the_test_preprocessing():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).reshape(2, 1, 6, 6)
    crop = validation.CenterCropped(x, 4)
    assert crop.shape == (2, 1, 4, 4) and torch.equal(crop[torch.tensor([1])], x[1:, :, 1:5, 1:5])


def test_validation_section_checked_and_hashed_only_for_validation_runs(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(tiny_suite_yaml("h"))
    plain = load_suite(path)
    with_section = load_suite(path, ["validation.fraction=0.2"])
    assert plain.protocol_hash() == with_section.protocol_hash()  # test runs: the section changes nothing
    assert with_section.for_validation().protocol_hash() not in (plain.protocol_hash(),
                                                                 plain.for_validation().protocol_hash())
    assert plain.for_validation().validation.fraction == 0.1 and plain.for_validation().split == "validation"
    shipped = pickle.loads(pickle.dumps(with_section.for_validation()))  # as an executor ships it to a worker
    assert shipped.split == "validation" and shipped.protocol_hash() == with_section.for_validation().protocol_hash()
    for bad in ("0", "1", "1.5", "-0.1"):
        with pytest.raises(ClbenchError, match=rf"--set validation.fraction={bad}: validation.fraction"):
            load_suite(path, [f"validation.fraction={bad}"])


def test_for_split_keys():
    assert keys.for_split(keys.FINAL_FORGETTING, "validation") == "val/forgetting"
    assert keys.for_split(keys.eval_acc_task(3), "validation") == "val/acc/task_03"
    assert keys.for_split(keys.EVAL_ACC, "validation") == keys.for_split(keys.FINAL_ACC, "validation") == "val/acc"
    assert keys.for_split(keys.SPECTRA_TOP1, "validation") == keys.SPECTRA_TOP1
    assert keys.for_split(keys.FINAL_ACC, "test") == keys.FINAL_ACC


class Untouchable:
    """A test split that fails the test if anything reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was touched ({name})")

    def __len__(self):
        raise AssertionError("the test split was touched (len)")

    def __getitem__(self, item):
        raise AssertionError("the test split was touched (getitem)")


def test_validation_run_never_touches_the_test_split_and_logs_under_val(tmp_path, monkeypatch):
    calls = []

    def fake_build(cfg, seed, with_test=True):
        calls.append(with_test)
        stream = tiny_stream(num_tasks=3, num_classes=6, samples_per_class=8, seed=seed)
        for task in stream.tasks:
            task.test_x, task.test_y = Untouchable(), Untouchable()
        return stream

    monkeypatch.setattr(validation, "build_stream", fake_build)
    path = tmp_path / "v.yaml"
    path.write_text(tiny_suite_yaml("v"))
    suite = load_suite(path).for_validation()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    records = run_suite(suite, str(path), RunOptions(methods=["lora"], tracker=MlflowTracker("v", uri),
                                                     checkpoint_dir=str(tmp_path / "ck"),
                                                     progress=lambda s: None))
    assert calls == [False] and records[0].status == "FINISHED"
    [run] = read_runs("v", uri, validation=True)
    assert run.tags[keys.SPLIT] == keys.SPLIT_VALIDATION
    assert {"val/acc", "val/avg_acc", "val/forgetting", "val/bwt", "val/acc_til", "val/acc/task_02"} <= set(
        run.metrics)
    assert not [k for k in run.metrics if k.startswith(("eval/", "final/"))]
    assert records[0].metrics["val/acc"] == pytest.approx(run.metrics["val/acc"])
    assert read_runs("v", uri) == []  # leaderboards and suite figures never see a validation run
    assert Path(tmp_path / "ck").exists()
