"""A-GEM and GEM: the step's gradient projected so that it does not raise the loss on a memory of old data.

A-GEM (Chaudhry et al., 2019, "Efficient Lifelong Learning with A-GEM", arXiv 1812.00420): with
``g`` the step's gradient and ``r`` the gradient of the LM loss on a batch drawn from the memory,

    g̃ = g − (gᵀr / rᵀr) · r    if gᵀr < 0,      else g̃ = g,

so ``g̃ᵀr ≥ 0``: to first order the update does not increase the memory's loss, and when the two
agree the step is plain SGD/Adam on ``g``. GEM (Lopez-Paz & Ranzato, 2017, "Gradient Episodic
Memory", arXiv 1706.08840) keeps one constraint per earlier task, ``g̃ᵀr_k ≥ 0`` for every task
``k`` of the memory, with ``g̃`` the closest gradient to ``g`` that meets them all: the quadratic
programme's dual, ``min_{v ≥ 0} ½ vᵀ(RRᵀ)v + vᵀ(Rg)``, is solved by coordinate descent (a few
earlier tasks: a k x k problem; written here because no maintained library ships it for torch
parameters; Avalanche's GEM calls quadprog on numpy copies of the gradients), and
``g̃ = g + Rᵀv``.

The memory is chosen exactly like replay's (forgetless/methods/replay.py: reservoir or per-task
quotas over ``memory`` datasets and a ``previous`` memory file) and grows the same way over a task
sequence; unlike replay it is not trained on, it only constrains the direction of each step.
Every step the recipe computes the reference gradient(s) on a fresh seeded batch of the memory
(``Method.reference_data``), then the step's gradient, then calls :meth:`AGEM.edit_gradients`
before clipping and the optimiser step. Cost: one extra forward and backward per step on the
memory batch (per task for GEM) and one copy of the trainable gradients per reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from forgetless.config import DatasetSpec, option
from forgetless.errors import ConfigError
from forgetless.methods.base import Context, Method, Reference
from forgetless.methods.replay import Replay, ReplayConfig
from forgetless.registry import DATA, STARTS_AT_BASE, register

MEMORY_FILE = "gradient_memory.jsonl"


@dataclass
class AGEMConfig:
    """Gradient projection on a memory of old data (A-GEM, or GEM with one constraint per task)."""

    memory: list[DatasetSpec] = option(factory=list, help="Old tasks' data to build the memory from; each dataset is one task.")
    previous: Optional[DatasetSpec] = option(None, f"The {MEMORY_FILE} of an earlier run (or that run's directory) to continue from.")
    mode: Literal["agem", "gem"] = option("agem", "'agem': one constraint, the gradient on a batch of the whole memory; "
                                          "'gem': one constraint per task of the memory (one extra backward per task and step).")
    batch: Optional[int] = option(None, "Memory examples per reference gradient and step (per task for gem); null: the global batch.")
    policy: Literal["reservoir", "per_task"] = option("reservoir", "How the memory is chosen, as methods.replay.policy.")
    size_examples: Optional[int] = option(None, "Memory size in examples (give this or size_tokens).")
    size_tokens: Optional[int] = option(None, "Memory size in tokens of the tokenized examples (give this or size_examples).")

    def replay_config(self) -> ReplayConfig:
        """The memory's choice, as replay makes it (the ratio is unused: the memory is not trained on)."""
        return ReplayConfig(memory=list(self.memory), previous=self.previous, ratio=0.5, policy=self.policy,
                            size_examples=self.size_examples, size_tokens=self.size_tokens)

    def validate(self, where: str) -> None:
        if not self.memory and self.previous is None:
            raise ConfigError(f"{where}: nothing to remember; give {where}.memory (old tasks' data) or {where}.previous (a {MEMORY_FILE})")
        self.validate_in_sequence(where)

    def validate_in_sequence(self, where: str) -> None:
        self.replay_config().validate_in_sequence(where)
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"{where}.batch must be at least 1 (memory examples per step), got {self.batch}")


