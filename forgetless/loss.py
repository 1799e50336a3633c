"""The token-level language-modelling loss, shared by training and evaluation, without a logits wall.

A causal LM's output head maps every position's hidden state to a vocabulary-sized row of
logits. With a real vocabulary (49,152 for SmolLM2, 128,256 for Llama 3) the full float32 logits
of a 8 x 512 batch take 0.8-2 GB, their log-softmax and its gradient as much again, while the
loss only needs the rows of the target tokens (a completion-only loss has few). So the recipe
never asks the model for its logits:

1. :func:`forward` runs the model with ``logits_to_keep`` set to one position (transformers' own
   knob, 1 x vocab per row) and ``output_hidden_states``, and keeps the last hidden states (after
   the final norm) and the model's output head;
2. :meth:`Outputs.token_loss` and :func:`kl_sum_chunked` apply the head only to the rows that
   are scored, a chunk of rows at a time (``rows x vocab`` at most :data:`CHUNK_ELEMENTS`
   elements), each chunk under ``torch.utils.checkpoint`` so that its logits are freed at once
   and recomputed in the backward pass: peak memory is one chunk's logits, not all of them. Rows
   that fit in one chunk are not checkpointed (keeping one chunk's logits is the same bound).

Written by hand because no maintained library does it on every device: TRL's chunked NLL and
Liger's fused linear cross-entropy are the anchors (Liger's kernels are Triton, CUDA only). The
sums equal the full-logits ones (:func:`token_cross_entropy`, kept as the reference) up to float
summation order; tests hold them to 1e-6.

A model whose head is more than a linear layer on the last hidden state (a final logit
soft-capping, a logit scale) is detected on its first batch, where the head's output at the kept
position is compared with the model's own logits, and is then run the plain way (all logits).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from forgetless.data.formats import IGNORE

# rows x vocabulary of one chunk of logits: 2**25 float32 values = 128 MiB (682 rows of SmolLM2)
CHUNK_ELEMENTS = 2**25
_HEAD_CHECKED = "_forgetless_head_checked"  # attribute set on a model once its head was checked: True/False


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over target tokens, and the per-token correctness.

    Returns ``(loss_sum, correct)`` where ``loss_sum`` is a scalar (a sum, not a mean: callers
    divide by the number of target tokens of the *whole* accumulated batch) and ``correct`` is a
    bool tensor over target tokens (argmax == label). Logits are upcast to float32 for the loss.
    The full-logits form; training and evaluation use :meth:`Outputs.token_loss`.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    flat_logits = shift_logits.reshape(-1, shift_logits.size(-1))
    flat_labels = shift_labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE, reduction="sum")
    mask = flat_labels != IGNORE
    correct = flat_logits[mask].argmax(-1) == flat_labels[mask]
    return loss_sum, correct


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, length - 1) bool: the positions whose next token is a target (logits[t] predicts labels[t + 1])."""
    return labels[:, 1:] != IGNORE


