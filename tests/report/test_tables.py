"""The comparison table, recomputed from hand-made matrices, against numbers computed by hand."""

from __future__ import annotations

import csv
import io
import json

import pytest

from forgetless.report.results import load_results
from forgetless.report.tables import (
    best_rows, columns, results_csv, strategy_metrics, summary_markdown, table_rows,
)


@pytest.fixture
def rows(compare_dir):
    results = load_results(compare_dir)
    return results, {r["strategy"]: r for r in table_rows(results)}


def test_sequential_baseline_row_is_the_hand_computed_one(rows):
    # R = before [.02 .00 .01] / after 1 [.95 .01 .02] / after 2 [.10 .97 .03] / after 3 [.05 .12 .96]
    _, by_name = rows
    r = by_name["sequential"]
    assert r["final_average"] == pytest.approx((0.05 + 0.12 + 0.96) / 3)
    assert r["average_incremental"] == pytest.approx((0.95 + (0.10 + 0.97) / 2 + (0.05 + 0.12 + 0.96) / 3) / 3)
    assert r["bwt"] == pytest.approx(((0.05 - 0.95) + (0.12 - 0.97)) / 2)
    assert r["fwt"] == pytest.approx(((0.01 - 0.00) + (0.03 - 0.01)) / 2)
    assert r["forgetting"] == pytest.approx(((0.95 - 0.05) + (0.97 - 0.12)) / 2)
    assert r["plasticity"] == pytest.approx((0.95 + 0.97 + 0.96) / 3)
    # general probe perplexity 40 -> 85: 45 points of perplexity lost
    assert r["general_general"] == pytest.approx(-45.0)
    assert (r["time_s"], r["trainable_params"], r["peak_memory_mb"]) == (31.4, 1704192, 912.0)


def test_replay_row_and_the_forgetting_uses_the_best_earlier_score(rows):
    # R = after 1 [.95 .01 .02] / after 2 [.85 .95 .02] / after 3 [.80 .88 .94]
    _, by_name = rows
    r = by_name["replay"]
    assert r["bwt"] == pytest.approx(((0.80 - 0.95) + (0.88 - 0.95)) / 2)
    assert r["forgetting"] == pytest.approx(((0.95 - 0.80) + (0.95 - 0.88)) / 2)
    assert r["general_general"] == pytest.approx(40.0 - 57.0)


def test_joint_baseline_has_only_what_rows_0_and_T_define(rows):
    _, by_name = rows
    r = by_name["joint"]
    assert r["final_average"] == pytest.approx((0.90 + 0.92 + 0.91) / 3)
    assert [r[k] for k in ("average_incremental", "bwt", "fwt", "forgetting", "plasticity")] == [None] * 5
    assert r["general_general"] == pytest.approx(-20.0)


def test_lower_is_better_tasks_keep_bwt_negative_for_forgetting():
    # losses: task 1 learned to 0.5, then rises to 2.0 (forgotten); task 2 learned to 0.4
    R = [[3.0, 3.0], [0.5, 2.5], [2.0, 0.4]]
    m = strategy_metrics(R, [False, False])
    assert m["bwt"] == pytest.approx(-(2.0 - 0.5))
    assert m["forgetting"] == pytest.approx(2.0 - 0.5)
    assert m["fwt"] == pytest.approx(-(2.5 - 3.0))  # task 1 lowered task 2's loss: positive transfer
    assert m["final_average"] == pytest.approx((2.0 + 0.4) / 2)
    assert m["plasticity"] == pytest.approx((0.5 + 0.4) / 2)


def test_mixed_directions_leave_averages_undefined_but_keep_transfer():
    R = [[0.0, 3.0], [0.9, 2.5], [0.6, 0.4]]
    m = strategy_metrics(R, [True, False])
    assert m["final_average"] is None and m["plasticity"] is None and m["average_incremental"] is None
    assert m["bwt"] == pytest.approx(0.6 - 0.9)


def test_one_task_has_no_transfer_or_forgetting():
    m = strategy_metrics([[0.1], [0.8]], [True])
    assert m["final_average"] == pytest.approx(0.8) and m["plasticity"] == pytest.approx(0.8)
    assert m["bwt"] is None and m["fwt"] is None and m["forgetting"] is None


def test_best_values_follow_each_column_direction(rows):
    results, by_name = rows
    ordered = list(by_name.values())
    names = lambda col: {ordered[i]["strategy"] for i in best_rows(ordered, col)}  # noqa: E731
    cols = {c.key: c for c in columns(results)}
    assert names(cols["final_average"]) == {"joint"}
    assert names(cols["bwt"]) == {"replay"}  # the least negative
    assert names(cols["forgetting"]) == {"replay"}  # the smallest
    assert names(cols["fwt"]) == {"sequential", "ewc"}  # a tie: both highlighted
    assert names(cols["peak_memory_mb"]) == {"lora"}
    assert names(cols["trainable_params"]) == set()  # no better direction


def test_csv_is_one_row_per_strategy_with_the_recomputed_numbers(rows, compare_dir):
    results, by_name = rows
    parsed = list(csv.DictReader(io.StringIO(results_csv(results, list(by_name.values())))))
    assert [p["strategy"] for p in parsed] == ["sequential", "joint", "lora", "ewc", "replay"]
    seq = parsed[0]
    assert float(seq["bwt"]) == pytest.approx(-0.875) and float(seq["general_general_retention"]) == -45.0
    assert parsed[1]["bwt"] == "" and parsed[1]["baseline"] == "joint"
    # derived from the matrix, not copied from the stored summary
    stored = json.loads((compare_dir / "results.json").read_text())["strategies"]["sequential"]["summary"]
    assert float(seq["final_average"]) == pytest.approx(stored["final_average"], abs=1e-4)


def test_markdown_names_directions_and_shows_matrices(rows):
    results, by_name = rows
    md = summary_markdown(results, list(by_name.values()))
    assert "forgetting (lower is better)" in md and "BWT (higher is better)" in md
    assert "| sequential (baseline: sequential) | 37.7% | 62.1% | -87.5 pts | +1.5 pts | 87.5 pts | 96.0% |" in md
    assert "| task 2: elements | 10.0% | 97.0% | 3.0% |" in md
    assert md.count("## ") == len(results.strategies)


def test_loss_metric_columns_say_lower_is_better(compare_dir):
    raw = json.loads((compare_dir / "results.json").read_text())
    raw["metrics"] = dict.fromkeys(raw["tasks"], "loss")
    raw["higher_is_better"] = dict.fromkeys(raw["tasks"], False)
    (compare_dir / "results.json").write_text(json.dumps(raw))
    results = load_results(compare_dir)
    labels = {c.key: c.better for c in columns(results)}
    assert labels["final_average"] == labels["plasticity"] == "lower" and labels["bwt"] == "higher"
    assert "final average (lower is better)" in summary_markdown(results, table_rows(results))
