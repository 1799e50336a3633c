"""The datasets shipped with forgetless, in ``shipped/`` (sources and licenses in ``shipped/SOURCES.md``).

They are addressed in configs as ``demo:NAME``: ``demo:capitals``, ``demo:elements``,
``demo:currencies`` (prompt/completion facts) and ``demo:general`` (public-domain prose). The
demo trains on them, the tests use them, and the tiny model's tokenizer was trained on their text.
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
}


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
    """All shipped text, one string per record (used to train the tiny tokenizer)."""
    for file in FILES.values():
        path = SHIPPED_DIR / file
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                yield rec["prompt"] + rec["completion"]
        else:
            yield from (p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip())
