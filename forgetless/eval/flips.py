"""Which answers flipped: per example, right before training and wrong after ("lost"), or the reverse.

A set's score says how much was forgotten; the flips say *what*. Every set whose headline judges
examples one by one (generated answers under ``exact_match`` / ``contains``, the picked choice under
``multiple_choice[_norm]``) gives one verdict per example before and after training
(:func:`forgetless.eval.scoring.score_examples`, ``verdicts=``); this module compares them. Sets
scored by loss or token accuracy judge no single example and have no flips.

Pure functions: verdicts in, counts and rows out. The run writes ``flips.json`` (every flipped
example: its prompt, reference and both answers) and the counts into ``summary.json``.
"""

from __future__ import annotations

from typing import Optional, Sequence

Verdict = tuple[int, bool, str]  # (index in the set, right, the answer given)


def compare(before: Sequence[Verdict], after: Sequence[Verdict]) -> dict:
    """Counts and indices of the examples judged both times: ``lost`` (right -> wrong), ``gained``."""
    b = {int(i): (bool(r), a) for i, r, a in before}
    a = {int(i): (bool(r), ans) for i, r, ans in after}
    both = sorted(set(b) & set(a))
    lost = [i for i in both if b[i][0] and not a[i][0]]
    gained = [i for i in both if not b[i][0] and a[i][0]]
    return {
        "judged": len(both),
        "right_before": sum(b[i][0] for i in both),
        "right_after": sum(a[i][0] for i in both),
        "lost": lost,
        "gained": gained,
    }


def counts(flips: dict) -> dict:
    """The one-line view of a set's flips (what summary.json keeps)."""
    return {k: (len(v) if isinstance(v, list) else v) for k, v in flips.items() if k != "examples"}


def flip_rows(flips: dict, before: Sequence[Verdict], after: Sequence[Verdict], examples: Sequence, tokenizer=None) -> dict:
    """``flips`` with one row per flipped example: index, prompt, reference and both answers."""
    b = {int(i): ans for i, _, ans in before}
    a = {int(i): ans for i, _, ans in after}

    def row(i: int) -> dict:
        e = examples[i] if i < len(examples) else None
        reference = getattr(e, "reference", None)
        return {"index": i, "prompt": _prompt(e, tokenizer), "reference": reference.strip() if isinstance(reference, str) else reference,
                "before": b.get(i), "after": a.get(i)}

    return {**flips, "examples": {"lost": [row(i) for i in flips["lost"]], "gained": [row(i) for i in flips["gained"]]}}


def _prompt(example, tokenizer) -> Optional[str]:
    if example is None:
        return None
    record = example.record or {}
    for key in ("prompt", "question"):
        if isinstance(record.get(key), str):
            return record[key]
    messages = record.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    if tokenizer is not None and example.prompt_ids:
        return tokenizer.decode(example.prompt_ids, skip_special_tokens=True)
    return None


def flips_of_run(eval_sets: Sequence, before: dict[str, list], after: dict[str, list], tokenizer=None) -> dict[str, dict]:
    """Every set judged before and after: its role, metric and flips with their rows."""
    out = {}
    for s in eval_sets:
        if s.name in before and s.name in after and (before[s.name] or after[s.name]):
            flips = compare(before[s.name], after[s.name])
            out[s.name] = {"role": s.role, "metric": s.metric,
                           **flip_rows(flips, before[s.name], after[s.name], s.examples, tokenizer)}
    return out

