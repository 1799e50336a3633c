"""A run killed anywhere and resumed ends exactly like an uninterrupted run (weights, metrics, summary)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgetless.cli import main
from tests.resume.conftest import assert_same_run, killed, overrides, resume, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

EVERY_3 = "eval.every_steps=3"  # evaluations at steps 3 and 6 as well: eval faults 1 = before, 2 = step 3, 4 = final


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    train(out, data, EVERY_3, "output.keep_checkpoints=true")
    return out


def test_sigkill_at_a_random_step_then_resume_from_the_command_line(tmp_path, data, reference, capsys):
    """A real SIGKILL of `forgetless train`, timed by watching metrics.jsonl, then `--resume`."""
    kill_after = random.Random(20240605).randint(3, 6)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "forgetless", "train", *overrides(out, data, EVERY_3)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if f'"step": {kill_after}, "epoch"' in _read(out / "metrics.jsonl"):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (exit code {proc.returncode}): {proc.stderr.read()[-2000:]}"
    assert (out / "checkpoints" / "latest").is_file() and not (out / "summary.json").exists()

    assert main(["train", *overrides(out, data, EVERY_3), "--resume"]) == 0  # the same command, in this process
    assert "resume: continuing" in capsys.readouterr().err
    assert_same_run(reference, out)
    assert not (out / "checkpoints").exists()  # a finished run drops its checkpoints (output.keep_checkpoints)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


FAULTS = {
    "step:5": "continuing",  # mid-run, after step 5's record: resumes from step 4
    "eval:2": "continuing",  # during the evaluation at step 3
    "eval:4": "continuing",  # during the final evaluation: resumes from the end-of-training checkpoint
    "checkpoint:3": "continuing",  # half-way through writing step-000006: step-000004 is still good
    "checkpoint-latest:2": "continuing",  # step-000004 renamed into place, latest still names step-000002
    "eval:1": "has no checkpoint yet; starting from the beginning",  # during the first evaluation
}


@pytest.mark.parametrize("fault", FAULTS)
def test_killed_at_a_fault_point_then_resumed(tmp_path, data, reference, fault, capsys):
    out = tmp_path / "run"
    assert killed(out, data, fault, EVERY_3) == 137
    resume(out, data, EVERY_3)
    assert FAULTS[fault] in capsys.readouterr().err
    assert_same_run(reference, out)


# Stateful methods, several at a time: RNG in the loop (LoRA dropout), a replay memory, KL on its own
# data (a cursor), a Fisher and anchors, a mixed-in source, importance scores, generated samples,
# mixture-of-experts routing statistics.
COMBINATIONS = {
    "lora+replay+kl": [
        "methods.lora.r=4", "methods.lora.dropout=0.1",
        "methods.replay.memory=[{path: demo:capitals, limit: 12}]", "methods.replay.size_examples=6", "methods.replay.ratio=0.25",
        "methods.kl.data={path: demo:capitals, limit: 10}",
    ],
    "ewc+l2sp+mix+freeze": [
        "methods.ewc.data={path: demo:capitals, limit: 8}", "methods.ewc.samples=8", "methods.ewc.weight=100",
        "methods.l2sp.weight=0.1",
        "methods.mix.sources.general={path: demo:general, limit: 12}", "methods.mix.weights.general=0.25",
        "methods.freeze.by_importance=1", "methods.freeze.importance_data={path: demo:capitals, limit: 8}", "methods.freeze.importance_samples=4",
    ],
    "synthetic_replay+moe_lora": [
        "methods.synthetic_replay.prompts={path: demo:capitals, limit: 8}", "methods.synthetic_replay.num_samples=6",
        "methods.synthetic_replay.max_new_tokens=6", "methods.synthetic_replay.drop_unfinished=false", "methods.synthetic_replay.temperature=1.0",
        "methods.moe_lora.num_experts=2", "methods.moe_lora.top_k=1", "methods.moe_lora.r=4",
    ],
}


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_methods_resume_exactly(tmp_path, data, combination):
    options = COMBINATIONS[combination]
    step = random.Random(combination).randint(3, 7)
    train(tmp_path / "reference", data, *options)
    assert killed(tmp_path / "run", data, f"step:{step}", *options) == 137
    resume(tmp_path / "run", data, *options)
    assert_same_run(tmp_path / "reference", tmp_path / "run")
