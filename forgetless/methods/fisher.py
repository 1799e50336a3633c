"""Diagonal Fisher information of a causal LM's trainable parameters, from per-example gradients.

    F_i = 1/N  sum_n  (d l_n / d theta_i)^2

where ``l_n`` is the mean next-token cross-entropy over example ``n``'s target tokens (labels
shifted as in :mod:`forgetless.loss`). It is the mean of *squared per-example* gradients, not the
square of the mean gradient (which vanishes near a minimum).

Two kinds (van de Ven 2025, "On the computation of the Fisher information in continual
learning", arXiv 2502.11756, shows they change EWC's behaviour and its best strength):

- ``empirical``: the gradients of the loss of the dataset's own labels. Near zero on examples the
  model already fits well.
- ``sampled`` (the "true" Fisher, estimated with one sample): at every target position a label is
  drawn from the model's own predictive distribution given the data's prefix (teacher forcing,
  seeded), and the gradient is taken of the loss of those labels.

Per-example gradients come from ``torch.func``: ``vmap(grad(functional_call(...)))`` over chunks
of examples (it holds ``chunk_size x trainable parameters`` gradients at once). :func:`fisher_loop`
is the slow reference, one backward per example; :func:`diagonal_fisher` falls back to it (with a
warning) for models that ``vmap`` cannot run.

This module is a helper of :mod:`forgetless.methods.ewc`; it registers no method.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.nn.functional as F

from forgetless.data.batching import chunks, collate
from forgetless.data.formats import IGNORE, Example

FisherKind = Literal["empirical", "sampled"]
FISHER_KINDS = ("empirical", "sampled")
_warned_fallback = False


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one sequence (logits [T, V], labels [T])."""
    targets = labels[1:]
    loss_sum = F.cross_entropy(logits[:-1].float(), targets, ignore_index=IGNORE, reduction="sum")
    return loss_sum / (targets != IGNORE).sum()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _accumulators(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for n, p in params.items()}


def fisher_loop(model, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Reference implementation: one forward and backward per example (labels as given)."""
    params = trainable(model)
    names, tensors = list(params), list(params.values())
    sums = _accumulators(params)
    device = _device(model)
    for e in examples:
        ids = torch.tensor([e.input_ids], device=device)
        labels = torch.tensor(e.labels, device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0]
        grads = torch.autograd.grad(_example_loss(logits, labels), tensors, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                sums[n] += g.to(sums[n].dtype) ** 2
    return {n: s / max(len(examples), 1) for n, s in sums.items()}


def fisher_vmap(model, examples: list[Example], pad_id: int, chunk_size: int = 8) -> dict[str, torch.Tensor]:
    """Vectorised implementation: per-example gradients of a chunk at once with torch.func."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in trainable(model).items()}
    sums = _accumulators(params)
    device = _device(model)

    def loss(p, ids, labels):
        # One right-padded sequence, run without an attention mask: under causal attention a real
        # position never sees the padding after it, and padded positions carry no label. (Building
        # a padding mask inside vmap hits data-dependent branches in transformers' mask code.)
        logits = functional_call(model, p, (), {"input_ids": ids[None], "use_cache": False}).logits[0]
        return _example_loss(logits, labels)

    per_example_grads = vmap(grad(loss), in_dims=(None, 0, 0))
    with warnings.catch_warnings(), _input_grad_hooks_removed(model):
        # functorch warns when an op (e.g. CPU flash attention) has no batching rule and is run
        # one example at a time; the result is still exact.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        for group in chunks(examples, chunk_size):
            b = collate(group, pad_id)
            grads = per_example_grads(params, b["input_ids"].to(device), b["labels"].to(device))
            for n, g in grads.items():
                sums[n] += (g.to(sums[n].dtype) ** 2).sum(0)
            del grads
    return {n: s / max(len(examples), 1) for n, s in sums.items()}


@contextmanager
def _input_grad_hooks_removed(model) -> Iterator[None]:
    """Without transformers' ``enable_input_require_grads`` hook (installed with gradient checkpointing).

    It calls ``requires_grad_`` on the embeddings' output, which torch.func transforms refuse; the
    per-example gradients do not need it. (Checkpointing itself is off in eval mode.)
    """
    hooked = [m for m in model.modules() if getattr(m, "_require_grads_hook", None) is not None]
    for m in hooked:
        m.disable_input_require_grads()
    try:
        yield
    finally:
        for m in hooked:
            m.enable_input_require_grads()


@torch.no_grad()
def sample_labels(model, examples: list[Example], pad_id: int, seed: int, chunk_size: int = 8) -> list[Example]:
    """Copies of ``examples`` whose target tokens are drawn from the model's predictions.

    Each target position gets one label sampled from ``p(. | data prefix)``; positions without a
    target stay masked. One CPU generator seeded with ``seed`` draws them in example order, so
    the result does not depend on the device or the chunk size.
    """
    g = torch.Generator().manual_seed(seed)
    device = _device(model)
    out = []
    for group in chunks(examples, chunk_size):
        b = collate(group, pad_id)
        logits = model(input_ids=b["input_ids"].to(device), use_cache=False).logits  # right padding: no mask needed
        for i, e in enumerate(group):
            labels = torch.tensor(e.labels)
            positions = (labels[1:] != IGNORE).nonzero().squeeze(1)  # logits[t] predicts labels[t + 1]
            probs = logits[i, positions].float().softmax(-1).cpu()
            labels[positions + 1] = torch.multinomial(probs, 1, generator=g).squeeze(1)
            out.append(dataclasses.replace(e, labels=labels.tolist()))
    return out


def diagonal_fisher(
    model,
    examples: list[Example],
    pad_id: int,
    kind: FisherKind = "empirical",
    seed: int = 0,
    chunk_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the model's trainable parameters on ``examples``, by parameter name.

    The model runs in eval mode (no dropout) and is put back in its previous mode. Values are in
    float32 (float64 for a float64 model), on the parameters' device.
    """
    global _warned_fallback
    if kind not in FISHER_KINDS:
        raise ValueError(f"unknown Fisher kind {kind!r}; expected one of {FISHER_KINDS}")
    was_training = model.training
    model.eval()
    try:
        if kind == "sampled":
            examples = sample_labels(model, examples, pad_id, seed, chunk_size)
        try:
            return fisher_vmap(model, examples, pad_id, chunk_size)
        except torch.cuda.OutOfMemoryError:  # a smaller chunk_size helps; the loop would only hide it
            raise
        except (RuntimeError, NotImplementedError) as e:  # what torch.func raises for ops it cannot transform
            if not _warned_fallback:
                warnings.warn(
                    f"per-example gradients with torch.func failed for this model ({str(e).splitlines()[0][:200]}); "
                    "computing the Fisher one example at a time instead (slower)",
                    stacklevel=2,
                )
                _warned_fallback = True
        return fisher_loop(model, examples)
    finally:
        model.train(was_training)
