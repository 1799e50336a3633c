"""Writes the real-model benchmark's new task: numbers written out in Esperanto words.

The rules are those of the Fundamento de Esperanto (L. L. Zamenhof, 1905, public domain),
Grammar, rule 7: the cardinal numerals are unu, du, tri, kvar, kvin, ses, sep, ok, naŭ, dek,
cent, mil; tens and hundreds are formed by joining a numeral in front of dek or cent
(dudek = 20, tricent = 300), and the parts of a number follow each other as separate words
(347 = tricent kvardek sep). The task is regular, so a model can learn it from some numbers and
be scored on numbers it has not seen; SmolLM2-135M-Instruct cannot do it before training.

    python benchmarks/real_model/make_esperanto.py   # rewrites forgetless/data/shipped/esperanto_numbers_*.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

UNITS = ["", "unu", "du", "tri", "kvar", "kvin", "ses", "sep", "ok", "naŭ"]
PROMPT = "Write the number {n} in Esperanto words."
SPLITS = {"train": 300, "validation": 60, "test": 100}


def esperanto(n: int) -> str:
    """1 <= n <= 999 in Esperanto words: 347 -> 'tricent kvardek sep'."""
    if not 1 <= n <= 999:
        raise ValueError(n)
    hundreds, tens, units = n // 100, n // 10 % 10, n % 10
    words = []
    if hundreds:
        words.append(("" if hundreds == 1 else UNITS[hundreds]) + "cent")
    if tens:
        words.append(("" if tens == 1 else UNITS[tens]) + "dek")
    if units:
        words.append(UNITS[units])
    return " ".join(words)


def main() -> None:
    assert esperanto(347) == "tricent kvardek sep" and esperanto(11) == "dek unu" and esperanto(900) == "naŭcent"
    numbers = random.Random(1905).sample(range(1, 1000), sum(SPLITS.values()))
    out = Path(__file__).resolve().parents[2] / "forgetless" / "data" / "shipped"
    start = 0
    for split, count in SPLITS.items():
        with open(out / f"esperanto_numbers_{split}.jsonl", "w", encoding="utf-8") as f:
            for n in numbers[start : start + count]:
                rec = {"messages": [{"role": "user", "content": PROMPT.format(n=n)}, {"role": "assistant", "content": esperanto(n)}]}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        start += count


if __name__ == "__main__":
    main()
