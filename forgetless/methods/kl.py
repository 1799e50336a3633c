"""Distillation to the base model (Learning without Forgetting, Li & Hoiem 2016, arXiv 1606.09282).

While the model learns the task, a loss term keeps its next-token distributions close to those of
the model as it was before training (the teacher)::

    kl = weight · T² · Σ_{i ∈ positions} KL( softmax(z_teacher,i / T) ‖ softmax(z_student,i / T) )

summed over the target positions of the batch (``labels != -100`` after the next-token shift, as
in forgetless/loss.py), so the recipe's normalisation turns it into a per-target-token mean like
the LM loss. ``T²`` keeps the gradient's size independent of the temperature (Hinton et al.,
2015, arXiv 1503.02531): d kl / d z_student = weight · T · (p_student − p_teacher).

The teacher costs no copy of the weights when the model carries adapters (PEFT LoRA, forgetless's
bottleneck adapters): it is the same model inside ``adapters_disabled`` (TRL's reference-model
trick). Otherwise it is a frozen deep copy made in ``before_train``: also for a LoRA whose init
moved part of the base into the adapter (PiSSA, CorDA, OLoRA; methods.lora ``init``), where
adapters off leave the residual ``W − s·B₀A₀``; its copy is folded (``merge_and_unload``) at the
starting weights, ``W_res + s·B₀A₀``, which is the base up to float rounding.

Which positions and data::

- ``data: train`` (default): the sum above over the positions of the training micro-batch; the
  student logits are the recipe's own (no extra student forward).
- ``data: <dataset>`` (old-task or general data): the recipe draws a global batch of that data
  every step, like the training batch (seeded, cycling, sharded over processes and grouped into
  micro-batches by length the same way, so 1 process and N processes see the same data at every
  step), runs the student on it, and the term is the mean over all its selected positions of
  the step: ``kl = weight · T² · mean_{i ∈ P} KL_i``, the same per-token scale as the train case.
- ``positions: targets`` (default): positions whose next token is a target; ``all``: every
  position whose next token is not padding (prompts and general text included); on the
  training batch its mean is taken at the scale of the target tokens
  (``· n_targets / n_selected``), so both choices weigh the same against the LM loss.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from forgetless.config import DatasetSpec, option
from forgetless.data.batching import count_targets, predicting
from forgetless.errors import ConfigError
from forgetless.loss import Outputs, forward as lm_forward, kl_sum, kl_sum_chunked, target_positions, use_full_logits
from forgetless.methods.base import Context, Method
from forgetless.methods.lora import moves_base
from forgetless.registry import register, REGULARIZE, STARTS_AT_BASE, STRENGTH
from forgetless.models.adapters import adapters_disabled, has_adapters, is_peft_model
from forgetless.sharding import is_sharded, shard_module


@dataclass
class KLConfig:
    """Distillation to the model as it was before training."""

    weight: float = option(1.0, "Multiplier of the KL term (0.1-10 typical; higher keeps the model closer to the base).")
    temperature: float = option(1.0, "Softmax temperature T of both distributions; the term is scaled by T² (Hinton).")
    data: Optional[DatasetSpec] = option(
        None,
        "'train' or null: KL on the training batch. A dataset (old-task or general data): every step, a batch "
        "of it as large as the training batch (extra forward passes), the KL averaged over its positions.",
    )
    positions: Literal["targets", "all"] = option(
        "targets", "'targets': positions that predict a target token; 'all': every position that predicts a non-pad token."
    )

    def validate(self, where: str) -> None:
        if not self.weight > 0:
            raise ConfigError(f"{where}.weight must be positive, got {self.weight}; remove methods.kl to switch it off")
        if not self.temperature > 0:
            raise ConfigError(f"{where}.temperature must be positive, got {self.temperature}")
        if not uses_train_batch(self.data):
            self.data.validate(f"{where}.data")


def uses_train_batch(spec: Optional[DatasetSpec]) -> bool:
    return spec is None or spec.path == "train"


__all__ = ["KL", "KLConfig", "kl_sum", "uses_train_batch"]


def _base_is_frozen(model) -> bool:
    """Whether ``adapters_disabled`` still gives the *original* model: only adapter weights train."""
    if not is_peft_model(model):
        return True  # forgetless's adapter kinds freeze the base model themselves
    if moves_base(model):
        return False  # adapters off: the residual the init left, not the base
    prefix = getattr(model.base_model, "prefix", "lora_")
    return all(prefix in n or "modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)


def base_head(model):
    """A head that gives the base model's logits from hidden rows, whatever adapters the model has.

    A head with nothing trainable and no hooks is its own base. Otherwise (LoRA on the head,
    PEFT's ``modules_to_save``, an adapter hooked onto it) every call runs inside
    ``adapters_disabled``: also when the loss's checkpointed chunks call it again in the backward
    pass, after the teacher's forward has left the context.
    """
    head = model.get_output_embeddings()
    adapted = (any(p.requires_grad for p in head.parameters()) or head._forward_hooks or head._forward_pre_hooks
               or hasattr(head, "base_layer") or hasattr(head, "original_module"))
    if not adapted:
        return head

    def run(rows: torch.Tensor) -> torch.Tensor:
        with adapters_disabled(model):
            return head(rows)

    return run


class KL(Method):
    name = "kl"

    def __init__(self, cfg: KLConfig):
        self.cfg = cfg
        self.teacher = None  # the frozen copy; stays None when adapters give the base outputs
        self.autocast = nullcontext
        self.paired = not uses_train_batch(cfg.data)

    def paired_data(self, ctx: Context) -> Optional[list]:
        # The recipe draws a global batch of it every step, sharded and micro-batched like its own.
        return ctx.load_dataset(self.cfg.data) if self.paired else None

    def before_train(self, model, ctx: Context) -> None:
        self.autocast = ctx.autocast
        if not (has_adapters(model) and _base_is_frozen(model)):
            teacher = copy.deepcopy(model)
            if moves_base(model):
                teacher = teacher.merge_and_unload()
            self.teacher = teacher.eval().requires_grad_(False).to(ctx.device)

    def bind(self, model, ctx: Context) -> None:
        if self.teacher is not None and is_sharded(model):  # FSDP2: the frozen copy sharded like the model
            self.teacher = shard_module(self.teacher, model)
            use_full_logits(self.teacher)

    @torch.no_grad()
    def teacher_outputs(self, model, input_ids, attention_mask, position_ids=None) -> Outputs:
        """The base model's forward on a batch: hidden states and a head that computes the base's logits.
        ``position_ids``: a packed batch's (its examples kept apart, as in the student's forward)."""
        if self.teacher is not None:
            return lm_forward(self.teacher, input_ids, attention_mask, autocast=self.autocast, position_ids=position_ids)
        was_training = model.training
        model.eval()
        try:
            with adapters_disabled(model):
                out = lm_forward(model, input_ids, attention_mask, autocast=self.autocast, position_ids=position_ids)
        finally:
            model.train(was_training)
        if out.head is not None:
            out = dataclasses.replace(out, head=base_head(model))
        return out

    def _selected(self, batch) -> torch.Tensor:
        if self.cfg.positions == "targets":
            return target_positions(batch["labels"])
        return predicting(batch)

    def _kl(self, model, batch, out: Outputs, select) -> torch.Tensor:
        teacher = self.teacher_outputs(model, batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
        return kl_sum_chunked(out, teacher, select, self.cfg.temperature)

    def batch_terms(self, model, batch, out: Outputs):
        if self.paired:
            return {}
        select = self._selected(batch)
        n_selected = int(select.sum())
        if n_selected == 0:
            return {"kl": out.anchor()}
        total = self._kl(model, batch, out, select)
        if self.cfg.positions == "all":  # a mean over all positions, at the scale of the LM loss's target tokens
            total = total * (count_targets(batch["labels"]) / n_selected)
        return {"kl": self.cfg.weight * total}

    def paired_count(self, batch) -> int:
        return int(self._selected(batch).sum())

    def paired_terms(self, model, batch, out: Outputs):
        select = self._selected(batch)
        if not bool(select.any()):
            return {"kl": out.anchor()}
        return {"kl": self.cfg.weight * self._kl(model, batch, out, select)}

    def describe(self) -> dict:
        return {
            "teacher": "frozen copy" if self.teacher is not None else "adapters disabled (no copy)",
            "data": self.cfg.data.path if self.paired else "train",
            "positions": self.cfg.positions,
            "temperature": self.cfg.temperature,
            "weight": self.cfg.weight,
        }


register(
    "kl",
    KLConfig,
    KL,
    "Distillation to the base model (LwF): KL(base ‖ model) on training or general data; no weight copy with adapters.",
    phase=REGULARIZE,
    provides={STARTS_AT_BASE: "", STRENGTH: ""},
    backends=("single", "ddp", "fsdp2", "zero2", "zero3", "qlora"),  # on a 4-bit base the teacher is the adapters-off model
)