@dataclass
class Outputs:
    """What a forward pass gives the loss: the last hidden states and the head, or (fallback) all logits.

    ``select`` arguments are (batch, length - 1) bool masks over the positions that *predict* a
    token (position t predicts token t + 1), as :func:`target_positions` makes them.
    """

    hidden: Optional[torch.Tensor]  # (batch, length, hidden): the last layer's states, after the final norm
    head: Optional[Callable[[torch.Tensor], torch.Tensor]]  # (rows, hidden) -> (rows, vocab)
    vocab_size: int
    logits: Optional[torch.Tensor] = None  # (batch, length, vocab) when the head cannot be applied apart
    autocast: Callable = nullcontext  # the mixed-precision context the model runs in

    def rows(self, select: torch.Tensor) -> torch.Tensor:
        """The hidden states (or, in the fallback, the logits) of the selected positions: (rows, ·)."""
        source = self.logits if self.logits is not None else self.hidden
        return source[:, :-1][select]

    def logits_at(self, select: torch.Tensor) -> torch.Tensor:
        """The logits of the selected positions, materialised (rows, vocab): for small selections."""
        if self.logits is not None:
            return self.logits[:, :-1][select]
        with self.autocast():
            return self.head(self.rows(select))

    def anchor(self) -> torch.Tensor:
        """A zero that depends on the outputs (a term with no positions still joins the graph)."""
        return (self.logits if self.logits is not None else self.hidden).sum() * 0.0

    def chunk_rows(self) -> int:
        return max(1, CHUNK_ELEMENTS // max(self.vocab_size, 1))

    def token_loss(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_sum, correct)`` of :func:`token_cross_entropy`, the head applied at targets, in chunks."""
        select = target_positions(labels)
        targets = labels[:, 1:][select]
        if self.logits is not None:
            rows = self.logits[:, :-1][select].float()
            return F.cross_entropy(rows, targets, reduction="sum"), rows.argmax(-1) == targets
        rows = self.rows(select)
        loss = rows.sum().float() * 0.0  # in the graph even with no targets (a step of masked rows backpropagates zeros)
        correct = []
        step = self.chunk_rows()
        with self.autocast():
            for start in range(0, rows.shape[0], step):
                part_loss, part_correct = _run_chunk(_ce_chunk, self.head, rows[start : start + step], targets[start : start + step],
                                                     keep=rows.shape[0] <= step)
                loss = loss + part_loss
                correct.append(part_correct)
        return loss, torch.cat(correct) if correct else targets.new_zeros(0, dtype=torch.bool)


    @torch.no_grad()
    def token_losses(self, labels: torch.Tensor) -> torch.Tensor:
        """(targets,) each target token's cross-entropy, in ``target_positions`` order; no gradient."""
        select = target_positions(labels)
        targets = labels[:, 1:][select]
        if self.logits is not None:
            return F.cross_entropy(self.logits[:, :-1][select].float(), targets, reduction="none")
        rows, step, parts = self.rows(select), self.chunk_rows(), []
        with self.autocast():
            for start in range(0, rows.shape[0], step):
                parts.append(F.cross_entropy(self.head(rows[start : start + step]).float(), targets[start : start + step], reduction="none"))
        return torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.float32)

    def weighted_loss(self, labels: torch.Tensor, weigh) -> torch.Tensor:
        """``sum_t w_t * loss_t`` over the target tokens, without gradient through the weights.

        ``weigh`` is either a function ``(logits, targets) -> w`` evaluated per chunk (weights that
        depend on the model's own outputs, e.g. DFT's detached target probability) or a tensor of
        one weight per target token, in the order of ``labels[:, 1:][target_positions(labels)]``
        (weights known before the forward, e.g. FLOW's per-example ones). The head is applied at
        the targets in chunks, like :meth:`token_loss`."""
        select = target_positions(labels)
        targets = labels[:, 1:][select]
        if self.logits is not None:
            rows = self.logits[:, :-1][select].float()
            return _weighted_chunk(None, rows, targets, weigh, pre_applied=True)
        rows = self.rows(select)
        total = rows.sum().float() * 0.0
        step = self.chunk_rows()
        with self.autocast():
            for start in range(0, rows.shape[0], step):
                part = weigh[start : start + step] if torch.is_tensor(weigh) else weigh
                total = total + _run_chunk(_weighted_chunk, self.head, rows[start : start + step], targets[start : start + step], part,
                                           keep=rows.shape[0] <= step)
        return total


def _weighted_chunk(head, hidden: torch.Tensor, targets: torch.Tensor, weigh, pre_applied: bool = False) -> torch.Tensor:
    logits = hidden if pre_applied else head(hidden).float()
    if torch.is_tensor(weigh):
        w = weigh.detach().to(logits.device, torch.float32)
    else:
        with torch.no_grad():
            w = weigh(logits.detach(), targets)
    return (w * F.cross_entropy(logits, targets, reduction="none")).sum()


