"""`forgetless report RUN_DIR`: writes the files and prints their paths; exit 2 on bad input."""

from __future__ import annotations

import json

from forgetless.cli import main

ONE_TASK = {
    "kind": "continual", "forgetless_version": "0.1.0", "created": "2026-11-28T20:00:00Z",
    "tasks": ["capitals"], "metrics": {"capitals": "token_accuracy"}, "higher_is_better": {"capitals": True}, "general": [],
    "strategies": {"lora": {"baseline": None, "matrix": [[0.31], [0.84]], "general": {}, "time_s": 3.5,
                            "trainable_params": 73696, "total_params": 1777888, "peak_memory_mb": None, "runs": [], "config": None}},
}


def test_report_command_writes_and_prints_paths(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(ONE_TASK))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"html: {tmp_path / 'report.html'}", f"csv: {tmp_path / 'results.csv'}", f"markdown: {tmp_path / 'summary.md'}"]
    page = (tmp_path / "report.html").read_text()
    assert "at least two tasks trained in sequence" in page and "84.0%" in page
    assert (tmp_path / "results.csv").read_text().splitlines()[1].startswith("lora,,0.84,0.84,,,,0.84,3.5,73696,1777888,")


def test_missing_results_json_exits_2_with_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"forgetless: error: {tmp_path / 'results.json'}: not found; run `forgetless continual")
    assert "Traceback" not in captured.err and not list(tmp_path.iterdir())
