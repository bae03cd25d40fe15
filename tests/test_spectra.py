"""Factor-based spectra against dense SVDs, the imbalance indices on hand-made spectra, overlaps."""

import math

import numpy as np
import pytest
import torch

from clbench.model.lora import LowRank
from clbench.model.spectra import (
    SpectraTracker,
    eff_rank,
    extend_basis,
    input_basis,
    overlap,
    singular_values,
    stable_rank,
    top1_share,
)


def _rand(d_out, d_in, r, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)
    if rank is not None and rank < r:  # rank-deficient: the last columns repeat earlier ones
        B[:, rank:] = B[:, :1] * 0.5
        A[rank:, :] = 0.0
    return LowRank(B, A)


@pytest.mark.parametrize("d_out,d_in,r,rank", [(64, 48, 4, None), (48, 96, 10, None), (30, 30, 8, 3),
                                               (96, 40, 16, None), (20, 50, 6, 1), (8, 12, 10, None)])
def test_factor_spectrum_equals_dense(d_out, d_in, r, rank):
    u = _rand(d_out, d_in, r, seed=d_out + r, rank=rank)
    ours = singular_values(u)
    dense = torch.linalg.svdvals(u.dense().double())
    k = min(len(ours), len(dense))
    top = float(dense[0])
    assert torch.allclose(ours[:k], dense[:k], rtol=1e-4, atol=1e-4 * top)
    if rank is not None:
        assert (ours[rank:] < 1e-8 * top).all()


def test_indices_on_hand_made_spectra():
    flat = np.ones(8)
    assert top1_share(flat) == pytest.approx(1 / 8)
    assert eff_rank(flat) == pytest.approx(8)
    assert stable_rank(flat) == pytest.approx(8)
    spike = np.array([3.0, 0, 0, 0])
    assert top1_share(spike) == pytest.approx(1.0)
    assert eff_rank(spike) == pytest.approx(1.0)
    assert stable_rank(spike) == pytest.approx(1.0)
    two = np.array([1.0, 1.0, 0.0])
    assert eff_rank(two) == pytest.approx(2.0)
    assert math.isnan(top1_share(np.zeros(3)))


def test_overlap_self_one_orthogonal_zero():
    Q, _ = torch.linalg.qr(torch.randn(20, 6, dtype=torch.float64))
    U, V = Q[:, :3], Q[:, 3:]
    assert overlap(U, U) == pytest.approx(1.0)
    assert overlap(U, V) == pytest.approx(0.0, abs=1e-12)
    assert overlap(U[:, :2], Q) == pytest.approx(1.0)  # contained in a larger space
    half = torch.cat([U[:, :1], V[:, :1]], 1)
    assert overlap(half, U) == pytest.approx(0.5)


def test_input_basis_spans_the_row_space():
    u = _rand(10, 15, 4, seed=3, rank=2)
    Q = input_basis(u)
    assert Q.shape == (15, 2)
    W = u.dense().double()
    assert torch.allclose(W @ Q @ Q.t(), W, atol=1e-8)


def test_tracker_overlap_of_orthogonal_then_repeated_updates():
    Q, _ = torch.linalg.qr(torch.randn(16, 8, dtype=torch.float64))
    first = LowRank(torch.randn(12, 4, dtype=torch.float64), Q[:, :4].t())
    second = LowRank(torch.randn(12, 4, dtype=torch.float64), Q[:, 4:].t())
    tr = SpectraTracker()
    m0 = tr.add_task({"l": first})
    m1 = tr.add_task({"l": second})
    m2 = tr.add_task({"l": first})
    assert "spectra/overlap" not in m0  # no earlier task
    assert m1["spectra/overlap"] == pytest.approx(0.0, abs=1e-10)
    assert m2["spectra/overlap"] == pytest.approx(1.0)
    arrays = tr.arrays()
    assert arrays["task_sv"].shape == (3, 1, 4)
    cum = LowRank.sum([first, second, first]).dense()
    assert np.allclose(arrays["cumulative_sv"][2, 0, :4], torch.linalg.svdvals(cum)[:4].numpy(), rtol=1e-6)


def test_extend_basis_is_orthonormal():
    V = extend_basis(None, torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64))[0])
    V = extend_basis(V, torch.randn(10, 4, dtype=torch.float64))
    assert V.shape == (10, 7)
    assert torch.allclose(V.t() @ V, torch.eye(7, dtype=torch.float64), atol=1e-10)
