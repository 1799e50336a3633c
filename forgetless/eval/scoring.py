"""Scoring a model on a set of examples: loss, perplexity, token accuracy, exact match, multiple choice.

- ``loss``: mean cross-entropy per target token (completion / assistant tokens for those formats,
  the correct choice's tokens for multiple choice), token-weighted over the whole set;
  ``perplexity`` = exp(loss).
- ``token_accuracy``: share of target tokens where the argmax prediction is the label.
- ``exact_match``: for prompt/completion and chat records, greedy decoding from the prompt,
  compared with the reference after SQuAD-style normalisation (lower case, no punctuation, no
  articles, single spaces); for multiple-choice records (the correct choice) only when the
  metric is exact_match or a scoring function, which need generations.
- ``mc_accuracy`` / ``mc_accuracy_norm``: multiple-choice records scored by the log-likelihood of
  each choice (:mod:`forgetless.eval.choice`).
- ``score``: the set's headline metric (:mod:`forgetless.eval.headline`), which may be a user
  scoring function of the generations (:mod:`forgetless.eval.custom`); its extra numbers are
  reported beside it.

Under several processes each scores a slice of the set and the sums are added up, so the
numbers are those of the whole set; a scoring function sees the generations of the whole set.
"""

from __future__ import annotations

import math
import re
import string
from typing import Callable, Optional

import torch

from forgetless.data.batching import chunks, collate
from forgetless.data.formats import Example
from forgetless.eval.choice import pick, score_choices
from forgetless.eval.custom import run_scoring_function
from forgetless.eval.headline import HIGHER_IS_BETTER, default_metric, headline_value, higher_is_better, is_scoring_function
from forgetless.loss import token_cross_entropy

__all__ = ["HIGHER_IS_BETTER", "higher_is_better", "score_examples", "generate", "exact_match", "normalize_answer"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace (SQuAD convention)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the end-of-turn tokens of common chat templates that this tokenizer knows."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in STOP_TOKENS if t in vocab)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def score_examples(
    model,
    examples: list[Example],
    tokenizer,
    *,
    batch_size: int = 16,
    generation: bool = True,
    max_new_tokens: int = 32,
    rank: int = 0,
    world_size: int = 1,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    gather: Optional[Callable[[list], list]] = None,
    device: Optional[torch.device] = None,
    on_batch: Optional[Callable[[int], None]] = None,
    metric: Optional[str] = None,
    name: str = "eval",
) -> dict[str, float]:
    """Score ``examples``; ``score`` is the value of ``metric`` (default: the set's natural headline).

    This process takes every ``world_size``-th example; ``reduce`` sums tensors across processes
    and ``gather`` concatenates lists (needed only for a scoring function). ``name`` names the set
    in a scoring function's errors.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    metric = metric or default_metric(examples, generation)
    mine = examples[rank::world_size]
    # [loss_sum, targets, correct, em_hits, em_total, mc_hits, mc_norm_hits, mc_total]
    totals = torch.zeros(8, dtype=torch.float64)
    for batch in chunks([e for e in mine if e.choices is None], batch_size):
        t = collate(batch, tokenizer.pad_token_id)
        logits = model(input_ids=t["input_ids"].to(device), attention_mask=t["attention_mask"].to(device)).logits
        loss_sum, correct = token_cross_entropy(logits, t["labels"].to(device))
        totals[0] += loss_sum.item()
        totals[1] += correct.numel()
        totals[2] += correct.sum().item()
        if on_batch:
            on_batch(len(batch))
    multiple_choice = [e for e in mine if e.choices is not None]
    if multiple_choice:
        scores = score_choices(model, multiple_choice, pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device, on_batch=on_batch)
        for e, per_choice in zip(multiple_choice, scores):
            right = per_choice[e.answer]  # loss and token accuracy are those of the correct choice
            totals[0] -= right.loglik
            totals[1] += right.tokens
            totals[2] += right.greedy_hits
            best, best_norm = pick([c.loglik for c in per_choice], e.choice_chars)
            totals[5] += best == e.answer
            totals[6] += best_norm == e.answer
            totals[7] += 1
    user_metric = is_scoring_function(metric)
    needs_generations = metric == "exact_match" or user_metric
    predicted: list[tuple[int, str]] = []
    if generation or needs_generations:
        # multiple-choice records are scored by likelihood; they are decoded only when the metric asks
        positions = [i for i, e in enumerate(mine) if e.prompt_ids and e.reference is not None and (e.choices is None or needs_generations)]
        gen = [mine[i] for i in positions]
        predictions = generate(model, [e.prompt_ids for e in gen], tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device)
        totals[3] += sum(exact_match(p, e.reference) for p, e in zip(predictions, gen))
        totals[4] += len(gen)
        predicted = [(rank + i * world_size, p) for i, p in zip(positions, predictions)]  # index in ``examples``
    if reduce is not None:
        totals = reduce(totals.to(device)).cpu()
    model.train(was_training)
    loss_sum, targets, correct, hits, gen_total, mc_hits, mc_norm_hits, mc_total = totals.tolist()
    out = {"examples": len(examples), "target_tokens": int(targets)}
    if targets:
        loss = loss_sum / targets
        out.update(loss=loss, perplexity=math.exp(min(loss, 50.0)), token_accuracy=correct / targets)
    if gen_total:
        out["exact_match"] = hits / gen_total
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


@torch.no_grad()
def generate(model, prompts: list[list[int]], tokenizer, *, batch_size: int, max_new_tokens: int, device=None) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches), cut at the first stop token."""
    device = device or next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id
    texts: list[str] = []
    for batch in chunks(prompts, batch_size):
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=stops,
        )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts
