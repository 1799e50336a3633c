"""`forgetless demo --real`'s pipeline on the tiny model (the real model is in tests/models/test_real_model.py)."""

import json

import pytest

import forgetless.demo.real as real
from forgetless.cli import main

pytestmark = pytest.mark.slow


def test_real_demo_pipeline_runs_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(real, "STEPS", 2)
    monkeypatch.setattr(real, "OWN_ANSWER_TOKENS", 8)
    name, methods, train = real.DEMO_STRATEGY  # a random model's samples never end: keep them, short
    replay = {**methods["synthetic_replay"], "max_new_tokens": 4, "drop_unfinished": False, "num_samples": 8}
    monkeypatch.setattr(real, "DEMO_STRATEGY", (name, {**methods, "synthetic_replay": replay}, train))
    out = tmp_path / "demo-real"
    assert main(["demo", "--real", "--model", "tiny", "-o", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["strategy"] for r in results["rows"]] == ["full fine-tuning", real.DEMO_STRATEGY[0]]
    manifest = results["probes"]
    assert manifest["capitals"]["asked"] == 178 and manifest["own_answers"]["instructions"] == 64
    # a random tiny model knows no capital: that probe is left out, the prose stays
    assert results["base"]["general"] > 0 and ("capitals" in results["base"]) == (manifest["capitals"]["base_right"] > 1)
    assert (out / "work" / "base" / "config.json").is_file()
    assert "| full fine-tuning |" in (out / "report.md").read_text() and "| full fine-tuning |" in capsys.readouterr().out
    second = json.loads((out / "runs" / real._slug(real.DEMO_STRATEGY[0]) / "summary.json").read_text())["train"]
    assert set(second["methods"]) == set(real.DEMO_STRATEGY[1])
    assert main(["demo", "--real", "--model", "tiny", "-o", str(out)]) == 2  # an earlier demo is not replaced silently
    assert "--overwrite" in capsys.readouterr().err


def test_model_without_real_is_refused(capsys):
    assert main(["demo", "--model", "x.gguf"]) == 2
    assert "--real" in capsys.readouterr().err
