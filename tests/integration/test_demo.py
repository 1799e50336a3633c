"""The demo shows real forgetting, with numbers from the run."""

import json

import pytest

from forgetless.demo.run import run_demo

pytestmark = pytest.mark.slow


def test_demo_shows_forgetting(tmp_path):
    results = run_demo(tmp_path / "demo")
    base = results["base"]["scores"]["capitals"]["exact_match"]
    ft = results["strategies"]["full fine-tuning"]
    assert base > 0.5, "the base model should have learned the capitals"
    assert ft["before"]["capitals"]["exact_match"] == pytest.approx(base)
    assert ft["after"]["elements"]["exact_match"] > ft["before"]["elements"]["exact_match"] + 0.3
    assert ft["after"]["capitals"]["exact_match"] < base - 0.3, "plain fine-tuning should forget the capitals"
    for name in ("results.json", "report.md", "report.html"):
        assert (tmp_path / "demo" / name).is_file()
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == results
    assert "data:image/png;base64," in (tmp_path / "demo" / "report.html").read_text()
