"""Non-finite steps: skipped without touching the weights, logged, and a stop after too many in a row."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgetless.cli import main
from forgetless.config import TinyModelConfig, option
from forgetless.data.batching import collate
from forgetless.data.formats import IGNORE, Example
from forgetless.loss import token_cross_entropy
from forgetless.methods.base import Method
from forgetless.registry import register, unregister
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer
from forgetless.recipes.finetune import forward_backward
from tests.resume.conftest import overrides, resume, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@dataclass
class PoisonConfig:
    """Test only: make chosen optimiser steps non-finite."""

    loss_at: list[int] = option(factory=list, help="Steps whose loss is NaN.")
    grad_at: list[int] = option(factory=list, help="Steps whose loss is finite but whose gradient is NaN.")


class Poison(Method):
    name = "poison"

    def __init__(self, cfg: PoisonConfig):
        self.cfg = cfg
        self.step = 0

    def step_terms(self, model) -> dict[str, torch.Tensor]:
        self.step += 1
        p = next(q for q in model.parameters() if q.requires_grad)
        if self.step in self.cfg.loss_at:
            return {"poison": p.sum() * float("nan")}
        if self.step in self.cfg.grad_at:
            return {"poison": torch.sqrt(p.sum() * 0.0)}  # value 0, gradient 0 * inf = nan
        return {"poison": p.sum() * 0.0}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


@pytest.fixture(autouse=True)
def poison():
    register("poison", PoisonConfig, Poison, "test only")
    yield
    unregister("poison")


def _checkpoint(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:06d}" / name)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_step_changes_nothing_and_is_logged(tmp_path, data):
    out = tmp_path / "run"
    every_step = ("output.checkpoint_every=1", "output.keep_last=10", "output.keep_checkpoints=true")
    result = train(out, data, "methods.poison.loss_at=[3]", "methods.poison.grad_at=[5]", "train.max_steps=6", *every_step)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 3, "skipped": "non-finite loss"} in records and {"step": 5, "skipped": "non-finite grad"} in records
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 4, 6]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    for skipped in (3, 5):  # weights and optimiser state bit-identical across the skipped step
        for name in ("model.safetensors", "optimizer.safetensors"):
            assert _same(_checkpoint(out, skipped - 1, name), _checkpoint(out, skipped, name)), (skipped, name)
    assert not _same(_checkpoint(out, 3, "model.safetensors"), _checkpoint(out, 4, "model.safetensors"))
    trainer = json.loads((out / "checkpoints" / "step-000005" / "trainer.json").read_text())
    assert trainer["scheduler"]["last_epoch"] == 5  # the schedule moves on with the step number
    assert result.train["skipped_steps"] == 2 and math.isfinite(result.train["final_loss"])
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_too_many_non_finite_steps_in_a_row_stop_the_run_with_a_good_checkpoint(tmp_path, data, capsys):
    out = tmp_path / "run"
    poisoned = ("methods.poison.loss_at=[3, 4, 5]", "output.keep_last=5")
    assert main(["train", *overrides(out, data, *poisoned, "train.max_nonfinite_steps=3")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("forgetless: error: training stopped at step 5: the loss or gradient was non-finite (NaN/inf) at 3 steps in a row "
                              "(steps 3-5), whose updates were skipped; checkpoint step-000005 holds the last finite weights. Try a lower train.lr")
    assert sum("the update was skipped" in line for line in err) == 3  # shown as it happens
    assert _same(_checkpoint(out, 2, "model.safetensors"), _checkpoint(out, 5, "model.safetensors"))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000005" and not (out / "summary.json").exists()

    # resuming with a higher limit goes on from step 5 (the only change resume allows here)
    result = resume(out, data, *poisoned, "train.max_nonfinite_steps=10")
    assert result.train["skipped_steps"] == 3 and math.isfinite(result.train["final_loss"])


def test_a_batch_with_every_label_masked_adds_no_nan():
    tok = load_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), tok, seed=0)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    real = collate([Example([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8], "a")], tok.pad_token_id)
    masked = collate([Example([5, 6, 9], [IGNORE] * 3, "b"), Example([4, 4], [IGNORE] * 2, "c")], tok.pad_token_id)

    loss, correct = token_cross_entropy(model(input_ids=masked["input_ids"]).logits, masked["labels"])
    assert loss.item() == 0.0 and correct.numel() == 0

    def grads(batches):
        model.zero_grad(set_to_none=True)
        sums = forward_backward(model, batches, accelerator, scale=1 / 2)
        return sums, [p.grad.clone() for p in model.parameters()]

    sums, with_masked = grads([real, masked])
    assert math.isfinite(float(sums["lm"])) and all(torch.isfinite(g).all() for g in with_masked)
    _, without = grads([real])
    assert all(torch.equal(a, b) for a, b in zip(with_masked, without))
    sums, only_masked = grads([masked])  # a whole step without targets: zero loss, zero gradient
    assert float(sums["lm"]) == 0.0 and all(torch.count_nonzero(g) == 0 for g in only_masked)
