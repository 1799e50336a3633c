"""The token-level language-modelling loss, shared by training and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forgetless.data.formats import IGNORE


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over target tokens, and the per-token correctness.

    Returns ``(loss_sum, correct)`` where ``loss_sum`` is a scalar (a sum, not a mean: callers
    divide by the number of target tokens of the *whole* accumulated batch) and ``correct`` is a
    bool tensor over target tokens (argmax == label). Logits are upcast to float32 for the loss.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    flat_logits = shift_logits.reshape(-1, shift_logits.size(-1))
    flat_labels = shift_labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE, reduction="sum")
    mask = flat_labels != IGNORE
    correct = flat_logits[mask].argmax(-1) == flat_labels[mask]
    return loss_sum, correct
