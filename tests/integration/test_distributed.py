"""Two processes (torchrun, CPU/gloo) train like one process with the same global batch."""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import fast_overrides

pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run in a new process group and kill the whole group on timeout, so no worker outlives the test."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out:\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r], [r for r in recs if "eval" in r]


def _one(overrides: list[str]) -> None:
    """The one-process reference, in this process (no second start-up)."""
    import forgetless

    forgetless.train(forgetless.load_config(None, overrides))


def test_two_processes_match_one(tmp_path, pc_file):
    common = ("output.log_every=1", "train.max_steps=4", "eval.generation=false")
    _one(fast_overrides(tmp_path / "one", pc_file, *common, "train.micro_batch_size=2", "train.grad_accum_steps=4"))
    two = _run([sys.executable, "-m", "forgetless", "train", *fast_overrides(tmp_path / "two", pc_file, *common, "train.micro_batch_size=2", "train.grad_accum_steps=2"), "--nproc", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    l1, e1 = _losses(tmp_path / "one")
    l2, e2 = _losses(tmp_path / "two")
    assert len(l1) == len(l2) == 4
    assert l2 == pytest.approx(l1, rel=1e-4)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["train"]["processes"] == 2 and summary["train"]["global_batch"] == 8
    # evaluation is sharded across the processes and summed: the same scores as one process
    assert e2[-1]["eval"]["task"]["loss"] == pytest.approx(e1[-1]["eval"]["task"]["loss"], rel=1e-4)
    assert e2[-1]["eval"]["task"]["target_tokens"] == e1[-1]["eval"]["task"]["target_tokens"]


def _terms(run_dir, name):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["terms"][name] for r in recs if "terms" in r]


def test_kl_on_its_own_data_is_the_same_with_two_processes(tmp_path, pc_file):
    """The KL data of every step is drawn, sharded and grouped like the training batch (the recipe
    hands it to the method), so 2 processes pair the same KL data with every step as 1 process,
    although length-grouping gives each process a different number of micro-batches."""
    common = ("output.log_every=1", "train.max_steps=3", "eval.generation=false", "eval.before=false",
              "methods.kl.data={path: demo:currencies, limit: 24}", "methods.kl.weight=1")
    _one(fast_overrides(tmp_path / "one", pc_file, *common, "train.micro_batch_size=2", "train.grad_accum_steps=4"))
    two = _run([sys.executable, "-m", "forgetless", "train", *fast_overrides(tmp_path / "two", pc_file, *common, "train.micro_batch_size=2", "train.grad_accum_steps=2"), "--nproc", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    k1, k2 = _terms(tmp_path / "one", "kl"), _terms(tmp_path / "two", "kl")
    assert len(k1) == len(k2) == 3
    assert k1[0] == pytest.approx(0.0, abs=1e-6)  # the model starts as its teacher
    # a KL of 2e-4 after two AdamW steps: the processes' gradient sums differ in float order, and
    # Adam's first steps (about lr x sign(g)) magnify that where a gradient is near zero
    assert k1[1] > 0 and k2 == pytest.approx(k1, rel=1e-3, abs=1e-7)
    assert _losses(tmp_path / "two")[0] == pytest.approx(_losses(tmp_path / "one")[0], rel=1e-4)
