"""What an anti-forgetting method is: a small plugin with optional hooks.

A method lives in one file (or folder) of this package and registers itself once at its bottom
(:func:`forgetless.registry.register`: name, config dataclass, this class, a summary, its phase
and what it provides). The training recipe (forgetless/recipes/finetune.py) calls the hooks of
every enabled method at fixed points, in phase order (select, adapt, regularize, data)::

    wrap_model(model, ctx)        -> model     freeze, add LoRA / adapters / experts (before training);
                                               parameters it adds must carry the method's prefix
    extra_sources(ctx)            -> [Source]  data streams mixed into every batch (general data, replay)
    paired_data(ctx)              -> examples  data of the method's own, drawn every step like the
                                               training batch (seeded, sharded and micro-batched the
                                               same way) and handed to paired_terms
    before_train(model, ctx)                   snapshot anchors, compute Fisher, set up a teacher
    bind(model, ctx)                           after accelerate's prepare(), which may replace the
                                               parameter objects (FSDP2): look parameters up again
                                               and shard per-parameter tensors like them
                                               (forgetless/sharding.py); also on a resumed run
    batch_terms(model, batch, out) -> {name: tensor}
                                               a loss term summed over the batch's target tokens;
                                               the recipe normalises it like the LM loss
    paired_terms(model, batch, out) -> {name: tensor}
                                               a term summed over ``paired_count(batch)`` positions of
                                               a micro-batch of paired_data; the recipe divides by
                                               the step's total count over all processes (a mean)
    step_terms(model)             -> {name: tensor}
                                               a loss term added once per optimiser step (penalties
                                               on the weights, which do not depend on the batch)
    reference_data(ctx)           -> Reference | None
                                               named groups of examples whose gradients constrain
                                               the step (A-GEM's memory, GEM's tasks): every step the
                                               recipe draws a batch of each group (seeded, sharded,
                                               micro-batched like the training batch) and computes
                                               its token-mean LM gradient, before the step's own
    edit_gradients(params, references) -> {name: float}
                                               change the accumulated gradients of the trainable
                                               ``params`` in place, given each group's reference
                                               gradient (a list aligned with ``params``), before
                                               clipping and the optimiser step; returns facts to log
    configure_optimizer(optimizer)             e.g. register step hooks that constrain the update
                                               (MoFO); called once, before accelerate prepares it
    after_train(model, ctx)                    e.g. save generated data (ctx.save_artifact)
    state_dict() / load_state_dict(state)      what must survive a resume (JSON-able / tensors)
    describe()                    -> dict      facts for the run summary

and, between the tasks of a sequence (forgetless/recipes/continual.py)::

    next_task(options, link)      -> options | None
                                               the options of the next task's run, given the previous
                                               run directory (``link.previous``): e.g. replay grows its
                                               memory from it, online EWC takes its Fisher; None
                                               leaves the method out of that task (say why with
                                               ``link.note``)

(``model`` in the batch hooks is unwrapped from DDP; the recipe runs the forward passes itself.
``out`` is the forward pass's :class:`forgetless.loss.Outputs`: the last hidden states and the
output head, not the full logits (a real vocabulary makes them gigabytes); ``out.logits_at(select)``
gives the logits of chosen positions, :func:`forgetless.loss.kl_sum_chunked` a KL in chunks.
A term hook returns the same names on every call, zero-valued terms included: the recipe reduces
the terms of all processes in one tensor.)
A method *returns* named loss terms instead of adding to a shared loss, so every term is logged
(``metrics.jsonl``: ``terms``) and can be tested on its own. The defaults below do nothing; a
method overrides only the hooks it needs. Methods see a narrow :class:`Context`, never the run's
whole config or the accelerator.

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

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch

from forgetless.data.batching import count_targets
from forgetless.data.encoding import encode_dataset
from forgetless.data.formats import Encoder
from forgetless.files import write_atomic
from forgetless.loss import Outputs


@dataclass
class Context:
    """What the recipe hands to methods: the run's facts they may use, and nothing else."""

    tokenizer: Any
    encoder: Any  # forgetless.data.formats.Encoder: tokenizes records like the training data
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    is_main: bool = True  # the process that writes files
    rank: int = 0
    world: int = 1
    keep: Optional[Any] = None  # the DatasetSpec of the first data.keep set: what to protect by default
    train_examples: list = field(default_factory=list)
    resume_state: Optional[dict] = None  # method name -> its state_dict() in the checkpoint resumed from
    run_dir: Optional[Path] = None  # set once the run directory exists (after the setup hooks); use save_artifact
    autocast: Callable[[], ContextManager] = nullcontext  # the run's mixed-precision context
    micro_batch_size: int = 8  # train.micro_batch_size: examples per forward pass a method may run

    @classmethod
    def build(cls, cfg, tokenizer, accelerator=None, run_dir: Optional[Path] = None, train_examples=(), seed: Optional[int] = None,
              resume_state: Optional[dict] = None) -> "Context":
        """The context of a run of ``cfg`` (a RunConfig); ``accelerator`` None: one CPU process."""
        keep = next(iter(cfg.data.keep.values()), None)
        acc = accelerator
        return cls(
            tokenizer=tokenizer,
            encoder=Encoder(tokenizer, cfg.data),
            seed=cfg.train.seed if seed is None else seed,
            device=acc.device if acc is not None else torch.device("cpu"),
            is_main=acc.is_main_process if acc is not None else True,
            rank=acc.process_index if acc is not None else 0,
            world=acc.num_processes if acc is not None else 1,
            keep=keep,
            train_examples=train_examples if hasattr(train_examples, "__getitem__") else list(train_examples),  # an Arrow table stays one
            resume_state=resume_state,
            run_dir=run_dir,
            autocast=acc.autocast if acc is not None else nullcontext,
            micro_batch_size=cfg.train.micro_batch_size,
        )

    def restored(self, name: str) -> Optional[dict]:
        """The state method ``name`` saved in the checkpoint this run resumes from (None on a fresh run)."""
        return None if self.resume_state is None else self.resume_state.get(name)

    def load_dataset(self, spec) -> list:
        """Examples of a DatasetSpec, tokenized like the training data."""
        examples, _ = encode_dataset(self.encoder, [spec])
        return examples

    def save_artifact(self, name: str, write: Callable[[Path], None]) -> Optional[Path]:
        """Write the run-directory file ``name`` with ``write(path)``, atomically, on the main process only.

        Returns its path (None where nothing is written: another process, or no run directory).
        """
        if self.run_dir is None or not self.is_main:
            return None
        return write_atomic(self.run_dir / name, write)


