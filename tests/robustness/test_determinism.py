"""Same seed and config, same numbers: two runs of LoRA + replay on the tiny model log identical
losses, loss terms and eval scores. Each run directory also records what it ran on."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import forgetless
from forgetless.cli import main
from forgetless.rundir import environment_versions
from tests.conftest import PC_RECORDS, fast_overrides, write_jsonl

pytestmark = pytest.mark.slow

TIMING = {"tokens_per_s", "elapsed_s"}  # wall-clock fields, the only ones allowed to differ
LIBRARIES = ("python", "torch", "transformers", "peft", "accelerate", "datasets", "forgetless")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("determinism")
    data = write_jsonl(root / "pc.jsonl", PC_RECORDS)
    runs = []
    for name in ("a", "b"):
        out = root / name
        args = fast_overrides(
            out, data, "train.max_steps=6", "output.log_every=1", "eval.max_examples=6",
            "methods.lora.r=4", "methods.replay.memory=demo:capitals", "methods.replay.size_examples=8", "methods.replay.ratio=0.25",
        )
        assert main(["train", *args]) == 0
        runs.append(out)
    return runs[0], runs[1]


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_same_losses_and_scores(two_runs):
    a, b = (metrics(r) for r in two_runs)
    steps = [r for r in a if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in a if "eval" in r]
    assert len(evals) == 2 and "exact_match" in evals[-1]["eval"]["task"]
    assert a == b  # every loss, learning rate, gradient norm and eval score, exactly
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in two_runs)
    assert sa["before"] == sb["before"] and sa["after"] == sb["after"]
    assert sa["train"]["final_loss"] == sb["train"]["final_loss"]
    assert sa["data"]["mix"] == sb["data"]["mix"] and sa["data"]["mix"]["replay"]["observed"] > 0
    assert sa["train"]["methods"].keys() == {"lora", "replay"}


def test_run_directory_records_versions(two_runs):
    run = two_runs[0]
    recorded = json.loads((run / "versions.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["versions"] == recorded == environment_versions()
    for lib in LIBRARIES:
        assert isinstance(recorded[lib], str) and recorded[lib][0].isdigit(), lib
    import torch
    import transformers

    assert recorded["torch"] == torch.__version__ and recorded["transformers"] == transformers.__version__
    assert recorded["forgetless"] == forgetless.__version__
    root = Path(forgetless.__file__).resolve().parent.parent
    if (root / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert recorded["forgetless_git_commit"] == head
        assert isinstance(recorded["forgetless_git_dirty"], bool)
