"""L2-SP: pull the weights toward their starting point instead of toward zero.

    penalty = weight / 2 * ||theta - theta_0||^2

over the trainable parameters, with ``theta_0`` the weights at the start of the run (Li, Grandvalet
& Davoine 2018, "Explicit inductive bias for transfer learning with convolutional networks",
ICML). It is EWC with every Fisher value equal to one: it needs no old data, and treats every
weight as equally important. Added once per optimiser step, next to the token-mean LM loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from forgetless.config import option
from forgetless.errors import ConfigError
from forgetless.methods.base import Context, Method
from forgetless.registry import register, REGULARIZE, STARTS_AT_BASE, STRENGTH
from forgetless import zero
from forgetless.methods.ewc import anchor_copy, anchored_squares, bind_anchored, partitions
from forgetless.methods.fisher import trainable
from forgetless.sharding import held_bytes


@dataclass
class L2SPConfig:
    """Squared distance to the starting weights."""

    weight: float = option(0.01, "alpha: strength of the penalty weight/2 * ||theta - theta_0||^2.")
    anchor_dtype: Literal["auto", "bfloat16"] = option(
        "auto", "dtype the anchors theta_0 are kept in on the device: 'auto', the parameters' own; 'bfloat16' halves them "
        "for float32 weights (the penalty is still computed in the parameters' dtype)."
    )

    def validate(self, where: str) -> None:
        if self.weight < 0:
            raise ConfigError(f"{where}.weight must be >= 0, got {self.weight}")


class L2SP(Method):
    name = "l2sp"

    def __init__(self, cfg: L2SPConfig):
        self.cfg = cfg
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.anchors: list[torch.Tensor] = []
        self._partitions: list[torch.Tensor] | None = None  # ZeRO-3: the anchors' partitions the penalty uses (bind)
        self._count = 0  # the anchored parameters' numbers of elements (whole)

    def before_train(self, model, ctx: Context) -> None:
        params = trainable(model)
        self.names = list(params)
        self.params = list(params.values())
        self.anchors = [anchor_copy(p, self.cfg.anchor_dtype) for p in self.params]

    def bind(self, model, ctx: Context) -> None:
        self._count = sum(a.numel() for a in self.anchors)
        self.params, self.anchors = bind_anchored(model, self.names, self.anchors)
        if self.params and zero.is_partitioned(self.params[0]):  # ZeRO-3: partitions only, on the device (gathered for checkpoints)
            self.anchors = zero.partition_all(self.anchors, self.params)
            self._partitions = [a.data for a in self.anchors]

    def step_terms(self, model) -> dict[str, torch.Tensor]:
        if self._partitions is not None:
            return {"l2sp": anchored_squares(self.params, self._partitions, self.cfg.weight)}
        if self.anchors and self.anchors[0].device != self.params[0].device:  # the recipe moved the model
            self.anchors = [a.to(p.device) for a, p in zip(self.anchors, self.params)]
        return {"l2sp": anchored_squares(self.params, self.anchors, self.cfg.weight)}

    def state_dict(self) -> dict:
        return {f"anchor.{n}": a for n, a in zip(self.names, self.anchors)}

    def load_state_dict(self, state: dict) -> None:
        self.anchors = [state[f"anchor.{n}"] for n in self.names]

    def describe(self) -> dict:
        return {"weight": self.cfg.weight, "anchored_params": self._count or sum(a.numel() for a in self.anchors),
                "held_bytes": held_bytes(self.anchors)}  # the anchors as this process holds them (sharded: its shards)


register("l2sp", L2SPConfig, L2SP, "L2-SP: a squared-distance penalty pulling the weights toward their starting values.",
         phase=REGULARIZE, provides={STARTS_AT_BASE: "", STRENGTH: ""}, backends=("single", "ddp", "fsdp2", "zero2", "zero3", "qlora"))  # on a 4-bit base: the adapters
