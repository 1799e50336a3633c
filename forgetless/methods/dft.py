"""DFT, dynamic fine-tuning: each target token's loss scaled by the model's own (detached) probability of it.

    loss = Σ_t sg(p_θ(y_t | y_<t)) · (−log p_θ(y_t | y_<t))

Wu et al., 2025, "On the Generalization of SFT: A Reinforcement Learning Perspective with Reward
Rectification" (arXiv 2508.05629); TRL's ``loss_type="dft"``. Tokens the model finds unlikely,
the ones whose plain-SFT gradient is the largest and most disruptive, count less; it needs no old
data. ASFT (arXiv 2509.23753) is DFT with a KL anchor to the base: ``methods: {dft: {}, kl: {}}``.

As a plugin the term is the correction that turns the recipe's plain token loss into DFT's,
``dft = Σ_t (sg(p_t) − 1) · loss_t``, so the logged ``lm`` stays the plain cross-entropy (what is
learned) and ``dft`` shows the reweighting. The head runs over the target rows once more, in
chunks (forgetless/loss.py, ``Outputs.weighted_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forgetless.methods.base import Method
from forgetless.registry import REGULARIZE, register


@dataclass
class DFTConfig:
    """Dynamic fine-tuning: no options (each token's weight is its detached probability)."""

    def validate(self, where: str) -> None:
        return None


def dft_weights(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(rows,) the probability each row's softmax gives its target: DFT's per-token weight."""
    return torch.softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


class DFT(Method):
    name = "dft"

    def __init__(self, cfg: DFTConfig):
        self.cfg = cfg

    def batch_terms(self, model, batch, out) -> dict[str, torch.Tensor]:
        return {"dft": out.weighted_loss(batch["labels"], lambda logits, t: dft_weights(logits, t) - 1.0)}

    def describe(self) -> dict:
        return {"weight": "detached target probability"}


register("dft", DFTConfig, DFT, "DFT: each target token's loss scaled by its detached probability (TRL's loss_type=dft); no old data.",
         phase=REGULARIZE)
