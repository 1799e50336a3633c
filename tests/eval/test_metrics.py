"""Metrics on hand-computed accuracy matrices (conventions of Avalanche and Chaudhry et al.)."""

import pytest

from forgetless.eval import metrics as M

# rows: before, after task 1, after task 2, after task 3; columns: tasks 1..3
R = [
    [0.10, 0.20, 0.05],
    [0.90, 0.30, 0.10],
    [0.60, 0.80, 0.20],
    [0.50, 0.70, 0.95],
]


def test_final_and_incremental_average():
    assert M.final_average(R) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    # after t1: 0.9; after t2: (0.6 + 0.8) / 2 = 0.7; after t3: 0.7167
    assert M.average_incremental(R) == pytest.approx((0.9 + 0.7 + (0.5 + 0.7 + 0.95) / 3) / 3)


def test_backward_transfer_avalanche():
    # mean over k < T of R[T][k] - R[k][k]: (0.5 - 0.9) and (0.7 - 0.8)
    assert M.backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_forward_transfer_avalanche():
    # mean over k >= 2 of R[k-1][k] - R[0][k]: task 2: 0.3 - 0.2; task 3: 0.2 - 0.05
    assert M.forward_transfer(R) == pytest.approx(((0.3 - 0.2) + (0.2 - 0.05)) / 2)


def test_forgetting_chaudhry_uses_the_best_earlier_score():
    # task 1: best of rows 1..2 = 0.9, final 0.5 -> 0.4; task 2: best of row 2 = 0.8, final 0.7 -> 0.1
    assert M.forgetting(R) == pytest.approx((0.4 + 0.1) / 2)
    # the best earlier score, not the score right after training: a task that improves and then drops
    R2 = [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.9, 0.6, 0.0], [0.4, 0.6, 0.8]]
    assert M.forgetting(R2) == pytest.approx(((0.9 - 0.4) + 0.0) / 2)
    assert M.backward_transfer(R2) == pytest.approx(((0.4 - 0.5) + (0.6 - 0.6)) / 2)


def test_plasticity_and_summary():
    assert M.plasticity(R) == [0.90, 0.80, 0.95]
    s = M.summarize(R)
    assert set(s) == {"final_average", "average_incremental", "bwt", "fwt", "forgetting", "plasticity"}
    assert s["plasticity"] == pytest.approx((0.9 + 0.8 + 0.95) / 3)


def test_single_task_and_shape_errors():
    R1 = [[0.1], [0.8]]
    assert M.final_average(R1) == 0.8 and M.backward_transfer(R1) == 0.0 and M.forgetting(R1) == 0.0
    with pytest.raises(ValueError, match="must be 3 x 2"):
        M.final_average([[0.1, 0.2], [0.3, 0.4], [0.5]])
    with pytest.raises(ValueError, match="row 0"):
        M.final_average([[0.1]])


def test_general_retention_sign():
    assert M.general_retention(0.8, 0.6) == pytest.approx(-0.2)
    assert M.general_retention(2.0, 2.5, lower_is_better=True) == pytest.approx(-0.5)
