"""Flipped answers on the forgetting scenario: the base knows capitals, fine-tuning on elements loses some.

Every run writes flips.json (each flipped example with its prompt, reference and both answers) and
the counts into summary.json; a killed and resumed run writes the same flips (the before-training
verdicts are in the checkpoint).
"""

import json

import pytest

from tests.methods.test_contract import killed

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

GENERATED = ["eval.generation=true", "eval.max_new_tokens=6", "data.keep.capitals={path: demo:capitals, limit: 40, metric: exact_match}"]


def test_a_run_lists_the_answers_it_lost_and_gained(scenario):
    result = scenario.finetune("flips", *GENERATED)
    flips = json.loads((result.run_dir / "flips.json").read_text())
    capitals = flips["capitals"]
    assert capitals["role"] == "keep" and capitals["metric"] == "exact_match"
    assert capitals["judged"] == 40
    # the counts are those of the scores before and after
    assert capitals["right_before"] == round(result.before["capitals"]["exact_match"] * 40)
    assert capitals["right_after"] == round(result.after["capitals"]["exact_match"] * 40)
    assert capitals["right_before"] - len(capitals["lost"]) + len(capitals["gained"]) == capitals["right_after"]
    assert capitals["right_before"] >= 10 and len(capitals["lost"]) >= 3  # the base knew capitals; fine-tuning lost some
    lost = capitals["examples"]["lost"][0]
    assert lost["prompt"].startswith("The capital of") or "capital" in lost["prompt"]
    assert lost["before"] != lost["after"] and lost["reference"]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["flips"]["capitals"]["lost"] == len(capitals["lost"])
    assert result.flips == summary["flips"]
    assert "Flipped answers" in (result.run_dir / "summary.md").read_text()
    from forgetless.report import write_report

    html = write_report(result.run_dir)["html"].read_text()
    assert "Flipped answers" in html and "lost answers" in html


def test_a_resumed_run_writes_the_same_flips(scenario):
    whole = scenario.finetune("flips-whole", *GENERATED, "output.checkpoint_every=8", steps=16)
    assert killed(scenario.config("flips-killed", *GENERATED, "output.checkpoint_every=8", steps=16), "step:12") == 137
    resumed = scenario.finetune("flips-killed", *GENERATED, "output.checkpoint_every=8", "output.resume=true",
                                "output.overwrite=false", steps=16)
    assert json.loads((resumed.run_dir / "flips.json").read_text()) == json.loads((whole.run_dir / "flips.json").read_text())