class GradientMemory(Replay):
    """Replay's memory, saved under its own name (a run may hold a replay memory as well)."""

    name = "agem"
    memory_file = MEMORY_FILE


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def agem_project(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[bool, float]:
    """A-GEM's projection of ``grads`` (in place) against ``reference``; (whether it projected, gᵀr before)."""
    dot, norm = _dot(grads, reference), _dot(reference, reference)
    if dot >= 0 or norm == 0:
        return False, dot
    for g, r in zip(grads, reference):
        g.sub_(r.to(g.dtype), alpha=dot / norm)
    return True, dot


def gem_dual(gram: torch.Tensor, q: torch.Tensor, sweeps: int = 10_000, tol: float = 1e-12) -> torch.Tensor:
    """``argmin_{v ≥ 0} ½ vᵀ·gram·v + qᵀv`` by cyclic coordinate descent (exact per coordinate; converges
    for a positive semi-definite ``gram``)."""
    gram, q = gram.double(), q.double()
    v = torch.zeros_like(q)
    for _ in range(sweeps):
        biggest = 0.0
        for j in range(len(q)):
            if gram[j, j] <= 0:
                continue
            new = max(0.0, float(v[j] - (gram[j] @ v + q[j]) / gram[j, j]))
            biggest = max(biggest, abs(new - float(v[j])))
            v[j] = new
        if biggest <= tol * max(1.0, float(v.abs().max())):
            break
    return v


def gem_project(grads: list[torch.Tensor], references: list[list[torch.Tensor]]) -> tuple[int, list[float]]:
    """GEM's projection of ``grads`` (in place): the closest gradient with a non-negative dot product
    with every reference; (constraints violated before, the dot products before)."""
    dots = [_dot(grads, r) for r in references]
    violated = sum(d < 0 for d in dots)
    if not violated:
        return 0, dots
    k = len(references)
    gram = torch.tensor([[_dot(references[i], references[j]) for j in range(k)] for i in range(k)], dtype=torch.float64)
    v = gem_dual(gram, torch.tensor(dots, dtype=torch.float64))
    for weight, ref in zip(v.tolist(), references):
        if weight:
            for g, r in zip(grads, ref):
                g.add_(r.to(g.dtype), alpha=weight)
    return violated, dots


class AGEM(Method):
    name = "agem"

    def __init__(self, cfg: AGEMConfig):
        self.cfg = cfg
        self.memory = GradientMemory(cfg.replay_config())
        self.steps = 0
        self.projected = 0

    def reference_data(self, ctx: Context) -> Reference:
        state = ctx.restored(self.name)
        if state is not None:  # resuming: the memory and the counts the run had
            self.load_state_dict(state)
        else:
            self.memory.take_memory(ctx)
        if self.cfg.mode == "agem":
            return Reference({"memory": [c.example for c in self.memory.memory]}, self.cfg.batch)
        tasks: dict[str, list] = {}
        for c in self.memory.memory:
            tasks.setdefault(c.task, []).append(c.example)
        return Reference(tasks, self.cfg.batch)

    def edit_gradients(self, params: list, references: dict[str, list]) -> dict[str, float]:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self.steps += 1
        if self.cfg.mode == "agem":
            (reference,) = references.values()
            norms = (_dot(grads, grads) * _dot(reference, reference)) ** 0.5
            projected, dot = agem_project(grads, reference)
            facts = {"agem_projected": float(projected), "agem_cosine": dot / norms if norms else 0.0}
        else:
            violated, _ = gem_project(grads, list(references.values()))
            projected = bool(violated)
            facts = {"gem_violated": float(violated), "gem_projected": float(projected)}
        self.projected += projected
        if projected:  # a parameter without a gradient this step gets the projection's share (else it is left alone)
            for p, g in zip(params, grads):
                if p.grad is None:
                    p.grad = g
        return facts

    def state_dict(self) -> dict:
        return {**self.memory.state_dict(), "steps": self.steps, "projected": self.projected}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state)
        self.steps, self.projected = int(state["steps"]), int(state["projected"])

    def after_train(self, model, ctx: Context) -> None:
        self.memory.after_train(model, ctx)

    @classmethod
    def next_task(cls, options: AGEMConfig, link) -> Optional[AGEMConfig]:
        """The memory grows over the sequence as replay's does (the previous memory plus the previous task's data)."""
        return GradientMemory.next_task(options, link)

    def describe(self) -> dict:
        return {"mode": self.cfg.mode, **self.memory.describe(), "steps": self.steps, "projected_steps": self.projected}


register(
    "agem",
    AGEMConfig,
    AGEM,
    "A-GEM / GEM: each step's gradient projected so that it does not raise the loss on a memory of old data.",
    phase=DATA,
    provides={STARTS_AT_BASE: ""},
)
