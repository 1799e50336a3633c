"""Scoring a model on a set of examples: loss, perplexity, token accuracy, exact match, multiple choice.

- ``loss``: mean cross-entropy per target token (completion / assistant tokens for those formats,
  the correct choice's tokens for multiple choice), token-weighted over the whole set;
  ``perplexity`` = exp(loss). The end-of-text token that the encoder appends to text and
  prompt/completion records (what training learns to stop on) is not scored unless
  ``score_eos`` (lm-evaluation-harness' loglikelihood convention).
- ``token_accuracy``: share of target tokens where the argmax prediction is the label.
- ``exact_match``: greedy decoding from the prompt; the answer is the continuation up to the first
  stop token (end-of-text, end-of-turn) and, when every reference of the set is one line, up to
  the first line break after its first character that is not whitespace (lm-eval's
  ``until: ["\\n"]``); answer and reference are then compared after :func:`normalize_answer`.
  Multiple-choice records (the correct choice) are decoded only when the metric is exact_match
  or a scoring function.
- ``contains`` (when it is the set's metric): the same answers, right when the normalised
  reference occurs in the normalised answer as whole words (chat models answer in sentences).
- ``mc_accuracy`` / ``mc_accuracy_norm``: multiple-choice records scored by the log-likelihood of
  each choice (:mod:`forgetless.eval.choice`).
- ``score``: the set's headline metric (:mod:`forgetless.eval.headline`), which may be a user
  scoring function of the generations (:mod:`forgetless.eval.custom`); its extra numbers are
  reported beside it.

The loss pass groups sequences of similar length, longest first, at most ``batch_size`` x the
longest in padded tokens (as training's micro-batches). Only sets whose metric needs generations
(exact_match, a scoring function) are decoded. Decoding is batched (left padding, KV cache),
prompts of similar length together; a sequence stops at a stop token or at the end of its answer
line, and a batch stops when all of its sequences have. Unless given, the longest generation is
the set's longest reference in tokens plus :data:`AUTO_MARGIN` (at most :data:`AUTO_LIMIT`).

Under several processes each scores a slice of the set and the sums are added up, so the
numbers are those of the whole set; a scoring function sees the generations of the whole set.
What decoding depends on (one-line references, the longest generation) is decided from the whole
set, so it is the same on every process. No process waits for another inside a forward pass or
``generate`` (the model is scored unwrapped); the one ``reduce`` (and ``gather``) per set is
called by every process.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch

from forgetless.data.batching import chunks, micro_batches
from forgetless.data.formats import IGNORE, Example
from forgetless.eval.choice import pick, score_choices
from forgetless.eval.custom import run_scoring_function
from forgetless.eval.headline import GENERATED, HIGHER_IS_BETTER, default_metric, headline_value, higher_is_better, is_scoring_function
from forgetless.loss import forward as lm_forward

__all__ = [
    "HIGHER_IS_BETTER", "higher_is_better", "score_examples", "generate", "exact_match", "answer_contains", "normalize_answer",
    "answer_text", "one_line_references", "auto_max_new_tokens",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)
STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
AUTO_MARGIN = 4  # tokens beyond the longest reference when eval.max_new_tokens is not set
AUTO_LIMIT = 256  # the most an automatic bound allows (lm-eval's default max_gen_toks)


def _punctuation(c: str) -> bool:
    return c in _ASCII_PUNCT or (c > "\x7f" and unicodedata.category(c).startswith("P"))


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation, for any script: Unicode NFKC, case folded, punctuation (ASCII and Unicode)
    removed, the articles a / an / the removed, whitespace collapsed to single spaces and stripped.

    " Kabul." -> "kabul"; "The  Euro!" -> "euro"; "«Paris»" -> "paris"; "ＰＡＲＩＳ" -> "paris".
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if not _punctuation(c))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def answer_contains(prediction: str, reference: str) -> bool:
    """The normalised reference occurs in the normalised prediction as whole words ("contains").

    "The capital of Kenya is Nairobi." contains "Nairobi"; "Nairobian" does not; an empty reference
    is never contained.
    """
    ref = normalize_answer(reference)
    return bool(ref) and f" {ref} " in f" {normalize_answer(prediction)} "


def _line_end(text: str) -> int:
    """Index of the first newline after the first non-whitespace character (-1: none yet)."""
    start = len(text) - len(text.lstrip())
    return text.find("\n", start) if start < len(text) else -1


def answer_text(continuation: str, one_line: bool) -> str:
    """The answer in a decoded continuation (already cut at its first stop token).

    ``one_line``: up to the first line break that follows text; leading blank lines are skipped,
    not taken for an empty answer (" Kabul.\\n\\nThe capital of ..." -> " Kabul."). Otherwise the
    whole continuation.
    """
    if not one_line:
        return continuation
    end = _line_end(continuation)
    return continuation if end < 0 else continuation[:end]


def one_line_references(references: Sequence[str]) -> bool:
    """Whether every reference is a single line (surrounding whitespace aside): answers are then cut at a line break."""
    return all("\n" not in r.strip() for r in references)


def auto_max_new_tokens(references: Sequence[str], tokenizer, margin: int = AUTO_MARGIN, limit: int = AUTO_LIMIT) -> int:
    """Longest reference in tokens plus ``margin`` (room for punctuation, an article, other casing), at most ``limit``."""
    if not references:
        return 1
    longest = max(len(ids) for ids in tokenizer(list(references), add_special_tokens=False)["input_ids"])
    return max(1, min(longest + margin, limit))


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the end-of-turn tokens of common chat templates that this tokenizer knows."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in STOP_TOKENS if t in vocab)
    return sorted(i for i in ids if i is not None)


def cut_at_stop(tokens: list[int], stops) -> list[int]:
    """Generated tokens before the first stop token."""
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


@torch.no_grad()
def score_examples(
    model,
    examples: list[Example],
    tokenizer,
    *,
    batch_size: int = 16,
    generation: bool = True,
    max_new_tokens: Optional[int] = None,
    score_eos: bool = False,
    rank: int = 0,
    world_size: int = 1,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    gather: Optional[Callable[[list], list]] = None,
    device: Optional[torch.device] = None,
    on_batch: Optional[Callable[[int], None]] = None,
    metric: Optional[str] = None,
    name: str = "eval",
    verdicts: Optional[list] = None,
    synced: bool = False,
) -> dict[str, float]:
    """Score ``examples``; ``score`` is the value of ``metric`` (default: the set's natural headline).

    ``generation`` only chooses the natural headline of sets with prompts (exact match, else token
    accuracy); a set is decoded when its metric needs generations. ``max_new_tokens`` None: the
    set's longest reference plus :data:`AUTO_MARGIN` tokens. ``score_eos``: also score the
    end-of-text token appended to text and prompt/completion records.

    This process takes every ``world_size``-th example; ``reduce`` sums tensors across processes
    and ``gather`` concatenates lists (needed for a scoring function and for ``verdicts``). ``name``
    names the set in a scoring function's errors.

    ``verdicts``: a list to fill with ``(index in examples, right, answer)`` for every example the
    headline judges one by one (generated answers under exact_match / contains, the picked choice
    under multiple_choice[_norm]), in index order, the same on every process. Loss and token
    accuracy judge no single example; such sets give none.

    ``synced``: decode with ``synced_gpus`` (every process runs forward passes until all are done:
    FSDP2, where each pass gathers parameters from all of them).
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    metric = metric or default_metric(examples, generation)
    mine = examples[rank::world_size]
    # [loss_sum, targets, correct, em_hits, em_total, mc_hits, mc_norm_hits, mc_total, contains_hits]
    totals = torch.zeros(9, dtype=torch.float64)
    plain = [e for e in mine if e.choices is None]
    if not score_eos:  # the appended end-of-text is not a target (a copy: training's examples keep it)
        plain = [replace(e, labels=e.labels[:-1] + [IGNORE]) if e.eos_appended else e for e in plain]
    # longest first, in groups of similar length within batch_size x the longest in padded tokens
    # (as training's micro-batches): a long paragraph does not pad fifteen short ones to its length
    for t in micro_batches(plain, batch_size, tokenizer.pad_token_id):
        out = lm_forward(model, t["input_ids"].to(device), t["attention_mask"].to(device))  # the head at targets only
        loss_sum, correct = out.token_loss(t["labels"].to(device))
        del out
        totals[0] += loss_sum.item()
        totals[1] += correct.numel()
        totals[2] += correct.sum().item()
        if on_batch:
            on_batch(t["input_ids"].shape[0])
    mine_verdicts: list[tuple[int, bool, str]] = []
    multiple_choice = [e for e in mine if e.choices is not None]
    if multiple_choice:
        scores = score_choices(model, multiple_choice, pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device, on_batch=on_batch)
        mc_positions = [i for i, e in enumerate(mine) if e.choices is not None]
        for i, e, per_choice in zip(mc_positions, multiple_choice, scores):
            right = per_choice[e.answer]  # loss and token accuracy are those of the correct choice
            totals[0] -= right.loglik
            totals[1] += right.tokens
            totals[2] += right.greedy_hits
            best, best_norm = pick([c.loglik for c in per_choice], e.choice_chars)
            totals[5] += best == e.answer
            totals[6] += best_norm == e.answer
            totals[7] += 1
            if metric in ("multiple_choice", "multiple_choice_norm"):
                picked = best_norm if metric == "multiple_choice_norm" else best
                mine_verdicts.append((rank + i * world_size, picked == e.answer, _choice_text(e, picked)))
    user_metric = is_scoring_function(metric)
    predicted: list[tuple[int, str]] = []
    if metric in GENERATED or user_metric:
        decodable = lambda e: bool(e.prompt_ids) and e.reference is not None  # noqa: E731
        # decided on the whole set, so every process decodes alike
        references = [e.reference for e in examples if decodable(e)]
        one_line = one_line_references(references)
        limit = max_new_tokens if max_new_tokens is not None else auto_max_new_tokens(references, tokenizer)
        positions = [i for i, e in enumerate(mine) if decodable(e)]
        gen = [mine[i] for i in positions]
        predictions = generate(model, [e.prompt_ids for e in gen], tokenizer, batch_size=batch_size, max_new_tokens=limit,
                               device=device, one_line=one_line, synced=synced)
        totals[3] += sum(exact_match(p, e.reference) for p, e in zip(predictions, gen))
        totals[8] += sum(answer_contains(p, e.reference) for p, e in zip(predictions, gen))
        totals[4] += len(gen)
        predicted = [(rank + i * world_size, p) for i, p in zip(positions, predictions)]  # index in ``examples``
        if metric in GENERATED:
            judge = exact_match if metric == "exact_match" else answer_contains
            mine_verdicts += [(i, judge(p, examples[i].reference), p) for i, p in predicted]
    if reduce is not None:
        totals = reduce(totals.to(device)).cpu()
    if verdicts is not None:
        if gather is not None and world_size > 1:
            mine_verdicts = gather(mine_verdicts)
        verdicts.extend(sorted(mine_verdicts))
    model.train(was_training)
    loss_sum, targets, correct, hits, gen_total, mc_hits, mc_norm_hits, mc_total, contains_hits = totals.tolist()
    out = {"examples": len(examples), "target_tokens": int(targets)}
    if targets:
        loss = loss_sum / targets
        out.update(loss=loss, perplexity=math.exp(min(loss, 50.0)), token_accuracy=correct / targets)
    if gen_total:
        out["exact_match"] = hits / gen_total
        if metric == "contains":
            out["contains"] = contains_hits / gen_total
    if mc_total:
        out.update(mc_accuracy=mc_hits / mc_total, mc_accuracy_norm=mc_norm_hits / mc_total)
    if user_metric:
        if gather is not None and world_size > 1:
            predicted = sorted(gather(predicted))
        out.update(run_scoring_function(
            metric, name, [p for _, p in predicted], [examples[i].reference for i, _ in predicted], [examples[i].record for i, _ in predicted],
        ))
    else:
        out["score"] = headline_value(out, metric)
    return out


def _choice_text(example: Example, index: int) -> str:
    """The text of a multiple-choice example's choice ``index`` (its record's), else its letter."""
    choices = (example.record or {}).get("choices")
    if isinstance(choices, list) and index < len(choices):
        return str(choices[index]).strip()
    return f"choice {chr(ord('A') + index) if index < 26 else index}"


class _AnswerDone:
    """A ``generate`` stopping criterion: a sequence is done once its answer line is complete.

    Called after every new token with the whole batch; returns one bool per sequence. Sequences
    already done are not decoded again; the others are decoded from the first generated token (so
    the verdict is the one :func:`answer_text` gives the final text).
    """

    def __init__(self, tokenizer, start: int, stops):
        self.tokenizer, self.start, self.stops = tokenizer, start, set(stops)
        self.done: Optional[list[bool]] = None

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        if self.done is None:
            self.done = [False] * input_ids.shape[0]
        rows = input_ids[:, self.start :].tolist()
        for i, row in enumerate(rows):
            if not self.done[i]:
                kept = cut_at_stop(row, self.stops)
                self.done[i] = len(kept) < len(row) or _line_end(self.tokenizer.decode(kept, skip_special_tokens=True)) >= 0
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(model, prompts: list[list[int]], tokenizer, *, batch_size: int, max_new_tokens: int, device=None,
             one_line: bool = False, synced: bool = False) -> list[str]:
    """Greedy answers to token-id prompts, in the order given.

    Prompts are batched longest first, left-padded, decoded with the KV cache; each answer is cut at
    the first stop token (:func:`stop_token_ids`) and, with ``one_line``, by :func:`answer_text`.
    A sequence stops at its stop token or (``one_line``) at the end of its answer line; a batch
    stops when all of its sequences have stopped, or after ``max_new_tokens``.
    """
    from transformers import StoppingCriteriaList

    device = device or next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[Optional[str]] = [None] * len(prompts)
    for batch in chunks(order, batch_size):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            p = prompts[i]
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        criteria = StoppingCriteriaList([_AnswerDone(tokenizer, width, stops)]) if one_line else None
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=stops,
            stopping_criteria=criteria,
            **({"synced_gpus": True} if synced else {}),
        )
        for i, row in zip(batch, out[:, width:].tolist()):
            texts[i] = answer_text(tokenizer.decode(cut_at_stop(row, stops), skip_special_tokens=True), one_line)
    return texts  # type: ignore[return-value]
