"""Saving the trained model of a run: weights in safetensors, with the tokenizer."""

from __future__ import annotations

from pathlib import Path


def save_model(model, tokenizer, out_dir: Path, cfg) -> None:
    """Write ``model`` and ``tokenizer`` to ``out_dir`` (``from_pretrained`` loads it back)."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
