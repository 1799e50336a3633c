"""Multiple-choice scoring as lm-evaluation-harness does it (its ``loglikelihood`` requests).

For every record and every choice, the model reads ``prompt + continuation`` in one forward pass
and the log-probabilities of the continuation's tokens are summed (the prompt is not scored).
Two accuracies follow, as in lm-eval:

- ``mc_accuracy`` (lm-eval ``acc``): the choice with the highest summed log-likelihood is right.
- ``mc_accuracy_norm`` (``acc_norm``): the same after dividing each log-likelihood by the length
  of the choice's text in characters, so long answers are not penalised for their length.

Ties go to the first choice (numpy's argmax, as in lm-eval). How prompt and continuation are
joined is decided when the records are encoded (:mod:`forgetless.data.formats`). Requests of all
records are batched together, longest first, so padding stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from forgetless.data.formats import Example
from forgetless.loss import forward as lm_forward


@dataclass
class ChoiceScore:
    """Sum of log-probabilities of one continuation, its length in tokens, and its greedy hits."""

    loglik: float
    tokens: int
    greedy_hits: int  # continuation tokens that are also the argmax prediction


def pick(logliks: Sequence[float], char_lengths: Sequence[int]) -> tuple[int, int]:
    """Index of the best choice by summed log-likelihood, and by log-likelihood per character."""
    best = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    best_norm = max(range(len(logliks)), key=lambda i: (logliks[i] / max(char_lengths[i], 1), -i))
    return best, best_norm


@torch.no_grad()
def score_choices(
    model,
    examples: list[Example],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    on_batch: Optional[Callable[[int], None]] = None,
) -> list[list[ChoiceScore]]:
    """``ChoiceScore`` of every choice of every multiple-choice example (``example.choices`` set)."""
    requests = [(i, c, len(e.prompt_ids)) for i, e in enumerate(examples) for c in range(len(e.choices))]
    requests.sort(key=lambda r: -(r[2] + len(examples[r[0]].choices[r[1]])))
    out_scores: list[list[Optional[ChoiceScore]]] = [[None] * len(e.choices) for e in examples]
    remaining = [len(e.choices) for e in examples]
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        seqs = [examples[i].prompt_ids + examples[i].choices[c] for i, c, _ in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        # the token at position p is predicted by the logits at p - 1: the head runs at those rows only
        select = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
        for row, (i, c, n_prompt) in enumerate(batch):
            select[row, n_prompt - 1 : n_prompt - 1 + len(examples[i].choices[c])] = True
        out = lm_forward(model, ids.to(device), mask.to(device))
        logp_rows = torch.log_softmax(out.logits_at(select.to(device)).float(), dim=-1)
        done, first = 0, 0
        for row, (i, c, n_prompt) in enumerate(batch):
            target = torch.tensor(examples[i].choices[c], device=logp_rows.device)
            logp = logp_rows[first : first + len(target)]
            first += len(target)
            loglik = logp.gather(-1, target[:, None]).sum().item()
            hits = int((logp.argmax(-1) == target).sum())
            out_scores[i][c] = ChoiceScore(loglik, len(target), hits)
            remaining[i] -= 1
            done += remaining[i] == 0
        if on_batch and done:
            on_batch(done)
    return out_scores  # type: ignore[return-value]
