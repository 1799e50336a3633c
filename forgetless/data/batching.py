"""Deterministic batching that does not depend on the number of processes.

The order of the training stream is a function of the seed alone: epoch ``e`` visits the examples
in ``randperm(n, seed + e)``, and optimiser step ``s`` takes stream positions
``[s * G, (s + 1) * G)`` where ``G`` is the global batch. Each process then takes its contiguous
share of that global batch and cuts it into micro-batches. So 1 process with 4 accumulation
steps and 2 processes with 2 see exactly the same global batches, and a run's data position is
just its step number (what exact resume needs).
"""

from __future__ import annotations

import math

import torch

from forgetless.data.formats import IGNORE, Example


class GlobalBatches:
    def __init__(self, num_examples: int, global_batch: int, seed: int):
        self.n = num_examples
        self.global_batch = global_batch
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.n / self.global_batch))

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        """Example indices of the global batch of optimiser step ``step``."""
        out = []
        for pos in range(step * self.global_batch, (step + 1) * self.global_batch):
            out.append(self._perm(pos // self.n)[pos % self.n])
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.global_batch / self.n


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This process's contiguous share of a global batch."""
    per = len(indices) // world_size
    return indices[rank * per : (rank + 1) * per]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


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
