"""Continual-learning metrics: pure functions of an accuracy matrix.

``R[t][k]`` is the score on task ``k`` (columns 0..T-1 for tasks 1..T) after training on task
``t`` (rows 1..T), with row 0 the scores before any training. In the formulas below tasks and
rows are numbered from 1 as in the papers; ``R[k][k]`` means the score on task k right after
training it (``R[k][k - 1]`` in Python indexing).

- final average          A_T = mean_k R[T][k]
- average incremental    mean_{t=1..T} mean_{k<=t} R[t][k]      (mean over the tasks seen so far)
- backward transfer      BWT = mean_{k<T} (R[T][k] - R[k][k])     (Avalanche; negative = forgetting)
- forward transfer       FWT = mean_{k>=2} (R[k-1][k] - R[0][k])  (Avalanche)
- forgetting             F = mean_{k<T} (max_{t=k..T-1} R[t][k] - R[T][k])  (Chaudhry et al. 2018)
- plasticity             R[k][k] for each k, and their mean
- general retention      after - before on a general probe (negative = ability lost); for a
                         loss or perplexity, lower is better, so the sign is flipped

These are unweighted means over tasks (not pooled over examples).
"""

from __future__ import annotations

from statistics import mean
from typing import Sequence

Matrix = Sequence[Sequence[float]]


def _check(R: Matrix) -> int:
    T = len(R) - 1
    if T < 1:
        raise ValueError("the accuracy matrix needs row 0 (before training) and at least one task row")
    if any(len(row) != T for row in R):
        raise ValueError(f"the accuracy matrix must be {T + 1} x {T} (rows: before + each task; columns: tasks)")
    return T


def final_average(R: Matrix) -> float:
    T = _check(R)
    return mean(R[T][k] for k in range(T))


def average_incremental(R: Matrix) -> float:
    T = _check(R)
    return mean(mean(R[t][k] for k in range(t)) for t in range(1, T + 1))


def backward_transfer(R: Matrix) -> float:
    T = _check(R)
    if T < 2:
        return 0.0
    return mean(R[T][k - 1] - R[k][k - 1] for k in range(1, T))


def forward_transfer(R: Matrix) -> float:
    T = _check(R)
    if T < 2:
        return 0.0
    return mean(R[k - 1][k - 1] - R[0][k - 1] for k in range(2, T + 1))


def forgetting(R: Matrix) -> float:
    T = _check(R)
    if T < 2:
        return 0.0
    return mean(max(R[t][k - 1] for t in range(k, T)) - R[T][k - 1] for k in range(1, T))


def plasticity(R: Matrix) -> list[float]:
    T = _check(R)
    return [R[k][k - 1] for k in range(1, T + 1)]


def general_retention(before: float, after: float, lower_is_better: bool = False) -> float:
    """Change on a general probe, signed so that negative means ability was lost."""
    return (before - after) if lower_is_better else (after - before)


def summarize(R: Matrix) -> dict[str, float]:
    """All matrix metrics at once."""
    p = plasticity(R)
    return {
        "final_average": final_average(R),
        "average_incremental": average_incremental(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R),
        "forgetting": forgetting(R),
        "plasticity": mean(p),
    }


def oriented(R: Sequence[Sequence[float | None]], higher_is_better: Sequence[bool]) -> list[list[float | None]]:
    """``R`` with the columns of lower-is-better metrics (loss, perplexity) negated.

    In the oriented matrix every column reads "higher is better", so backward transfer, forward
    transfer and forgetting keep their usual signs (BWT < 0 = forgotten) whatever each task's
    metric is. Missing entries (None) stay missing.
    """
    signs = [1.0 if h else -1.0 for h in higher_is_better]
    return [[None if v is None else s * v for v, s in zip(row, signs)] for row in R]


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the points no other point dominates, both coordinates maximised.

    A point dominates another when it is at least as high on both coordinates and higher on one.
    Equal points do not dominate each other, so all of them stay on the front. A point with a
    missing (None) or NaN coordinate is never on the front and dominates nothing.
    """

    def usable(p: tuple[float | None, float | None]) -> bool:
        return all(v is not None and v == v for v in p)

    valid = [i for i, p in enumerate(points) if usable(p)]

    def dominates(a: tuple, b: tuple) -> bool:
        return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])

    return [i for i in valid if not any(dominates(points[j], points[i]) for j in valid if j != i)]
