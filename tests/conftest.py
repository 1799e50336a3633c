"""Shared fixtures: small data files and a fast tiny-model config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A small, fast model shape for tests (the default tiny shape, narrower).
FAST_MODEL = [
    "model.name_or_path=tiny",
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=128",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=4",
    "model.tiny.num_kv_heads=2",
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


PC_RECORDS = [
    {"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(24)
]
CHAT_RECORDS = [
    {
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": f"Name number {i}."},
            {"role": "assistant", "content": f"Number {i}."},
        ]
    }
    for i in range(16)
]
TEXT_RECORDS = [{"text": f"The sky is blue on day {i}, and the grass is green."} for i in range(16)]


@pytest.fixture
def pc_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pc.jsonl", PC_RECORDS)


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", CHAT_RECORDS)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "text.jsonl", TEXT_RECORDS)


def fast_overrides(out: Path, train_path: Path | str, *extra: str) -> list[str]:
    return [
        *FAST_MODEL,
        f"data.train={train_path}",
        f"output.dir={out}",
        "output.progress=false",
        "train.micro_batch_size=4",
        "train.max_steps=4",
        "train.lr=1e-3",
        "eval.max_examples=8",
        "eval.max_new_tokens=4",
        "data.max_length=64",
        *extra,
    ]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention (tens of times slower on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
