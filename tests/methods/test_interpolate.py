"""WiSE-FT weight interpolation: alpha 0 is the base, alpha 1 the fine-tuned model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from forgetless.cli import main
from forgetless.errors import UserError
from forgetless.interpolate import Interpolator, SweepPoint, interpolate_state, run_interpolation, select_alpha

pytestmark = pytest.mark.slow


def test_alpha_0_and_1_reproduce_base_and_finetuned(scenario):
    run = scenario.plain
    base = AutoModelForCausalLM.from_pretrained(scenario.base_dir)
    ft = AutoModelForCausalLM.from_pretrained(run.run_dir / "model")
    ids = torch.tensor([[5, 17, 300, 41, 9, 77]])
    with torch.no_grad():
        want_base, want_ft = base(ids).logits, ft(ids).logits
        interp = Interpolator(base, AutoModelForCausalLM.from_pretrained(run.run_dir / "model"))
        assert torch.equal(interp.at(0.0)(ids).logits, want_base)
        assert torch.equal(interp.at(1.0)(ids).logits, want_ft)
        half = interpolate_state(interp.base_state, interp.ft_state, 0.5)
        k = "model.layers.0.mlp.up_proj.weight"
        torch.testing.assert_close(half[k], (interp.base_state[k] + interp.ft_state[k]) / 2)


def test_sweep_trades_new_for_old_and_writes_the_chosen_model(scenario, tmp_path):
    run = scenario.plain
    out = tmp_path / "interp"
    result = run_interpolation(str(run.run_dir), alphas=(0.0, 0.5, 1.0), min_keep=0.8, output=str(out), generation=False)
    pts = {p["alpha"]: p["scores"] for p in result["points"]}
    assert result["roles"] == {"elements": "new", "capitals": "keep"}
    # the base keeps the capitals better than the fine-tuned model, which knows the elements better
    assert pts[0.0]["capitals"]["loss"] < pts[1.0]["capitals"]["loss"]
    assert pts[1.0]["elements"]["loss"] < pts[0.0]["elements"]["loss"]
    chosen = result["selection"]["alpha"]
    assert pts[chosen]["capitals"]["token_accuracy"] >= 0.8 * pts[0.0]["capitals"]["token_accuracy"]
    # the saved model is the interpolated one
    saved = json.loads((out / "interpolation.json").read_text())
    assert saved["selection"]["alpha"] == chosen and (out / "interpolation.csv").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    interp = Interpolator(AutoModelForCausalLM.from_pretrained(scenario.base_dir), AutoModelForCausalLM.from_pretrained(run.run_dir / "model"))
    ids = torch.tensor([[5, 17, 300, 41]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, interp.at(chosen)(ids).logits)
    # refuses to overwrite without being asked
    with pytest.raises(UserError, match="already exists"):
        run_interpolation(str(run.run_dir), alphas=(0.0, 1.0), output=str(out), generation=False)


def test_selection_rules():
    roles = {"new": "new", "old": "keep"}
    pts = [
        SweepPoint(0.0, {"new": {"exact_match": 0.0}, "old": {"exact_match": 1.0}}),
        SweepPoint(0.5, {"new": {"exact_match": 0.6}, "old": {"exact_match": 0.9}}),
        SweepPoint(1.0, {"new": {"exact_match": 1.0}, "old": {"exact_match": 0.2}}),
    ]
    assert select_alpha(pts, roles).alpha == 0.5  # best mean: 0.75
    assert select_alpha(pts, roles, min_keep=0.85).alpha == 0.5
    assert select_alpha(pts, roles, min_keep=0.1).alpha == 1.0
    assert select_alpha(pts, roles, min_keep=1.0).alpha == 0.0


def test_bad_inputs(tmp_path, capsys):
    assert main(["interpolate", str(tmp_path), "--alphas", "0,2"]) == 2
    assert "give values between 0 and 1" in capsys.readouterr().err
    assert main(["interpolate", str(tmp_path / "nope")]) == 2
    assert "not a run or model directory" in capsys.readouterr().err
    assert main(["interpolate", str(tmp_path), "--alphas", "a,b"]) == 2


def test_interpolation_is_written_in_place_without_a_fourth_copy(scenario):
    run = scenario.plain
    interp = Interpolator(AutoModelForCausalLM.from_pretrained(scenario.base_dir), AutoModelForCausalLM.from_pretrained(run.run_dir / "model"))
    pointers = {k: v.data_ptr() for k, v in interp.model.state_dict().items()}
    model = interp.at(0.3)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers  # the model's own tensors, written
    want = interpolate_state(interp.base_state, interp.ft_state, 0.3)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert len(interp.base_state) == len(interp.ft_state) == len(pointers)


def test_interpolate_takes_the_dtype(scenario, tmp_path):
    out = tmp_path / "interp"
    run_interpolation(str(scenario.plain.run_dir), alphas=(0.0, 1.0), output=str(out), generation=False, max_examples=4, dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


def test_a_lower_is_better_keep_set_counts_as_the_share_it_keeps():
    roles = {"new": "new", "general": "keep"}
    pts = [
        SweepPoint(0.0, {"new": {"score": 0.0}, "general": {"score": 40.0}}),  # perplexity 40 at the base
        SweepPoint(0.5, {"new": {"score": 0.5}, "general": {"score": 44.0}}),  # keeps 40/44 = 0.91
        SweepPoint(1.0, {"new": {"score": 0.9}, "general": {"score": 80.0}}),  # keeps 0.5
    ]
    lower = frozenset({"general"})
    assert select_alpha(pts, roles, min_keep=0.9, lower_is_better=lower).alpha == 0.5
    assert select_alpha(pts, roles, min_keep=0.95, lower_is_better=lower).alpha == 0.0
    # read as higher-is-better, the worst perplexity would look best
    assert select_alpha(pts, roles, min_keep=0.9).alpha == 1.0


def test_interpolation_scores_each_set_by_its_own_metric(scenario, tmp_path):
    from forgetless.config import DatasetSpec

    result = run_interpolation(str(scenario.plain.run_dir), new={"elements": "demo:elements"},
                               keep={"capitals": DatasetSpec(path="demo:capitals", metric="perplexity")},
                               alphas=(0.0, 1.0), output=str(tmp_path / "i"), generation=False, max_examples=8, min_keep=0.99)
    assert result["metrics"] == {"elements": "token_accuracy", "capitals": "perplexity"}
    assert all(p["scores"]["capitals"]["score"] == p["scores"]["capitals"]["perplexity"] for p in result["points"])
    base, tuned = (p["scores"]["capitals"]["score"] for p in result["points"])
    assert tuned > base and result["selection"]["alpha"] == 0.0  # the fine-tuned model's perplexity on capitals is worse
