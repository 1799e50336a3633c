"""A hand-made compare run: results.json (tests/report/data) plus each run's metrics.jsonl."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def write_training_log(run: Path, steps: int, start_loss: float, seed: int, resumed_at: int | None = None) -> None:
    """A metrics.jsonl as the training recipe writes it: eval at step 0, a loss record per step,
    eval at the end; with ``resumed_at``, the steps after it are written twice (a resumed run)."""
    rng = random.Random(seed)
    records = [{"step": 0, "eval": {"capitals": {"loss": 4.0, "exact_match": 0.0}}}]
    for step in range(1, steps + 1):
        loss = 0.25 + (start_loss - 0.25) * math.exp(-step / 7) + rng.uniform(-0.08, 0.08)
        records.append({"step": step, "epoch": round(step / steps, 4), "loss": loss, "lr": 1e-3, "target_tokens": 512,
                        "tokens_per_s": 2000.0 + rng.uniform(-50, 50), "elapsed_s": 0.1 * step})
    records.append({"step": steps, "eval": {"capitals": {"loss": 0.3, "exact_match": 0.9}}})
    if resumed_at is not None:
        records[resumed_at + 1:resumed_at + 1] = [dict(r, loss=r["loss"] + 5.0) for r in records[resumed_at + 1:-1]]
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def make_compare_dir(path: Path) -> Path:
    """A compare run of 5 strategies (2 baselines) on 3 tasks, 30 steps per task, 90 for joint."""
    shutil.copy(DATA / "results.json", path / "results.json")
    results = json.loads((DATA / "results.json").read_text(encoding="utf-8"))
    for i, (name, s) in enumerate(results["strategies"].items()):
        for t, rel in enumerate(s["runs"]):
            steps = 90 if s["baseline"] == "joint" else 30
            write_training_log(path / rel, steps, start_loss=3.2 + 0.3 * t - 0.1 * i, seed=10 * i + t)
    return path


@pytest.fixture
def compare_dir(tmp_path: Path) -> Path:
    return make_compare_dir(tmp_path)


@pytest.fixture(scope="session")
def written_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The report of the hand-made compare run, written once for the tests that only read it."""
    from forgetless.report import write_report

    return write_report(make_compare_dir(tmp_path_factory.mktemp("compare")))
