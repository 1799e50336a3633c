"""FLOW: each training example's loss weighted by how easy the base model finds it.

    w_i = exp(−ℓ_i / τ),      loss = Σ_i w_i · Σ_{t ∈ i} loss_t  /  (target tokens of the step)

``ℓ_i`` is the base model's mean token loss on example ``i``, computed once before training (one
no-grad pass over the training data); ``τ`` defaults to the median of the ``ℓ_i`` (Sanyal et al.,
ICML 2025, "Upweighting Easy Samples in Fine-Tuning Mitigates Forgetting", arXiv 2502.02797; the
authors' code: sequence weights ``exp(-loss/temperature)``, temperature the median loss, the
weighted token sum divided by the plain token count). Examples the base already handles well
train fully; those far from what it knows, whose gradients would pull it furthest, count little.
No old data needed.

The base losses are saved in every checkpoint (keyed by a hash of each example's tokens) and
restored on resume, never recomputed; the weights are a pure function of them
(:func:`flow_weights`). As a plugin the term is the correction ``flow = Σ_t (w_i(t) − 1) · loss_t``
added to the recipe's plain token loss, so the logged ``lm`` stays the plain cross-entropy. Rows
of other streams (mixed-in or replayed data) are not in the table and keep weight 1.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import Optional

import torch

from forgetless.config import option
from forgetless.data.batching import collate, example_spans
from forgetless.errors import ConfigError, UserError
from forgetless.loss import forward as lm_forward
from forgetless.loss import target_positions
from forgetless.methods.base import Context, Method
from forgetless.registry import REGULARIZE, register


@dataclass
class FLOWConfig:
    """Per-example weights from the base model's loss on the training data."""

    temperature: Optional[float] = option(None, "τ in exp(−loss/τ); null: the median of the base model's per-example losses (the paper's choice).")
    normalize: bool = option(False, "Rescale the weights to mean 1 over the training data (keeps the effective learning rate); "
                             "false, the paper's form, also scales the step down.")

    def validate(self, where: str) -> None:
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"{where}.temperature must be positive (or null for the median loss), got {self.temperature}")


def example_key(input_ids, labels) -> int:
    """A 63-bit hash of an example's tokens and of the labels it is trained on (``labels[1:]``:
    the first token is never predicted, and packing masks it)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(array("q", [int(t) for t in input_ids]).tobytes())
    h.update(b"\0")
    h.update(array("q", [int(t) for t in labels[1:]]).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def flow_weights(losses: torch.Tensor, temperature: Optional[float] = None, normalize: bool = False) -> tuple[torch.Tensor, float]:
    """``(exp(−losses / τ), τ)``: τ the given temperature, else the median of ``losses``; with
    ``normalize`` the weights are divided by their mean."""
    losses = losses.double()
    tau = float(temperature) if temperature is not None else float(losses.median())
    w = torch.exp(-losses / max(tau, 1e-12))
    if normalize:
        w = w / w.mean()
    return w.float(), tau


@torch.no_grad()
def base_losses(model, examples, ctx: Context) -> torch.Tensor:
    """(examples,) each example's mean target-token loss under ``model`` (one no-grad pass; with
    several processes each computes a strided share and the shares are summed)."""
    n = len(examples)
    mine = sorted(range(ctx.rank, n, ctx.world), key=lambda i: -len(examples[i].input_ids))  # little padding
    out = torch.zeros(n, dtype=torch.float64, device=ctx.device)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(mine), ctx.micro_batch_size):
            idx = mine[start : start + ctx.micro_batch_size]
            group = [examples[i] for i in idx]  # one collated batch in this order (micro_batches would sort and split it)
            b = {k: v.to(ctx.device) for k, v in collate(group, ctx.tokenizer.pad_token_id).items()}
            o = lm_forward(model, b["input_ids"], b["attention_mask"], autocast=ctx.autocast)
            per_token = o.token_losses(b["labels"]).double()
            rows = target_positions(b["labels"]).nonzero()[:, 0]
            sums = torch.zeros(len(idx), dtype=torch.float64, device=per_token.device).index_add_(0, rows, per_token)
            counts = torch.bincount(rows, minlength=len(idx)).clamp(min=1)
            out[torch.tensor(idx, device=ctx.device)] = (sums / counts).to(ctx.device)
    finally:
        model.train(was_training)
    if ctx.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(out)
    return out.cpu()


class FLOW(Method):
    name = "flow"

    def __init__(self, cfg: FLOWConfig):
        self.cfg = cfg
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.losses = torch.zeros(0, dtype=torch.float32)
        self.table: dict[int, float] = {}
        self.tau = 0.0

    def before_train(self, model, ctx: Context) -> None:
        saved = ctx.restored(self.name)
        if saved is not None:  # resuming: the base losses of the fresh run, not recomputed from a trained model
            self.load_state_dict(saved)
            return
        examples = ctx.train_examples
        if hasattr(examples, "take"):
            raise UserError("methods.flow needs the base model's loss on every training example before training; streamed "
                            "data (data.streaming) is read as drawn: turn streaming off or use another method")
        if len(examples) == 0:
            raise UserError("methods.flow: the training data has no examples")
        losses = base_losses(model, examples, ctx)
        keys = [example_key(e.input_ids, e.labels) for e in examples]
        self.keys = torch.tensor(keys, dtype=torch.int64)
        self.losses = losses.float()
        self._build()

    def _build(self) -> None:
        weights, self.tau = flow_weights(self.losses, self.cfg.temperature, self.cfg.normalize)
        self.table = dict(zip(self.keys.tolist(), weights.tolist()))

    def token_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One weight per target token of ``batch`` (in ``target_positions`` order): its example's."""
        labels = batch["labels"]
        w = torch.ones_like(labels, dtype=torch.float32)
        ids = batch["input_ids"]
        for row, spans in enumerate(example_spans(batch)):
            for a, b in spans:
                weight = self.table.get(example_key(ids[row, a:b].tolist(), labels[row, a:b].tolist()))
                if weight is not None:
                    w[row, a:b] = weight
        return w[:, 1:][target_positions(labels)]  # the weight of position t is that of the token it predicts

    def batch_terms(self, model, batch, out) -> dict[str, torch.Tensor]:
        return {"flow": out.weighted_loss(batch["labels"], self.token_weights(batch) - 1.0)}

    def state_dict(self) -> dict:
        return {"keys": self.keys, "losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self.keys = state["keys"].to(torch.int64)
        self.losses = state["losses"].float()
        self._build()

    def describe(self) -> dict:
        if not len(self.losses):
            return {}
        w, _ = flow_weights(self.losses, self.cfg.temperature, self.cfg.normalize)
        return {
            "examples": len(self.losses),
            "temperature": round(self.tau, 6),
            "normalize": self.cfg.normalize,
            "base_loss": {"min": round(float(self.losses.min()), 4), "median": round(float(self.losses.median()), 4),
                          "max": round(float(self.losses.max()), 4)},
            "weight": {"min": round(float(w.min()), 4), "mean": round(float(w.mean()), 4), "max": round(float(w.max()), 4)},
        }


register("flow", FLOWConfig, FLOW, "FLOW: each example's loss weighted by exp(−base loss / τ), computed once before training; no old data.",
         phase=REGULARIZE)
