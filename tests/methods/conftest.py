"""A shared forgetting scenario for method tests.

A small base model learns 40 capitals (the old knowledge) once per test session; each method is
then fine-tuned on 30 element symbols from that same base, and compared with plain fine-tuning
on the capitals loss (lower = less forgotten). Loss is used rather than exact match because it
moves smoothly even on these short runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import forgetless

BASE_SHAPE = [
    "model.tiny.hidden_size=96",
    "model.tiny.intermediate_size=256",
    "model.tiny.num_layers=3",
    "model.tiny.num_heads=4",
    "model.tiny.num_kv_heads=2",
]
COMMON = [
    "output.progress=false",
    "output.log_every=1",
    "train.seed=0",
    "train.micro_batch_size=16",
    "train.warmup_ratio=0.0",
    "data.max_length=48",
    "eval.generation=false",
    "eval.batch_size=64",
]


class Scenario:
    def __init__(self, root: Path):
        self.root = root
        self.base_dir = root / "base" / "model"
        self._plain = None

    def finetune(self, name: str, *overrides: str, steps: int = 24, lr: float = 3e-3):
        return forgetless.train(self.config(name, *overrides, steps=steps, lr=lr))

    def config(self, name: str, *overrides: str, steps: int = 24, lr: float = 3e-3):
        """The config of :meth:`finetune` (for a run started another way, e.g. killed at a fault point)."""
        return forgetless.load_config(None, [
            f"model.name_or_path={self.base_dir}",
            *COMMON,
            f"output.dir={self.root / name}",
            "output.overwrite=true",
            "data.train={path: demo:elements, limit: 30}",
            "data.eval.elements={path: demo:elements, limit: 30}",
            "data.keep.capitals={path: demo:capitals, limit: 40}",
            f"train.max_steps={steps}",
            f"train.lr={lr}",
            *overrides,
        ])

    @property
    def plain(self):
        if self._plain is None:
            self._plain = self.finetune("plain")
        return self._plain


@pytest.fixture(scope="session")
def scenario(tmp_path_factory) -> Scenario:
    root = tmp_path_factory.mktemp("forgetting")
    cfg = forgetless.load_config(None, [
        "model.name_or_path=tiny", *BASE_SHAPE, *COMMON,
        f"output.dir={root / 'base'}",
        "data.train={path: demo:capitals, limit: 40}",
        "data.eval.capitals={path: demo:capitals, limit: 40}",
        "train.epochs=60", "train.lr=3e-3", "eval.before=false",
    ])
    forgetless.train(cfg)
    return Scenario(root)


def forgot(result, keep: str = "capitals") -> float:
    """Increase of the keep set's loss over the fine-tuning."""
    return result.after[keep]["loss"] - result.before[keep]["loss"]
