"""Helpers for the resume tests: runs, killed runs, and comparing two runs bit for bit.

A run is killed either for real (SIGKILL of a ``forgetless train`` subprocess) or, to save the
start-up time of a new interpreter, in a forked copy of the test process that ends with
``os._exit(137)`` at a named point (``FORGETLESS_FAULT``, see forgetless/checkpoint.py): no
cleanup, no flush, no ``finally`` runs, as under SIGKILL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import forgetless
from tests.conftest import PC_RECORDS, fast_overrides, write_jsonl

WALL_CLOCK = ("elapsed_s", "tokens_per_s", "train_time_s")


def overrides(out: Path, data: Path, *extra: str) -> list[str]:
    """A short run that checkpoints every 2 steps and logs every step."""
    return fast_overrides(
        out, data, "train.max_steps=8", "eval.generation=false", "output.log_every=1", "output.checkpoint_every=2", *extra
    )


def train(out: Path, data: Path, *extra: str):
    return forgetless.train(forgetless.load_config(None, overrides(out, data, *extra)))


def resume(out: Path, data: Path, *extra: str):
    return train(out, data, *extra, "output.resume=true")


def killed(out: Path, data: Path, fault: str, *extra: str) -> int:
    """Train in a forked child that dies at ``fault`` (POINT:N); returns its exit code."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 3
        try:
            os.environ["FORGETLESS_FAULT"] = fault
            train(out, data, *extra)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def killed_process(out: Path, data: Path, fault: str, *extra: str) -> int:
    """Like :func:`killed`, in a ``forgetless train`` process of its own: for runs that start worker
    processes or threads of their own (a fork of the test process, which has threads, could hang them)."""
    import subprocess
    import sys

    env = {**os.environ, "FORGETLESS_FAULT": fault}
    proc = subprocess.run([sys.executable, "-m", "forgetless", "train", *overrides(out, data, *extra)], env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final weights of a run, from its saved model (full model or adapter)."""
    model = Path(run_dir) / "model"
    files = sorted(p for p in model.glob("*.safetensors"))
    assert files, f"no weights in {model}"
    out = {}
    for f in files:
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in lines]


def summary(run_dir: Path) -> dict:
    s = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    s["train"] = {k: v for k, v in s["train"].items() if k not in WALL_CLOCK}
    return s


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights; the same metrics and summary apart from wall-clock fields."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"
    assert metrics(a) == metrics(b)
    assert summary(a) == summary(b)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """The resume tests' training data (prompt/completion records), written once."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "pc.jsonl", PC_RECORDS)