@dataclass
class Reference:
    """What ``Method.reference_data`` returns: the groups whose gradients constrain each step."""

    groups: dict[str, list]  # group name -> examples (tokenized like the training data)
    batch: Optional[int] = None  # examples drawn from each group per step (None: the global batch)


@dataclass
class TaskLink:
    """What the next task of a sequence may take from the one before (see ``Method.next_task``)."""

    index: int  # the next task's number, 1-based
    previous: Optional[Path]  # the run directory of task index-1 (None before the first task)
    previous_train: list = field(default_factory=list)  # DatasetSpecs of task index-1's training data
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        """Say why a method does something unexpected for this task (shown in strategy.json's notes)."""
        self.notes.append(text)


class Method:
    """No-op hooks; a method overrides the ones it needs (see the module docstring)."""

    name = "method"
    # The multiplier of every loss term the method returns (the recipe applies it). A forgetting
    # budget's controller moves it for methods that declare STRENGTH (forgetless/recipes/budget.py).
    strength = 1.0

    def wrap_model(self, model, ctx: Context):
        return model

    def extra_sources(self, ctx: Context) -> list:
        return []

    def paired_data(self, ctx: Context) -> Optional[list]:
        return None

    def before_train(self, model, ctx: Context) -> None:
        pass

    def bind(self, model, ctx: Context) -> None:
        pass

    def batch_terms(self, model, batch: dict[str, torch.Tensor], out: Outputs) -> dict[str, torch.Tensor]:
        return {}

    def paired_count(self, batch: dict[str, torch.Tensor]) -> int:
        """Positions a paired term of ``batch`` is summed over (the step's mean divides by their total)."""
        return count_targets(batch["labels"])

    def paired_terms(self, model, batch: dict[str, torch.Tensor], out: Outputs) -> dict[str, torch.Tensor]:
        return {}

    def step_terms(self, model) -> dict[str, torch.Tensor]:
        return {}

    def reference_data(self, ctx: Context) -> Optional[Reference]:
        return None

    def edit_gradients(self, params: list, references: dict[str, list]) -> dict[str, float]:
        return {}

    def configure_optimizer(self, optimizer) -> None:
        pass

    def after_train(self, model, ctx: Context) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        """Facts about the method for the run summary (e.g. which blocks it froze)."""
        return {}

    @classmethod
    def next_task(cls, options, link: TaskLink):
        """The options of the method for the next task of a sequence (None: leave it out of that task)."""
        return options


def trainable_named_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