def _ce_chunk(head, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum"), logits.argmax(-1) == targets


def _kl_chunk(head, student: torch.Tensor, teacher_head, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        t = F.log_softmax(teacher_head(teacher).float() / temperature, dim=-1)
    s = F.log_softmax(head(student).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum")


def _run_chunk(fn, head, *args, keep: bool = False):
    """``fn(head, *args)``; under checkpointing when a gradient will flow, so that its logits are
    not kept, unless ``keep`` (the rows are a single chunk: keeping its logits costs no more than
    one chunk, and recomputing them would)."""
    if not keep and torch.is_grad_enabled() and args[0].requires_grad:
        return checkpoint(fn, head, *args, use_reentrant=False)
    return fn(head, *args)


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · Σ_rows KL(softmax(teacher/T) ‖ softmax(student/T)) for logits of shape (rows, vocab)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") * temperature**2


def kl_sum_chunked(student: Outputs, teacher: Outputs, select: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`kl_sum` over the selected positions of two forward passes, the heads applied in chunks.

    The teacher's chunk of logits is computed inside the student's checkpointed chunk (and again
    in the backward pass) instead of being kept: the teacher costs one chunk of memory too.
    """
    if student.logits is not None or teacher.logits is not None:
        return kl_sum(student.logits_at(select), teacher.logits_at(select), temperature)
    s_rows, t_rows = student.rows(select), teacher.rows(select)
    total = s_rows.sum().float() * 0.0
    step = student.chunk_rows()
    with student.autocast():
        for start in range(0, s_rows.shape[0], step):
            end = start + step
            total = total + _run_chunk(_kl_chunk, student.head, s_rows[start:end], teacher.head, t_rows[start:end], temperature,
                                       keep=s_rows.shape[0] <= step)
    return total * temperature**2


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, head_of=None, autocast: Callable = nullcontext,
            position_ids: Optional[torch.Tensor] = None) -> Outputs:
    """Run ``model`` (possibly DDP-wrapped) for the loss: hidden states and head, no full logits.

    ``head_of`` is the unwrapped model whose output head to use (default: ``model`` itself);
    ``autocast`` the mixed-precision context the head is applied in (the recipe's). A packed batch
    (``position_ids`` given, forgetless/data/batching.py) runs without the attention mask, so that
    transformers keeps its examples apart by their position ids.
    """
    plain = head_of if head_of is not None else model
    inputs = {"input_ids": input_ids}
    inputs.update({"position_ids": position_ids, "use_cache": False} if position_ids is not None else {"attention_mask": attention_mask})
    if not _head_usable(plain):
        logits = model(**inputs).logits
        return Outputs(None, None, logits.shape[-1], logits=logits, autocast=autocast)
    keep = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
    out = model(**{**inputs, "use_cache": False}, logits_to_keep=keep, output_hidden_states=True)
    hidden, head = out.hidden_states[-1], plain.get_output_embeddings()
    if getattr(plain, _HEAD_CHECKED, None) is None:  # first batch: is the head alone the model's logits?
        with torch.no_grad(), autocast():
            mine = head(hidden[:, -1].detach()).float()
        theirs = out.logits[:, -1].detach().float()
        ok = mine.shape == theirs.shape and torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4)
        setattr(plain, _HEAD_CHECKED, bool(ok))
        if not ok:
            return forward(model, input_ids, attention_mask, head_of=head_of, autocast=autocast, position_ids=position_ids)
    return Outputs(hidden, head, out.logits.shape[-1], autocast=autocast)


def use_full_logits(model) -> None:
    """Run ``model`` the plain way from now on (its own full logits, no head applied apart).

    For FSDP2: applying the output head outside the root module's forward (to the hidden states it
    returned) crashes its backward pass, so a sharded model pays for its full logits.
    """
    setattr(model, _HEAD_CHECKED, False)


def _head_usable(plain) -> bool:
    """Whether the model takes ``logits_to_keep`` and has a head to apply (and passed the first-batch check)."""
    checked = getattr(plain, _HEAD_CHECKED, None)
    if checked is not None:
        return checked
    if not hasattr(plain, "get_output_embeddings") or plain.get_output_embeddings() is None:
        return False
    base = plain.get_base_model() if hasattr(plain, "get_base_model") else plain
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params


@torch.no_grad()
def check_packing(model, examples, pad_id: int) -> None:
    """Refuse ``data.packing`` for a model that lets packed examples see each other.

    Two examples are run packed in one row and the second alone: with its position ids restarting,
    a model whose attention follows them (transformers' models that build their mask with
    ``create_causal_mask``) gives the second the same hidden states both ways. One forward of two
    short examples, once per run.
    """
    from forgetless.data.batching import collate, collate_packed
    from forgetless.errors import ConfigError

    if len(examples) < 2:
        return
    first, second = sorted(examples[:64], key=lambda e: len(e.input_ids))[:2]
    device = next(model.parameters()).device
    packed = {k: v.to(device) for k, v in collate_packed([[first, second]], pad_id).items()}
    alone = {k: v.to(device) for k, v in collate([second], pad_id).items()}
    was_training = model.training
    model.eval()
    try:
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False, output_hidden_states=True)
        single = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"], use_cache=False, output_hidden_states=True)
    finally:
        model.train(was_training)
    n = len(second.input_ids)
    a = together.hidden_states[-1][0, len(first.input_ids) : len(first.input_ids) + n].float()
    b = single.hidden_states[-1][0, :n].float()
    if not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * max(1.0, float(b.abs().max()))):
        raise ConfigError(
            f"data.packing: this model ({type(model).__name__}) lets the examples packed in a row attend to each other "
            f"(its attention ignores the restarting position ids); set data.packing=false"
        )
