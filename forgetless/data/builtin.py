"""The datasets shipped with forgetless, in ``shipped/`` (sources and licenses in ``shipped/SOURCES.md``).

They are addressed in configs as ``demo:NAME``: ``demo:capitals``, ``demo:elements``,
``demo:currencies`` (prompt/completion facts) and ``demo:general`` (public-domain prose). The
demo trains on them, the tests use them, and the tiny model's tokenizer was trained on their text.
The real-model benchmark and ``forgetless demo --real`` add a new task for a pretrained chat
model, ``demo:esperanto_numbers`` (``_validation``, ``_test``: numbers in Esperanto words), and
probes: ``demo:instructions`` (user turns; the base model's own answers become a keep set),
``demo:replay_prompts`` (prompts for synthetic replay), ``demo:mcq_validation`` / ``demo:mcq_test``
(multiple choice, also as lm-eval tasks: :func:`write_lm_eval_tasks`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from forgetless.errors import DataError

PREFIX = "demo:"
SHIPPED_DIR = Path(__file__).parent / "shipped"
FILES = {
    "capitals": "capitals.jsonl",
    "elements": "elements.jsonl",
    "currencies": "currencies.jsonl",
    "general": "general.txt",
    # the real-model benchmark's and `forgetless demo --real`'s new task and probes
    "esperanto_numbers": "esperanto_numbers_train.jsonl",
    "esperanto_numbers_validation": "esperanto_numbers_validation.jsonl",
    "esperanto_numbers_test": "esperanto_numbers_test.jsonl",
    "instructions": "instructions.jsonl",
    "replay_prompts": "replay_prompts.jsonl",
    "mcq_validation": "mcq_validation.jsonl",
    "mcq_test": "mcq_test.jsonl",
}
# what the tiny model's tokenizer was trained on (models/tiny.py): the demo's facts and prose
TOKENIZER_CORPUS = ("capitals", "elements", "currencies", "general")
LM_EVAL_TASKS = SHIPPED_DIR / "lm_eval_tasks"  # lm-eval task YAMLs of the shipped mcq files (see write_lm_eval_tasks)


def is_builtin(path: str) -> bool:
    """True for a ``demo:NAME`` address."""
    return path.startswith(PREFIX)


def builtin_path(address: str) -> Path:
    """The file behind ``demo:NAME``."""
    name = address[len(PREFIX):]
    if name not in FILES:
        raise DataError(f"demo:{name}: no such shipped dataset; choose one of {', '.join(PREFIX + n for n in FILES)}")
    return SHIPPED_DIR / FILES[name]


def corpus_text() -> Iterator[str]:
    """The demo's shipped text, one string per record (used to train the tiny tokenizer)."""
    for name in TOKENIZER_CORPUS:
        path = SHIPPED_DIR / FILES[name]
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                yield rec["prompt"] + rec["completion"]
        else:
            yield from (p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip())


def write_lm_eval_tasks(out_dir: Path) -> Path:
    """Copies of the shipped lm-eval task YAMLs with the absolute paths of their data files; returns
    the folder (an ``eval.harness.include_path``). lm-eval reads ``data_files`` relative to the
    working directory, not the YAML."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for yaml_file in sorted(LM_EVAL_TASKS.glob("*.yaml")):
        text = yaml_file.read_text(encoding="utf-8")
        for name in ("mcq_validation", "mcq_test"):
            text = text.replace(f"test: {FILES[name]}", f"test: {SHIPPED_DIR / FILES[name]}")
        (out_dir / yaml_file.name).write_text(text, encoding="utf-8")
    return out_dir
