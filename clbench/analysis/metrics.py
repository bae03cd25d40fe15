"""Pure functions on the accuracy matrix (continual-learning metrics). Accuracies are percentages.

``R[i, j]`` is the accuracy on task j's test set after training task i (j <= i); entries above the
diagonal are NaN. Definitions: docs/METHODS.md section 1 (PILOT/InfLoRA/SD-LoRA code).
"""

from __future__ import annotations

import numpy as np

from clbench import keys


def empty_matrix(num_tasks: int) -> np.ndarray:
    return np.full((num_tasks, num_tasks), np.nan)


def accuracy_after(R: np.ndarray, i: int, sizes: np.ndarray | None = None) -> float:
    """A_i: accuracy over the pooled test samples of tasks 0..i (sample-weighted if sizes are given)."""
    row = R[i, : i + 1]
    if sizes is None:
        return float(np.mean(row))
    w = np.asarray(sizes[: i + 1], dtype=float)
    return float(np.sum(row * w) / np.sum(w))


def average_incremental_accuracy(R: np.ndarray, sizes: np.ndarray | None = None) -> float:
    """(1/T) sum_i A_i."""
    return float(np.mean([accuracy_after(R, i, sizes) for i in range(R.shape[0])]))


def forgetting(R: np.ndarray) -> float:
    """(1/(T-1)) sum_{j<T} [max_{i<T} R[i, j] - R[T, j]] (T = last task); 0.0 for a single task."""
    T = R.shape[0] - 1
    if T == 0:
        return 0.0
    return float(np.mean([np.max(R[j:T, j]) - R[T, j] for j in range(T)]))


def backward_transfer(R: np.ndarray) -> float:
    """(1/(T-1)) sum_{j<T} (R[T, j] - R[j, j]); negative means forgetting; 0.0 for a single task."""
    T = R.shape[0] - 1
    if T == 0:
        return 0.0
    return float(np.mean([R[T, j] - R[j, j] for j in range(T)]))


def per_task_forgetting(R: np.ndarray) -> np.ndarray:
    """Forgetting of each task j < T: max_{i<T} R[i, j] - R[T, j]."""
    T = R.shape[0] - 1
    return np.array([np.max(R[j:T, j]) - R[T, j] for j in range(T)])


def summary(R: np.ndarray, R_til: np.ndarray, sizes: np.ndarray | None = None) -> dict[str, float]:
    """The ``final/*`` metrics of a finished run."""
    T = R.shape[0] - 1
    return {
        keys.FINAL_ACC: accuracy_after(R, T, sizes),
        keys.FINAL_AVG_ACC: average_incremental_accuracy(R, sizes),
        keys.FINAL_FORGETTING: forgetting(R),
        keys.FINAL_BWT: backward_transfer(R),
        keys.FINAL_ACC_TIL: accuracy_after(R_til, T, sizes),
    }
