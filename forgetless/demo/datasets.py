"""Datasets shipped with forgetless (sources and licenses in ``data/SOURCES.md``).

They are addressed in configs as ``demo:NAME``: ``demo:capitals``, ``demo:elements``,
``demo:currencies`` (prompt/completion facts) and ``demo:general`` (public-domain prose).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

DATA_DIR = Path(__file__).parent / "data"
FILES = {
    "capitals": "capitals.jsonl",
    "elements": "elements.jsonl",
    "currencies": "currencies.jsonl",
    "general": "general.txt",
}


def demo_path(name: str) -> Path:
    """The file behind ``demo:NAME``."""
    from forgetless.errors import DataError

    if name not in FILES:
        raise DataError(f"demo:{name}: no such shipped dataset; choose one of {', '.join('demo:' + n for n in FILES)}")
    return DATA_DIR / FILES[name]


def corpus_text() -> Iterator[str]:
    """All shipped text, one string per record (used to train the tiny tokenizer)."""
    for name, file in FILES.items():
        path = DATA_DIR / file
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                yield rec["prompt"] + rec["completion"]
        else:
            yield from (p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip())
