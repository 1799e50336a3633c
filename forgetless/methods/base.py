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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

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


@dataclass
class MethodSpec:
    name: str
    config: type  # a documented dataclass
    build: Callable[[Any], Method]
    summary: str
    order: int  # models are wrapped in increasing order (freeze before adapters)
    incompatible: dict[str, str]  # other method -> why they cannot run together


REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    config: type,
    build: Callable[[Any], Method],
    summary: str,
    order: int = 50,
    incompatible: Optional[dict[str, str]] = None,
) -> None:
    """Make a method available as ``methods.NAME``; ``order`` sets when it wraps the model."""
    REGISTRY[name] = MethodSpec(name, config, build, summary, order, dict(incompatible or {}))


def trainable_named_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
