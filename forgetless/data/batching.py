"""Deterministic batching that does not depend on the number of processes.

The training stream is a function of the seed alone. Each source (the task data, and any data a
method mixes in: general text, a replay memory) has its own stream: epoch ``e`` of source ``j``
visits its examples in ``randperm(n_j, seed + 7919 * j + e)``. Every global batch of ``G``
examples takes from each source its share of ``G``; the counts are allocated by largest
remainder on the cumulative quota, so after ``s`` steps source ``j`` has given
``round(s * G * w_j)`` examples, give or take one (the observed mix equals the requested one).
The batch is then shuffled (seeded by the step) so that every process and micro-batch gets a
fair mix.

Each process takes its contiguous share of a global batch and cuts it into micro-batches. So
1 process with 4 accumulation steps and 2 processes with 2 see exactly the same global batches,
and a run's data position is just its step number (what exact resume needs).

Inside its share, a process groups examples of similar length into the same micro-batch
(:func:`micro_batches`; the number of micro-batches may then differ from grad_accum_steps). The step's loss is a sum over all target tokens of the global batch, so
how the examples are grouped does not change it, but padding does change the cost: a short
mixed-in or replayed sequence padded to the length of a long task sequence costs as much as the
long one. Grouping by length is what keeps mixing and replay at about the cost of their tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from forgetless.data.formats import IGNORE, Example


@dataclass
class Source:
    """A stream of examples and its share of every batch."""

    name: str
    examples: list[Example]
    weight: float


class MixedBatches:
    """Global batches drawn from several sources in fixed shares; ``sources[0]`` is the task."""

    def __init__(self, sources: list[Source], global_batch: int, seed: int):
        total = sum(s.weight for s in sources)
        if total <= 0 or any(s.weight < 0 for s in sources):
            raise ValueError("source weights must be non-negative and not all zero")
        self.sources = sources
        self.shares = [s.weight / total for s in sources]
        self.global_batch = global_batch
        self.seed = seed
        self._perms: dict[tuple[int, int], list[int]] = {}
        # the shares from a step on, when they change during the run (a forgetting budget's controller)
        self.segments: list[tuple[int, list[float]]] = [(0, list(self.shares))]
        self._counts: list[list[int]] = [[0] * len(sources)]  # _given(s) for s = 0 .. len - 1, computed in order

    def set_shares(self, from_step: int, weights: list[float]) -> None:
        """Draw in the shares ``weights`` (normalised) from optimiser step ``from_step`` on; the
        batches of earlier steps stay as they were, and every source's stream goes on where it was."""
        total = sum(weights)
        if len(weights) != len(self.sources) or total <= 0 or any(w < 0 for w in weights):
            raise ValueError("one non-negative weight per source, not all zero")
        if from_step < self.segments[-1][0]:
            raise ValueError(f"shares change at step {from_step}, before the last change ({self.segments[-1][0]})")
        shares = [w / total for w in weights]
        del self._counts[from_step + 1:]  # counts up to from_step depend on earlier steps' shares only
        if from_step == self.segments[-1][0]:
            self.segments[-1] = (from_step, shares)
        else:
            self.segments.append((from_step, shares))
        self.shares = shares

    def restore_segments(self, segments: list[tuple[int, list[float]]]) -> None:
        """Take back the shares of a resumed run exactly as they were drawn (``segments``, as saved)."""
        self.segments = [(start, list(shares)) for start, shares in segments]
        self.shares = list(self.segments[-1][1])
        del self._counts[1:]  # rebuilt from these

    @property
    def task_per_step(self) -> float:
        return self.global_batch * self.shares[0]

    def steps_for_epochs(self, epochs: float) -> int:
        """Optimiser steps for ``epochs`` passes over the task source."""
        return max(1, math.ceil(epochs * len(self.sources[0].examples) / max(self.task_per_step, 1e-9)))

    def epoch_at(self, step: int) -> Optional[float]:
        """Passes over the task source so far (None for a stream, whose length is not known)."""
        if _is_stream(self.sources[0].examples):
            return None
        if len(self.segments) > 1:  # the shares changed during the run: count what the task gave
            return self._given(step)[0] / len(self.sources[0].examples)
        return step * self.task_per_step / len(self.sources[0].examples)

    def _quotas(self, step: int) -> list[float]:
        """What each source's shares ask of steps ``0 .. step-1``, in examples (not whole)."""
        quotas = [0.0] * len(self.sources)
        for k, (start, shares) in enumerate(self.segments):
            end = self.segments[k + 1][0] if k + 1 < len(self.segments) else None
            steps = max(0, (step if end is None else min(step, end)) - start)
            quotas = [q + steps * self.global_batch * w for q, w in zip(quotas, shares)]
        return quotas

    def _rounded(self, step: int) -> list[int]:
        """The cumulative quotas of steps ``0 .. step-1`` rounded to whole examples (largest remainder)."""
        quotas = self._quotas(step)
        counts = [math.floor(q) for q in quotas]
        order = sorted(range(len(quotas)), key=lambda j: (-(quotas[j] - counts[j]), j))
        for j in order[: step * self.global_batch - sum(counts)]:
            counts[j] += 1
        return counts

    def _given(self, step: int) -> list[int]:
        """Examples each source has given in steps ``0 .. step-1``: the rounded quotas, except where
        rounding afresh would take an example back from a source (possible with three or more
        sources, the apportionment paradox; a batch would then be one example too many). There the
        source keeps its count, and the sources furthest above their quotas give up the difference.
        Built step by step (and kept), so that no count ever decreases."""
        while len(self._counts) <= step:
            given = self._counts[-1]
            counts = [max(r, g) for r, g in zip(self._rounded(len(self._counts)), given)]
            excess = sum(counts) - len(self._counts) * self.global_batch
            if excess:
                quotas = self._quotas(len(self._counts))
                for _ in range(excess):
                    j = max((j for j in range(len(counts)) if counts[j] > given[j]), key=lambda j: (counts[j] - quotas[j], -j))
                    counts[j] -= 1
            self._counts.append(counts)
        return list(self._counts[step])

    def _perm(self, source: int, epoch: int) -> list[int]:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed + 7919 * source + epoch)
            self._perms[key] = torch.randperm(len(self.sources[source].examples), generator=g).tolist()
        return self._perms[key]

    def batch(self, step: int) -> list[tuple[int, int]]:
        """(source, example index) pairs of the global batch of optimiser step ``step``."""
        start, end = self._given(step), self._given(step + 1)
        picked = []
        for j, (a, b) in enumerate(zip(start, end)):
            if _is_stream(self.sources[j].examples):  # a stream (forgetless/data/stream.py): its positions, in order
                picked += [(j, pos) for pos in range(a, b)]
                continue
            n = len(self.sources[j].examples)
            picked += [(j, self._perm(j, pos // n)[pos % n]) for pos in range(a, b)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return [picked[i] for i in torch.randperm(len(picked), generator=g).tolist()]

    def examples(self, pairs: list[tuple[int, int]]) -> list[Example]:
        streamed: dict[int, dict[int, Example]] = {}
        for j in {j for j, _ in pairs if _is_stream(self.sources[j].examples)}:
            positions = [i for k, i in pairs if k == j]
            lo, hi = min(positions), max(positions) + 1
            streamed[j] = dict(zip(range(lo, hi), self.sources[j].examples.take(lo, hi)))
        return [streamed[j][i] if j in streamed else self.sources[j].examples[i] for j, i in pairs]


def _is_stream(examples) -> bool:
    return hasattr(examples, "take")


def shard(items: list, rank: int, world_size: int) -> list:
    """This process's contiguous share of a global batch."""
    per = len(items) // world_size
    return items[rank * per : (rank + 1) * per]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def micro_batches(examples: list[Example], size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Collated micro-batches of similar lengths, longest first, within a fixed memory budget.

    Examples are sorted by length (stable, so the grouping is a pure function of the batch). A
    micro-batch is closed when the next example is shorter than half of its longest one (so at most
    half of any micro-batch is padding, usually far less), or when one more example would exceed
    ``size`` x the longest sequence of the share in padded tokens (the memory the user sized
    ``micro_batch_size`` for). Short mixed-in or replayed sequences therefore neither pay for the
    padding of long task sequences nor cost extra forward passes. The step's loss is a sum over
    target tokens, so the grouping does not change it.
    """
    ordered = sorted(examples, key=lambda e: -len(e.input_ids))
    if not ordered:
        return []
    budget = size * len(ordered[0].input_ids)
    groups: list[list[Example]] = [[]]
    for e in ordered:
        group = groups[-1]
        if group:
            longest = len(group[0].input_ids)
            if 2 * len(e.input_ids) < longest or (len(group) + 1) * longest > budget:
                group = []
                groups.append(group)
        group.append(e)
    return [collate(g, pad_id) for g in groups]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into input_ids / attention_mask / labels tensors."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry loss once labels are shifted for next-token prediction."""
    return int((labels[:, 1:] != IGNORE).sum())


def pack(examples: list[Example], capacity: int) -> list[list[Example]]:
    """Rows of examples, each at most ``capacity`` tokens, by best-fit decreasing (TRL's ``bfd``):
    longest example first, each into the row it fills most tightly, else a new row. Deterministic:
    ties keep the given order. Written here because TRL packs a whole dataset once (its rows become
    the examples), and forgetless packs each step's own examples, so that the data a step sees, its
    mix and its loss stay those of the unpacked run."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[Example]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        fits = [r for r, room in enumerate(free) if room >= n]
        if fits:
            best = min(fits, key=lambda r: (free[r], r))
            rows[best].append(examples[i])
            free[best] -= n
        else:
            rows.append([examples[i]])
            free.append(capacity - n)
    return rows


def packed_micro_batches(examples: list[Example], size: int, capacity: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of ``size`` packed rows (:func:`pack`), fullest rows first (:func:`collate_packed`)."""
    rows = sorted(pack(examples, capacity), key=lambda r: -sum(len(e.input_ids) for e in r))
    return [collate_packed(rows[i : i + size], pad_id) for i in range(0, len(rows), size)]


def collate_packed(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of several examples each, with ``position_ids`` restarting at 0 for every example.

    Given position ids and no attention mask, transformers keeps the examples of a row apart: a
    block-diagonal causal mask for sdpa / eager attention, variable-length kernels for flash
    attention. ``attention_mask`` still marks the real tokens, for forgetless's own counting; the
    model is not given it (forgetless/loss.py). The first token of every example carries no label:
    it would be predicted from the previous example's last token.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[i, at : at + n] = torch.tensor(e.input_ids)
            labels[i, at : at + n] = torch.tensor([IGNORE] + e.labels[1:])
            mask[i, at : at + n] = 1
            positions[i, at : at + n] = torch.arange(n)
            at += n
        positions[i, at:] = torch.arange(width - at)  # the padding is a sequence of its own
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}


def example_spans(batch: dict[str, torch.Tensor]) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, end)`` column spans of its examples: one span of the real tokens in a
    right-padded row (:func:`collate`), one per example in a packed row (:func:`collate_packed`,
    where the position ids restart at every example)."""
    mask = batch["attention_mask"]
    out = []
    for row in range(mask.shape[0]):
        n = int(mask[row].sum())
        if "position_ids" not in batch:
            out.append([(0, n)] if n else [])
            continue
        starts = (batch["position_ids"][row, :n] == 0).nonzero()[:, 0].tolist()
        out.append(list(zip(starts, starts[1:] + [n])))
    return out


def predicting(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, seq - 1): positions whose next token is a real token of the same example (shifted, as targets are)."""
    out = batch["attention_mask"][:, 1:] == 1
    if "position_ids" in batch:  # packed: not across the boundary into the next example
        out = out & (batch["position_ids"][:, 1:] != 0)
    return out
