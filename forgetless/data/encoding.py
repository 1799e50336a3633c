"""Datasets from their specs to tokenized examples: loading (data/loading.py) + the encoder (data/formats.py)."""

from __future__ import annotations

from forgetless.data.formats import EncodeStats, Encoder, Example
from forgetless.data.loading import load_records
from forgetless.errors import UserError


def encode_dataset(encoder: Encoder, specs) -> tuple[list[Example], EncodeStats]:
    """Load and tokenize one or several datasets (concatenated)."""
    examples: list[Example] = []
    total = EncodeStats()
    for spec in specs:
        exs, stats = encoder.encode_all(load_records(spec), spec.format)
        if not exs:
            raise no_usable_records(spec, stats)
        examples += exs
        total.add(stats)
    return examples, total


def no_usable_records(spec, stats: EncodeStats) -> UserError:
    """The error for a dataset that tokenization left empty."""
    return UserError(
        f"{spec.path}: no usable records after tokenization ({stats.dropped_too_long} too long, "
        f"{stats.dropped_no_target} with no target tokens); raise data.max_length or check the data"
    )
