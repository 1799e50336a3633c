"""The shipped datasets (demo:NAME): every one is there, with its sources, and loads."""

from __future__ import annotations

import pytest

from forgetless.config import DatasetSpec
from forgetless.data.builtin import FILES, SHIPPED_DIR, builtin_path, corpus_text, is_builtin
from forgetless.data.loading import load_records
from forgetless.errors import DataError


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_shipped_dataset_loads(name):
    address = f"demo:{name}"
    assert is_builtin(address) and builtin_path(address).is_file()
    assert load_records(DatasetSpec(path=address))


def test_sources_are_documented_and_unknown_names_are_refused():
    sources = (SHIPPED_DIR / "SOURCES.md").read_text(encoding="utf-8")
    assert all(file in sources for file in FILES.values())
    with pytest.raises(DataError, match="choose one of demo:capitals"):
        builtin_path("demo:nothing")
    assert not is_builtin("data/capitals.jsonl")


def test_corpus_text_covers_every_file():
    texts = list(corpus_text())
    assert any("Paris" in t for t in texts) and len(texts) > 178 + 86
