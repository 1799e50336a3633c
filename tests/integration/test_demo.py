"""The demo shows real forgetting, and methods that reduce it, with numbers from the run."""

import json

import pytest

from forgetless.demo.run import STRATEGIES, run_demo
from forgetless.errors import UserError

pytestmark = pytest.mark.slow


def test_demo_shows_forgetting_and_remedies(tmp_path):
    # a subset keeps the suite fast; `forgetless demo` runs every strategy
    results = run_demo(tmp_path / "demo", strategies=["l2-sp", "wise-ft"])
    base = results["base"]["scores"]["capitals"]["exact_match"]
    runs = results["strategies"]
    assert list(runs) == ["full fine-tuning", "l2-sp", "wise-ft (interpolated)"]
    ft = runs["full fine-tuning"]
    assert base > 0.9, "the base model should have learned the capitals"
    assert ft["before"]["capitals"]["exact_match"] == pytest.approx(base)
    assert ft["after"]["elements"]["exact_match"] > 0.8, "plain fine-tuning learns the new task"
    assert ft["after"]["capitals"]["exact_match"] < base - 0.5, "plain fine-tuning forgets the capitals"
    for name, r in runs.items():
        if name != "full fine-tuning":
            assert r["after"]["capitals"]["exact_match"] > ft["after"]["capitals"]["exact_match"] + 0.2, name
    for name in ("results.json", "report.md", "report.html"):
        assert (tmp_path / "demo" / name).is_file()
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == results
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "data:image/png;base64," in html and "l2-sp" in html


def test_demo_refuses_unknown_strategies_and_foreign_dirs(tmp_path):
    with pytest.raises(UserError, match="unknown 'nope'"):
        run_demo(tmp_path / "d", strategies=["nope"])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="already holds files"):
        run_demo(tmp_path / "x")
    with pytest.raises(UserError, match="not a forgetless demo"):
        run_demo(tmp_path / "x", overwrite=True)
    assert (tmp_path / "x" / "mine.txt").read_text() == "keep me"
    assert "full fine-tuning" in STRATEGIES


def test_demo_continual_part_writes_the_sequence_report(tmp_path):
    run_demo(tmp_path / "demo", part="continual", quick_continual=True)
    runs = tmp_path / "demo" / "continual" / "runs"
    data = json.loads((runs / "results.json").read_text())
    assert data["tasks"] == ["capitals", "elements", "currencies"]
    assert set(data["strategies"]) == {"replay", "sequential", "joint"}
    for name in ("report.html", "results.csv", "summary.md"):
        assert (runs / name).is_file()
    assert (tmp_path / "demo" / "continual" / "sequence.yaml").is_file()
    with pytest.raises(UserError, match="--part"):
        run_demo(tmp_path / "other", part="nope")
