"""forgetless diagnose: the share of a run's forgetting that k old examples and a few steps recover."""

import json

import pytest

from forgetless.cli import main
from forgetless.recipes.diagnose import MIN_DROP, recovered_share, verdict

pytestmark = pytest.mark.usefixtures("one_thread")


def test_recovered_share_by_hand():
    assert recovered_share(0.8, 0.2, 0.5, True, 0.01) == pytest.approx(0.5)
    assert recovered_share(1.0, 3.0, 1.5, False, 0.01) == pytest.approx(0.75)  # a loss: lower is better
    assert recovered_share(0.8, 0.795, 0.9, True, 0.01) is None  # nothing lost
    assert recovered_share(0.8, 0.2, 0.1, True, 0.01) == pytest.approx(-1 / 6)  # the few steps made it worse
    assert verdict(None) == "nothing lost" and verdict(0.6).startswith("mostly spurious") and verdict(0.2) == "knowledge lost"
    assert verdict(-0.1) == "knowledge lost" and verdict(-0.5) == "knowledge lost (the few steps lost more)"


def test_a_drop_within_the_noise_has_no_share():
    """The real-model diagnose of 2026-12-04: general token accuracy 0.390 -> 0.380, then 0.340 after
    the few steps. A share of that 1-point loss read -400%; below MIN_DROP (2 points) there is none."""
    assert MIN_DROP == 0.02
    assert recovered_share(0.3902, 0.3802, 0.3400, True, 0.01) == pytest.approx(-4.0, rel=1e-2)
    assert recovered_share(0.3902, 0.3802, 0.3400, True, MIN_DROP) is None
    assert recovered_share(20.0, 20.3, 20.0, False, MIN_DROP) is None  # a perplexity 1.5% higher: relative, below 2%
    assert recovered_share(20.0, 22.0, 21.0, False, MIN_DROP) == pytest.approx(0.5)


def test_diagnose_refuses_a_negative_min_drop(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path), "--min-drop", "-1"]) == 2
    assert "--min-drop -1" in capsys.readouterr().err


@pytest.mark.slow
def test_diagnose_a_run_that_forgot(scenario, capsys):
    run_dir = scenario.plain.run_dir
    assert main(["diagnose", str(run_dir), "--k", "10", "--steps", "10"]) == 0
    assert "diagnose.json" in capsys.readouterr().out
    report = json.loads((run_dir / "diagnose.json").read_text())
    r = report["sets"]["capitals"]
    assert r["scored_examples"] == 30  # 40 capitals, 10 trained on
    assert r["start"] > r["final"]  # the run forgot
    assert r["recovered"] > r["final"]  # ten examples give some of it back
    assert r["recovered_share"] == pytest.approx((r["recovered"] - r["final"]) / (r["start"] - r["final"]))
    assert (run_dir / "diagnose" / "capitals" / "summary.json").is_file()


def test_diagnose_refuses_what_it_cannot_do(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "not a finished run directory" in capsys.readouterr().err


def test_diagnose_a_keep_set_read_through_columns(tmp_path, pc_file, capsys):
    """A keep set whose records name their fields otherwise (``columns``): diagnose reads them mapped
    once (it used to map them a second time and crash), trains on k of them and scores the rest."""
    from tests.conftest import fast_overrides, write_jsonl

    old = write_jsonl(tmp_path / "old.jsonl", [{"question": f"What is {i} times two?", "answer": f" {2 * i}"} for i in range(16)])
    run_dir = tmp_path / "run"
    keep = f"data.keep.old={{path: {old}, columns: {{prompt: question, completion: answer}}}}"
    assert main(["train", *fast_overrides(run_dir, pc_file, keep, "train.max_steps=2", "eval.generation=false")]) == 0
    capsys.readouterr()
    assert main(["diagnose", str(run_dir), "--k", "4", "--steps", "1"]) == 0
    r = json.loads((run_dir / "diagnose.json").read_text())["sets"]["old"]
    assert r["scored_examples"] == 8  # 16 records, 4 trained on, the rest capped at eval.max_examples (8)
    assert r["metric"] == "token_accuracy"  # with eval.generation=false, prompt/completion records' headline
    assert all(isinstance(r[k], float) for k in ("start", "final", "recovered"))
