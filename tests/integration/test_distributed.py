"""Two processes (torchrun, CPU/gloo) train like one process with the same global batch."""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import fast_overrides

pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """Run in a new process group and kill the whole group on timeout, so no worker outlives the test."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
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


def test_two_processes_match_one(tmp_path, pc_file):
    common = ("output.log_every=1", "train.max_steps=4", "eval.generation=false")
    one = _run([sys.executable, "-m", "forgetless", "train", *fast_overrides(tmp_path / "one", pc_file, *common, "train.micro_batch_size=2", "train.grad_accum_steps=4")])
    assert one.returncode == 0, one.stderr[-3000:]
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
