"""What an anti-forgetting method is: a small plugin with optional hooks.

The training recipe calls the hooks of every enabled method at fixed points::

    wrap_model(model, ctx)        -> model     freeze, add LoRA / adapters / experts (before training)
    extra_sources(ctx)            -> [Source]  data streams mixed into every batch (general data, replay)
    before_train(model, ctx)                   snapshot anchors, compute Fisher, set up a teacher
    batch_terms(model, batch, logits) -> {name: tensor}   (model: unwrapped from DDP)
                                               a loss term summed over the batch's target tokens;
                                               the recipe normalises it like the LM loss
    step_terms(model)             -> {name: tensor}
                                               a loss term added once per optimiser step (penalties
                                               on the weights, which do not depend on the batch)
    after_train(model, ctx)                    e.g. save generated data, merge weights
    state_dict() / load_state_dict(state)      what must survive a resume (JSON-able / tensors)

A method *returns* named loss terms instead of adding to a shared loss, so every term is logged
(``metrics.jsonl``: ``terms``) and can be tested on its own. The defaults below do nothing; a
method overrides only the hooks it needs.

Resume (forgetless/checkpoint.py). Every checkpoint saves each method's ``state_dict()``: a flat
dict whose values are tensors (saved in safetensors) or JSON values (numbers, strings, bools,
None, lists and dicts of those); nothing is pickled. A resumed run builds everything again from
the same config and seed, and:

- ``ctx.restored(name)`` gives the saved state to every setup hook (``wrap_model``,
  ``extra_sources``, ``before_train``), so a method takes back what is expensive or random to
  recompute (generated samples, a Fisher, importance scores, a replay memory) instead of
  recomputing it. It is None on a fresh run.
- the recipe then calls ``load_state_dict(state)`` once, after ``before_train`` and before the
  checkpoint's weights, optimiser and RNG states are loaded (so ``before_train`` still sees the
  starting weights, e.g. to copy a teacher). It must restore everything ``state_dict`` saved and
  may be called from a setup hook as well (it is idempotent).

Trainable parameters, and parameters a method adds to the model (adapters, experts, frozen
earlier LoRAs), are saved with the model; a method needs to save only what lives outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch


@dataclass
class Context:
    """What the recipe hands to methods."""

    cfg: Any  # RunConfig
    tokenizer: Any
    encoder: Any  # forgetless.data.formats.Encoder
    accelerator: Any
    run_dir: Optional[Path]
    train_examples: list = field(default_factory=list)
    seed: int = 0
    resume_state: Optional[dict] = None  # method name -> its state_dict() in the checkpoint resumed from

    def restored(self, name: str) -> Optional[dict]:
        """The state method ``name`` saved in the checkpoint this run resumes from (None on a fresh run)."""
        return None if self.resume_state is None else self.resume_state.get(name)

    def load_dataset(self, spec) -> list:
        """Examples of a DatasetSpec, tokenized like the training data."""
        from forgetless.recipes.finetune import encode_dataset

        examples, _ = encode_dataset(self.encoder, [spec])
        return examples

    @property
    def device(self) -> torch.device:
        return self.accelerator.device if self.accelerator is not None else torch.device("cpu")


class Method:
    """No-op hooks; a method overrides the ones it needs (see the module docstring)."""

    name = "method"

    def wrap_model(self, model, ctx: Context):
        return model

    def extra_sources(self, ctx: Context) -> list:
        return []

    def before_train(self, model, ctx: Context) -> None:
        pass

    def batch_terms(self, model, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def step_terms(self, model) -> dict[str, torch.Tensor]:
        return {}

    def after_train(self, model, ctx: Context) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        """Facts about the method for the run summary (e.g. which blocks it froze)."""
        return {}


def trainable_named_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
