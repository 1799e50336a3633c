"""Scoring functions of the real-model benchmark (forgetless ``metric: file.py:function``).

A chat model answers "What is the capital of Kenya?" with "The capital of Kenya is Nairobi.":
right, though not the bare reference. ``contains_answer`` gives it credit: the normalised
reference (forgetless's exact-match normalisation: case, whitespace, punctuation at the ends)
appears in the normalised answer as whole words.
"""

from __future__ import annotations

import re

from forgetless.eval.scoring import normalize_answer


def answer_contains(prediction: str, reference: str) -> bool:
    ref = normalize_answer(reference)
    return bool(ref) and re.search(r"(?<!\w)" + re.escape(ref) + r"(?!\w)", normalize_answer(prediction)) is not None


def contains_answer(predictions: list[str], references: list[str], records: list[dict]) -> dict:
    hits = [answer_contains(p, r) for p, r in zip(predictions, references)]
    return {"score": sum(hits) / max(len(hits), 1)}
