"""MoFO, momentum-filtered optimiser: in each parameter block only the entries with the largest momentum move.

Chen et al., 2024, "MoFO: Momentum-Filtered Optimizer for Mitigating Forgetting in LLM
Fine-Tuning" (arXiv 2407.20999). At every step Adam(W) updates its moments for every entry as
usual; then, in each block (here: each trainable parameter tensor, the paper's partition of a
transformer), only the ``fraction`` of entries with the largest ``|m_t|`` (the updated first
moment) take the step, and every other entry keeps its value exactly. Full fine-tuning that stays
close to the base weights, with no old data and no penalty term.

Done with the optimiser's step hooks (``configure_optimizer``): the pre-hook keeps the values of
the trainable parameters, the post-hook selects each block's top-``fraction`` by ``|exp_avg|`` and
puts the old values back everywhere else (weight decay included). The cost is one copy of the
trainable weights held during the step and a top-k per block; the optimiser's state is that of
AdamW, so checkpoints and exact resume are unchanged. Written by hand: no maintained library
ships MoFO (its authors' code patches a transformers Trainer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forgetless.config import option
from forgetless.errors import ConfigError
from forgetless.methods.base import Method
from forgetless.registry import REGULARIZE, STARTS_AT_BASE, register


@dataclass
class MoFOConfig:
    """Update only the largest-momentum share of each parameter block."""

    fraction: float = option(0.1, "Share of each parameter tensor's entries updated per step, in (0, 1] (the paper's default 10%).")

    def validate(self, where: str) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"{where}.fraction must be in (0, 1] (the share of each block updated per step), got {self.fraction}")


def chosen(momentum: torch.Tensor, fraction: float) -> torch.Tensor:
    """A bool mask of ``momentum``'s shape: exactly ``max(1, round(fraction · numel))`` entries, those of largest magnitude."""
    flat = momentum.detach().abs().flatten()
    k = max(1, min(flat.numel(), round(fraction * flat.numel())))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[flat.float().topk(k, sorted=False).indices] = True
    return mask.view_as(momentum)


class MoFO(Method):
    name = "mofo"

    def __init__(self, cfg: MoFOConfig):
        self.cfg = cfg
        self.kept: dict[int, torch.Tensor] = {}
        self.blocks = 0

    def configure_optimizer(self, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.blocks = len(params)

        def keep(opt, args, kwargs):
            self.kept = {id(p): p.detach().clone() for p in params if p.grad is not None}

        def filter_update(opt, args, kwargs):
            with torch.no_grad():
                for p in params:
                    old = self.kept.get(id(p))
                    if old is None:
                        continue
                    momentum = opt.state[p].get("exp_avg")
                    if momentum is None:
                        raise ConfigError("methods.mofo filters by the optimiser's first moment (exp_avg), which this optimiser does not keep")
                    if self.cfg.fraction < 1:
                        p.copy_(torch.where(chosen(momentum, self.cfg.fraction), p, old))
            self.kept = {}

        optimizer.register_step_pre_hook(keep)
        optimizer.register_step_post_hook(filter_update)

    def describe(self) -> dict:
        return {"fraction": self.cfg.fraction, "blocks": self.blocks}


register("mofo", MoFOConfig, MoFO, "MoFO: each step moves only the largest-momentum share of every parameter tensor; no old data.",
         phase=REGULARIZE, provides={STARTS_AT_BASE: ""})
