"""The headline metric of a set: names, direction, defaults, and how configs name it."""

import pytest

from forgetless.config import load_config
from forgetless.data.formats import EncodeStats, Example
from forgetless.errors import ConfigError, UserError
from forgetless.eval.headline import check_metric, default_metric, headline_value, higher_is_better
from forgetless.eval.scoring import HIGHER_IS_BETTER
from forgetless.eval.scoring import higher_is_better as exported
from forgetless.eval.sets import make_eval_set
from tests.conftest import write_jsonl


def test_direction_of_every_metric():
    assert exported is higher_is_better
    assert {m for m, up in HIGHER_IS_BETTER.items() if not up} == {"loss", "perplexity"}
    assert higher_is_better("exact_match") and higher_is_better("multiple_choice_norm")
    assert not higher_is_better("loss") and not higher_is_better("perplexity")
    assert higher_is_better("scores/f1.py:f1") and higher_is_better("mypkg.metrics:bleu")  # user functions
    assert higher_is_better("acc_norm") and not higher_is_better("word_perplexity")  # lm-eval's names


def pc(i: int) -> Example:
    return Example([1, 2, 3], [-100, 2, 3], "r", prompt_ids=[1], reference=str(i))


def test_default_is_the_natural_headline_of_the_data():
    text = Example([1, 2], [1, 2], "r")
    mc = Example([1, 2, 3], [-100, 2, 3], "r", prompt_ids=[1], reference="a", choices=[[2], [3]], choice_chars=[1, 1], answer=0)
    assert default_metric([pc(0)], generation=True) == "exact_match"
    assert default_metric([pc(0)], generation=False) == "token_accuracy"
    assert default_metric([text], generation=True) == "token_accuracy"
    assert default_metric([mc, pc(1)], generation=True) == "multiple_choice"


def test_value_of_each_metric_in_a_result():
    r = {"loss": 2.0, "perplexity": 7.4, "token_accuracy": 0.5, "exact_match": 0.25, "mc_accuracy": 0.75, "mc_accuracy_norm": 1.0}
    assert [headline_value(r, m) for m in ("loss", "perplexity", "token_accuracy", "exact_match", "multiple_choice", "multiple_choice_norm")] == [
        2.0, 7.4, 0.5, 0.25, 0.75, 1.0]
    assert headline_value({"loss": 1.0}, "exact_match") is None


def test_unknown_metric_fails_at_config_load_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"data\.eval\.x\.metric: unknown metric 'exact_macth' \(did you mean 'exact_match'\?\)"):
        load_config(None, ["data.train=demo:capitals", "data.eval.x={path: demo:capitals, metric: exact_macth}"])
    for bad, message in (("f.py:", "not FILE.py:FUNCTION"), ("a b:fn", "neither a .py file nor a module"), ("nofile.py:fn", "scoring file .*nofile.py not found")):
        with pytest.raises(ConfigError, match=message):
            check_metric(bad, "data.eval.x.metric")


def test_scoring_file_is_resolved_against_the_yaml(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "score.py").write_text("def f1(p, r, records):\n    return 1.0\n")
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    cfg_file = tmp_path / "conf" / "run.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(
        "data:\n  train: ../d.jsonl\n  eval:\n    x: {path: ../d.jsonl, metric: ../metrics/score.py:f1}\n"
        "    y: {path: ../d.jsonl, metric: mypkg.metrics:bleu}\n    z: {path: ../d.jsonl, metric: perplexity}\n"
    )
    cfg = load_config(cfg_file)
    assert cfg.data.eval["x"].metric == f"{(tmp_path / 'metrics' / 'score.py').resolve()}:f1"
    assert cfg.data.eval["y"].metric == "mypkg.metrics:bleu"
    assert cfg.data.eval["z"].metric == "perplexity"


def test_a_metric_the_data_cannot_give_fails_before_training():
    text = [Example([1, 2], [1, 2], "r")]
    with pytest.raises(UserError, match="data.keep.general: metric multiple_choice needs multiple-choice records"):
        make_eval_set("general", "keep", text, EncodeStats(), "multiple_choice", True, "data.keep.general")
    with pytest.raises(UserError, match="data.keep.general: metric exact_match .* no prompt"):
        make_eval_set("general", "keep", text, EncodeStats(), "exact_match", True, "data.keep.general")
    s = make_eval_set("task", "new", [pc(0)], EncodeStats(), None, True, "data.eval.task")
    assert (s.metric, s.higher_is_better) == ("exact_match", True)
    assert not make_eval_set("task", "new", [pc(0)], EncodeStats(), "loss", True, "w").higher_is_better


def test_harness_config_is_checked_at_load(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="eval.harness.include_path .*not found"):
        load_config(None, ["data.train=demo:capitals", "eval.harness.tasks=[t]", f"eval.harness.include_path={tmp_path / 'none'}"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"eval.harness.tasks needs lm-evaluation-harness.*pip install 'forgetless\[harness\]'"):
        load_config(None, ["data.train=demo:capitals", "eval.harness.tasks=[t]"])
