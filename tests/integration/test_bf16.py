"""bf16 on CPU: weights in bfloat16, and float32 weights with bf16 mixed precision (autocast)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import forgetless
from tests.conftest import fast_overrides

pytestmark = pytest.mark.slow


def _run(tmp_path, pc_file, name, *extra):
    cfg = forgetless.load_config(None, fast_overrides(tmp_path / name, pc_file, "train.max_steps=6", "train.lr=3e-3",
                                                   "output.log_every=1", *extra))
    result = forgetless.train(cfg)
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    weights = load_file(tmp_path / name / "model" / "model.safetensors")
    return result, losses, weights


@pytest.mark.parametrize("options", [["model.dtype=bfloat16"], ["model.dtype=float32", "train.mixed_precision=bf16"]],
                         ids=["bf16-weights", "bf16-autocast"])
def test_bf16_trains_and_saves(tmp_path, pc_file, one_thread, options):
    _, ref_losses, _ = _run(tmp_path, pc_file, "fp32")
    result, losses, weights = _run(tmp_path, pc_file, "bf16", *options)
    assert len(losses) == len(ref_losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # it learns
    # close to the float32 run (bf16 has 8 bits of mantissa), but not the same computation
    assert losses[0] == pytest.approx(ref_losses[0], rel=0.02) and losses != ref_losses
    want = torch.bfloat16 if "model.dtype=bfloat16" in options else torch.float32
    assert {w.dtype for w in weights.values()} == {want}
    assert result.after  # evaluated after training
