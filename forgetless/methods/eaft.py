"""EAFT, entropy-adaptive fine-tuning: each target token's loss weighted by the model's normalised top-k entropy there.

    w_t = H(softmax(top_k(z_t))) / ln k,     loss = Σ_t sg(w_t) · loss_t

with ``z_t`` the logits at the position that predicts token ``t`` (arXiv 2601.02151; LLaMA-Factory
and axolotl ship it). Where the model is confident (low entropy: knowledge it holds), a token
that contradicts it barely moves the weights; where it is unsure, the token trains fully. No old
data needed. As a plugin the term is the correction ``eaft = Σ_t (w_t − 1) · loss_t`` added to the
recipe's plain token loss, so the logged ``lm`` stays the plain cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from forgetless.config import option
from forgetless.errors import ConfigError
from forgetless.methods.base import Method
from forgetless.registry import REGULARIZE, register


@dataclass
class EAFTConfig:
    """Entropy-adaptive token weights."""

    top_k: int = option(20, "Logits whose softmax entropy gives the weight (normalised by ln top_k, so weights lie in [0, 1]).")

    def validate(self, where: str) -> None:
        if self.top_k < 2:
            raise ConfigError(f"{where}.top_k must be at least 2 (one logit has no entropy), got {self.top_k}")


def eaft_weights(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """(rows,) the entropy of the softmax over each row's ``top_k`` largest logits, divided by ln ``top_k``."""
    k = min(top_k, logits.shape[-1])
    logp = torch.log_softmax(logits.float().topk(k, dim=-1).values, dim=-1)
    return -(logp.exp() * logp).sum(-1) / math.log(k)


class EAFT(Method):
    name = "eaft"

    def __init__(self, cfg: EAFTConfig):
        self.cfg = cfg

    def batch_terms(self, model, batch, out) -> dict[str, torch.Tensor]:
        k = self.cfg.top_k
        return {"eaft": out.weighted_loss(batch["labels"], lambda logits, t: eaft_weights(logits, k) - 1.0)}

    def describe(self) -> dict:
        return {"top_k": self.cfg.top_k}


register("eaft", EAFTConfig, EAFT, "EAFT: each target token's loss weighted by the normalised top-k entropy of the model there; no old data.",
         phase=REGULARIZE)
