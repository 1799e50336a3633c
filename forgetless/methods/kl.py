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
trick). Otherwise it is a frozen deep copy made in ``before_train``.

Which positions and data (the general form; with the defaults it is exactly the sum above)::

    kl = weight · T² · n_targets(train micro-batch) · mean_{i ∈ P} KL_i

- ``data: train`` (default): P = positions of the training micro-batch; the student logits are
  the recipe's own (no extra student forward).
- ``data: <dataset>``: P = positions of a micro-batch of that data (``train.micro_batch_size``
  examples, in a seeded random order, cycling), with its own student and teacher forward. Scaling
  its mean by the train micro-batch's target count gives it the same scale as the train case: after
  the recipe's normalisation the term is the (target-weighted) mean KL per token of the data.
- ``positions: targets`` (default): positions whose next token is a target; ``all``: every
  position whose next token is not padding (prompts and general text included).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from forgetless.config import DatasetSpec, option
from forgetless.data.batching import collate
from forgetless.data.formats import IGNORE
from forgetless.errors import ConfigError
from forgetless.methods.base import Context, Method
from forgetless.registry import register, REGULARIZE, STARTS_AT_BASE
from forgetless.models.adapters import adapters_disabled, has_adapters, is_peft_model


@dataclass
class KLConfig:
    """Distillation to the model as it was before training."""

    weight: float = option(1.0, "Multiplier of the KL term (0.1-10 typical; higher keeps the model closer to the base).")
    temperature: float = option(1.0, "Softmax temperature T of both distributions; the term is scaled by T² (Hinton).")
    data: Optional[DatasetSpec] = option(
        None,
        "'train' or null: KL on the training batch. A dataset (old-task or general data): KL on a micro-batch "
        "of it per training micro-batch (extra forward passes), scaled to the same per-token mean.",
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


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · Σ_rows KL(softmax(teacher/T) ‖ softmax(student/T)) for logits of shape (rows, vocab)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") * temperature**2


def _base_is_frozen(model) -> bool:
    """Whether ``adapters_disabled`` still gives the *original* model: only adapter weights train."""
    if not is_peft_model(model):
        return True  # forgetless's adapter kinds freeze the base model themselves
    prefix = getattr(model.base_model, "prefix", "lora_")
    return all(prefix in n or "modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)


class KL(Method):
    name = "kl"

    def __init__(self, cfg: KLConfig):
        self.cfg = cfg
        self.teacher = None  # the frozen copy; stays None when adapters give the base outputs
        self.general: list = []
        self.order: list[int] = []
        self.cursor = 0  # micro-batches of KL data drawn so far (the same count on every process)

    def before_train(self, model, ctx: Context) -> None:
        self.pad_id = ctx.tokenizer.pad_token_id
        self.accelerator = ctx.accelerator
        if not (has_adapters(model) and _base_is_frozen(model)):
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False).to(ctx.device)
        if not uses_train_batch(self.cfg.data):
            self.general = ctx.load_dataset(self.cfg.data)
            g = torch.Generator().manual_seed(ctx.seed)
            self.order = torch.randperm(len(self.general), generator=g).tolist()
            self.micro, self.accum = ctx.cfg.train.micro_batch_size, ctx.cfg.train.grad_accum_steps
            acc = ctx.accelerator
            self.rank, self.world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)

    @torch.no_grad()
    def teacher_logits(self, model, input_ids, attention_mask) -> torch.Tensor:
        autocast = self.accelerator.autocast() if self.accelerator is not None else nullcontext()
        if self.teacher is not None:
            with autocast:
                return self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        was_training = model.training
        model.eval()
        try:
            with adapters_disabled(model), autocast:
                return model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            model.train(was_training)

    def _general_batch(self, device) -> dict[str, torch.Tensor]:
        """This process's next micro-batch of the KL data.

        Chunks are numbered like the micro-batches of the global batch (process ``r`` holds its
        ``r``-th contiguous share), so N processes pair the same KL chunk with the same training
        micro-batch as one process with N times the accumulation steps.
        """
        n = len(self.general)
        step, j = divmod(self.cursor, self.accum)
        start = (step * self.world * self.accum + self.rank * self.accum + j) * self.micro
        self.cursor += 1
        picked = [self.general[self.order[(start + k) % n]] for k in range(self.micro)]
        return {k: v.to(device) for k, v in collate(picked, self.pad_id).items()}

    def batch_terms(self, model, batch, logits):
        n_targets = int((batch["labels"][:, 1:] != IGNORE).sum())
        if self.general:
            batch = self._general_batch(logits.device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if self.cfg.positions == "targets":
            select = batch["labels"][:, 1:] != IGNORE
        else:
            select = batch["attention_mask"][:, 1:] == 1
        n_selected = int(select.sum())
        if n_selected == 0:
            return {"kl": logits.sum() * 0.0}
        teacher = self.teacher_logits(model, batch["input_ids"], batch["attention_mask"])
        total = kl_sum(logits[:, :-1][select], teacher[:, :-1][select], self.cfg.temperature)
        if self.general or self.cfg.positions == "all":
            total = total * (n_targets / n_selected)
        return {"kl": self.cfg.weight * total}

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state.get("cursor", 0))

    def describe(self) -> dict:
        return {
            "teacher": "frozen copy" if self.teacher is not None else "adapters disabled (no copy)",
            "data": "train" if uses_train_batch(self.cfg.data) else self.cfg.data.path,
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
    provides={STARTS_AT_BASE: ""},
)
