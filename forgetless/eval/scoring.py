"""Scoring a model on a set of examples: loss, perplexity, token accuracy, exact match.

- ``loss``: mean cross-entropy per target token (completion / assistant tokens for those formats),
  token-weighted over the whole set; ``perplexity`` = exp(loss).
- ``token_accuracy``: share of target tokens where the argmax prediction is the label.
- ``exact_match``: for prompt/completion and chat records, greedy decoding from the prompt,
  compared with the reference after SQuAD-style normalisation (lower case, no punctuation, no
  articles, single spaces).

Under several processes each scores a slice of the set and the sums are added up, so the
numbers are those of the whole set.
"""

from __future__ import annotations

import math
import re
import string
from typing import Callable, Optional

import torch

from forgetless.data.batching import chunks, collate
from forgetless.data.formats import Example
from forgetless.loss import token_cross_entropy

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
    device: Optional[torch.device] = None,
    on_batch: Optional[Callable[[int], None]] = None,
) -> dict[str, float]:
    """Score ``examples`` (this process takes every ``world_size``-th one); ``reduce`` sums across processes."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    mine = examples[rank::world_size]
    # [loss_sum, targets, correct, em_hits, em_total]
    totals = torch.zeros(5, dtype=torch.float64)
    for batch in chunks(mine, batch_size):
        t = collate(batch, tokenizer.pad_token_id)
        logits = model(input_ids=t["input_ids"].to(device), attention_mask=t["attention_mask"].to(device)).logits
        loss_sum, correct = token_cross_entropy(logits, t["labels"].to(device))
        totals[0] += loss_sum.item()
        totals[1] += correct.numel()
        totals[2] += correct.sum().item()
        if on_batch:
            on_batch(len(batch))
    if generation:
        gen = [e for e in mine if e.prompt_ids and e.reference is not None]
        predictions = generate(model, [e.prompt_ids for e in gen], tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device)
        totals[3] += sum(exact_match(p, e.reference) for p, e in zip(predictions, gen))
        totals[4] += len(gen)
    if reduce is not None:
        totals = reduce(totals.to(device)).cpu()
    model.train(was_training)
    loss_sum, targets, correct, hits, gen_total = totals.tolist()
    out = {"examples": len(examples), "target_tokens": int(targets)}
    if targets:
        loss = loss_sum / targets
        out.update(loss=loss, perplexity=math.exp(min(loss, 50.0)), token_accuracy=correct / targets)
    if gen_total:
        out["exact_match"] = hits / gen_total
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
