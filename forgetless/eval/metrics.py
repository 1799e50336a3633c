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
