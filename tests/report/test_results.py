"""Reading results.json (one-line errors on bad input) and the runs' training logs."""

from __future__ import annotations

import json

import pytest

from forgetless.errors import UserError
from forgetless.report.results import load_results, read_loss_curve
from tests.report.conftest import write_training_log


def _edit(run_dir, change) -> None:
    raw = json.loads((run_dir / "results.json").read_text())
    change(raw)
    (run_dir / "results.json").write_text(json.dumps(raw, indent=2))


def test_missing_results_says_what_to_run(tmp_path):
    with pytest.raises(UserError, match=r"results\.json: not found; run `forgetless continual CONFIG` or `forgetless compare"):
        load_results(tmp_path)
    with pytest.raises(UserError, match="no such directory"):
        load_results(tmp_path / "nope")


def test_invalid_json_names_the_line(tmp_path):
    (tmp_path / "results.json").write_text('{\n  "kind": "compare",\n  "tasks": [,]\n}')
    with pytest.raises(UserError, match=r"results\.json:3: not valid JSON"):
        load_results(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("kind"), r"kind: expected one of continual, compare, got None"),
    (lambda r: r.update(tasks=[]), r"tasks: expected a non-empty list"),
    (lambda r: r.update(tasks=["a", "a", "b"]), r"tasks: a task name appears twice"),
    (lambda r: r.update(strategies={}), r"strategies: expected an object with at least one strategy"),
    (lambda r: r["strategies"]["lora"]["matrix"].pop(), r"strategies\.lora\.matrix: expected 4 rows .*got 3"),
    (lambda r: r["strategies"]["ewc"]["matrix"][2].append(0.5), r"strategies\.ewc\.matrix\[2\]: expected null or 3 numbers"),
    (lambda r: r["strategies"]["ewc"]["matrix"][1].__setitem__(0, "high"), r"strategies\.ewc\.matrix\[1\]: expected numbers or null"),
    (lambda r: r["strategies"]["lora"]["general"]["general"]["perplexity"].pop(), r"general\.general\.perplexity: expected 4 values"),
    (lambda r: r.update(higher_is_better={"capitals": "yes"}), r"higher_is_better: expected an object"),
])
def test_malformed_results_give_one_line_naming_the_field(compare_dir, change, message):
    _edit(compare_dir, change)
    with pytest.raises(UserError, match=message) as e:
        load_results(compare_dir)
    assert "\n" not in str(e.value) and "regenerate it" in str(e.value)


def test_direction_defaults_from_the_metric_name(compare_dir):
    def change(r):
        r["metrics"]["elements"] = "perplexity"
        del r["higher_is_better"]
    _edit(compare_dir, change)
    assert load_results(compare_dir).directions == [True, False, True]


def test_loss_curve_offsets_each_task_and_marks_boundaries(compare_dir):
    results = load_results(compare_dir)
    seq = next(s for s in results.strategies if s.name == "sequential")
    curve = read_loss_curve(results, seq)
    assert curve.boundaries == [30, 60]
    assert curve.steps == list(range(1, 91))
    joint = read_loss_curve(results, next(s for s in results.strategies if s.name == "joint"))
    assert joint.boundaries == [] and joint.steps[-1] == 90


def test_resumed_steps_count_once_and_a_torn_line_is_noted(compare_dir):
    results = load_results(compare_dir)
    lora = next(s for s in results.strategies if s.name == "lora")
    first = compare_dir / lora.runs[0]
    write_training_log(first, 30, start_loss=3.0, seed=1, resumed_at=12)  # steps 13..30 written twice
    with open(first / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "loss": 0.')  # killed mid-write
    curve = read_loss_curve(results, lora)
    assert curve.steps[:30] == list(range(1, 31)) and curve.boundaries == [30, 60]
    assert max(curve.losses[:30]) < 5.0  # the later copy of each repeated step wins (the first had +5)
    assert any("lora/task-1-capitals/metrics.jsonl line" in n for n in results.notes)


def test_missing_log_leaves_the_curve_out_with_a_note(compare_dir):
    results = load_results(compare_dir)
    ewc = next(s for s in results.strategies if s.name == "ewc")
    (compare_dir / ewc.runs[1] / "metrics.jsonl").unlink()
    assert read_loss_curve(results, ewc) is None
    assert results.notes == ["ewc: no training log at ewc/task-2-elements/metrics.jsonl; its loss curve is left out"]
