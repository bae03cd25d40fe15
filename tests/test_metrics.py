"""Metrics against hand-computed accuracy matrices, edge cases included."""

import numpy as np
import pytest

from clbench.analysis.metrics import (
    accuracy_after,
    average_incremental_accuracy,
    backward_transfer,
    empty_matrix,
    forgetting,
    per_task_forgetting,
    summary,
)

NAN = np.nan
R3 = np.array([[90.0, NAN, NAN],
               [70.0, 80.0, NAN],
               [60.0, 75.0, 85.0]])


def test_hand_computed_three_tasks():
    assert accuracy_after(R3, 0) == 90.0
    assert accuracy_after(R3, 1) == 75.0
    assert accuracy_after(R3, 2) == pytest.approx((60 + 75 + 85) / 3)
    assert average_incremental_accuracy(R3) == pytest.approx((90 + 75 + 220 / 3) / 3)
    # task 0: max(90, 70) - 60 = 30; task 1: 80 - 75 = 5
    assert forgetting(R3) == pytest.approx(17.5)
    assert per_task_forgetting(R3).tolist() == [30.0, 5.0]
    # (60 - 90 + 75 - 80) / 2
    assert backward_transfer(R3) == pytest.approx(-17.5)


def test_forgetting_uses_max_over_earlier_rows_not_diagonal():
    R = np.array([[50.0, NAN, NAN], [80.0, 70.0, NAN], [40.0, 70.0, 90.0]])
    assert forgetting(R) == pytest.approx(((80 - 40) + (70 - 70)) / 2)
    assert backward_transfer(R) == pytest.approx(((40 - 50) + 0) / 2)


def test_sample_weighted_accuracy():
    sizes = np.array([100, 300, 100])
    assert accuracy_after(R3, 1, sizes) == pytest.approx((70 * 100 + 80 * 300) / 400)


def test_single_task():
    R = np.array([[42.0]])
    s = summary(R, R)
    assert s["final/acc"] == 42.0 and s["final/avg_acc"] == 42.0
    assert s["final/forgetting"] == 0.0 and s["final/bwt"] == 0.0


def test_task_at_chance_and_positive_transfer():
    R = np.array([[50.0, NAN], [55.0, 50.0]])  # a task at chance (2 classes) that improves later
    assert forgetting(R) == pytest.approx(-5.0)
    assert backward_transfer(R) == pytest.approx(5.0)


def test_empty_matrix_is_nan_above_diagonal():
    R = empty_matrix(3)
    assert np.isnan(R).all() and R.shape == (3, 3)
