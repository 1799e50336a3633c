"""The Pareto front of (retention, learning) points, both maximised, and the oriented matrix."""

import math

from forgetless.eval.metrics import oriented, pareto_front


def test_dominated_points_are_left_out():
    # (BWT, plasticity): c is beaten by b on both; a and b trade off
    a, b, c = (-0.10, 0.80), (-0.50, 0.95), (-0.60, 0.90)
    assert pareto_front([a, b, c]) == [0, 1]


def test_one_better_coordinate_and_one_equal_dominates():
    assert pareto_front([(0.0, 0.5), (0.0, 0.7)]) == [1]
    assert pareto_front([(-0.2, 0.7), (0.0, 0.7)]) == [1]


def test_equal_points_are_all_kept():
    assert pareto_front([(0.1, 0.2), (0.1, 0.2), (0.0, 0.0)]) == [0, 1]


def test_single_point_and_empty():
    assert pareto_front([(-1.0, 0.0)]) == [0]
    assert pareto_front([]) == []


def test_missing_or_nan_coordinates_are_never_on_the_front():
    # the None point would otherwise dominate nothing and be kept; NaN compares false to all
    points = [(None, 0.9), (-0.3, 0.5), (math.nan, 1.0), (-0.1, 0.4)]
    assert pareto_front(points) == [1, 3]


def test_a_chain_keeps_only_the_top():
    assert pareto_front([(i / 10, i / 10) for i in range(5)]) == [4]


def test_oriented_negates_lower_is_better_columns_and_keeps_gaps():
    assert oriented([[1.0, 3.0], [None, 2.0]], [True, False]) == [[1.0, -3.0], [None, -2.0]]
