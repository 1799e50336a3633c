"""`forgetless report` on a plain `forgetless train` run directory: a one-run report.html."""

from __future__ import annotations

import hashlib
import json

from forgetless.report import write_report
from tests.report.conftest import write_training_log


def _scores(em_new: float, em_old: float, loss_new: float, loss_old: float) -> dict:
    return {"elements": {"loss": loss_new, "perplexity": 2.718 ** loss_new, "token_accuracy": 0.5, "exact_match": em_new, "examples": 86},
            "capitals": {"loss": loss_old, "perplexity": 2.718 ** loss_old, "token_accuracy": 0.6, "exact_match": em_old, "examples": 178}}


def test_single_run_gets_report_html_and_keeps_its_summary(tmp_path):
    before, after = _scores(0.0, 0.99, 3.1, 0.05), _scores(1.0, 0.12, 0.02, 2.9)
    sets = [{"set": "elements", "role": "new"}, {"set": "capitals", "role": "keep"}]
    summary = {"sets": sets, "before": before, "after": after,
               "train": {"steps": 30, "tokens": 9000, "final_loss": 0.31, "train_time_s": 4.2, "trainable_params": 1704192,
                         "total_params": 1704192, "methods": {}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "summary.md").write_text("# Run summary\n")
    (tmp_path / "config.yaml").write_text("model:\n  name_or_path: tiny\ntrain:\n  lr: 0.001\n")
    write_training_log(tmp_path, 30, start_loss=3.0, seed=3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        for step in (10, 20):
            f.write(json.dumps({"step": step, "eval": _scores(step / 30, 0.99 - step / 40, 1.0, 1.0)}) + "\n")
    digest = hashlib.sha256((tmp_path / "summary.md").read_bytes()).hexdigest()

    paths = write_report(tmp_path)

    assert paths == {"html": tmp_path / "report.html"}
    assert hashlib.sha256((tmp_path / "summary.md").read_bytes()).hexdigest() == digest
    page = paths["html"].read_text()
    assert "<td class=good>0 → 1<" in page  # the new task learned
    assert "<td class=bad>0.99 → 0.12<" in page  # the old one forgotten
    assert "<td class=bad>0.05 → 2.9<" in page  # its loss rose: lower is better
    assert page.count("data:image/png;base64,") == 1 and "name_or_path: tiny" in page
    assert "http://" not in page and "https://" not in page
