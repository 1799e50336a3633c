"""User scoring functions, and the headline score of every set in a run and in `forgetless eval`."""

import json

import pytest

import forgetless
from forgetless.cli import main
from forgetless.config import DataConfig, TinyModelConfig
from forgetless.data.formats import Encoder
from forgetless.data.loading import Record
from forgetless.errors import UserError
from forgetless.eval.scoring import score_examples
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer
from tests.conftest import FAST_MODEL, write_jsonl

TOK = load_tiny_tokenizer()
MODEL = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), TOK, seed=1)
RECORDS = [{"prompt": f"Q{i}:", "completion": f" a{i}", "id": i} for i in range(5)]
EXAMPLES, _ = Encoder(TOK, DataConfig()).encode_all([Record(r, f"r{i}") for i, r in enumerate(RECORDS)])

SCORERS = '''
import json, math

def ids(predictions, references, records):
    with open(__file__ + ".json", "w") as f:  # what the function was given, for the test to read
        json.dump([predictions, references, records], f)
    return {"score": len(predictions) / 10, "mean_id": sum(r["id"] for r in records) / len(records)}

def plain(predictions, references, records):
    return sum(p == r for p, r in zip(predictions, references))

def fails(predictions, references, records):
    return 1 / 0

def text(predictions, references, records):
    return "high"

def nan(predictions, references, records):
    return math.nan

def no_score(predictions, references, records):
    return {"f1": 0.5}

def shadows(predictions, references, records):
    return {"score": 0.5, "loss": 1.0}
'''


@pytest.fixture
def scorers(tmp_path):
    path = tmp_path / "scorers.py"
    path.write_text(SCORERS)
    return path


def score(metric, **kw):
    return score_examples(MODEL, EXAMPLES, TOK, batch_size=2, generation=False, max_new_tokens=2, metric=metric, name="qa", **kw)


def test_function_gets_generations_references_and_records(scorers):
    got = score(f"{scorers}:ids")
    assert got["score"] == 0.5 and got["mean_id"] == 2.0
    assert "exact_match" in got and "loss" in got  # the built-in scores stay
    predictions, references, records = json.loads(scorers.with_suffix(".py.json").read_text())
    assert references == [r["completion"] for r in RECORDS] and records == RECORDS
    assert len(predictions) == 5 and all(isinstance(p, str) for p in predictions)
    assert score(f"{scorers}:plain")["score"] == 0.0  # a plain number


def test_every_process_scores_the_whole_set_in_order(scorers):
    """Two processes, simulated: each generates its share; gather puts the generations back in order."""
    shares = {}
    for rank in (1, 0):
        def gather(mine, rank=rank):
            shares[rank] = mine
            return [*mine, *shares.get(1 - rank, [])]

        score(f"{scorers}:ids", rank=rank, world_size=2, gather=gather)
    predictions, references, records = json.loads(scorers.with_suffix(".py.json").read_text())
    assert records == RECORDS and references == [r["completion"] for r in RECORDS] and len(predictions) == 5


@pytest.mark.parametrize("function, message", [
    ("missing", "has no function 'missing'"),
    ("fails", "raised ZeroDivisionError: division by zero"),
    ("text", "returned 'high', not a number"),
    ("nan", "returned nan, not a finite number"),
    ("no_score", "returned a dict without 'score'"),
    ("shadows", "returned 'loss', a name forgetless reports itself"),
])
def test_errors_name_the_set_and_the_function(scorers, function, message):
    with pytest.raises(UserError, match=f"^set 'qa': scoring function .*scorers.py:{function}.*{message}") as e:
        score(f"{scorers}:{function}")
    assert "\n" not in str(e.value)


def test_unimportable_sources(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import nowhere_to_be_found\n")
    with pytest.raises(UserError, match=r"set 'qa': scoring function .*broken.py:f: importing .* failed \(ModuleNotFoundError"):
        score(f"{broken}:f")
    with pytest.raises(UserError, match=r"module 'no_such_package' not found; install it, or give a file"):
        score("no_such_package.metrics:f")
    with pytest.raises(UserError, match="file .*gone.py not found"):
        score(f"{tmp_path / 'gone.py'}:f")


@pytest.mark.slow
def test_a_run_reports_each_sets_chosen_score(tmp_path, scorers):
    mc = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": f"Which is number {i}?", "choices": [f"n{i}", f"n{i + 1}", f"m{i}"], "answer": 0, "id": i} for i in range(8)])
    qa = write_jsonl(tmp_path / "qa.jsonl", RECORDS)
    cfg = forgetless.load_config(None, [
        *FAST_MODEL, f"data.train={mc}", f"output.dir={tmp_path / 'run'}", "output.progress=false",
        "train.max_steps=2", "train.lr=1e-3", "train.micro_batch_size=4", "eval.max_new_tokens=3", "data.max_length=48",
        "eval.generation=false",
        f"data.eval.mc={mc}", f"data.eval.mc_norm={{path: {mc}, metric: multiple_choice_norm}}",
        f"data.keep.qa={{path: {qa}, metric: {scorers}:ids}}", f"data.keep.qa_default={qa}",
        "data.keep.general={path: demo:general, limit: 4, metric: perplexity}",
    ])
    result = forgetless.train(cfg)
    for when in (result.before, result.after):
        assert when["mc"]["score"] == when["mc"]["mc_accuracy"] and when["mc_norm"]["score"] == when["mc_norm"]["mc_accuracy_norm"]
        assert when["qa"]["score"] == 0.5 and when["qa"]["mean_id"] == 2.0 and "exact_match" in when["qa"]  # decoded for the function
        assert when["qa_default"]["score"] == when["qa_default"]["token_accuracy"]  # generation is off
        assert when["general"]["score"] == when["general"]["perplexity"]
    # the training data was multiple choice: trained as prompt + correct choice, so its loss fell
    assert result.after["mc"]["loss"] < result.before["mc"]["loss"]
    assert result.data["train"]["formats"] == {"multiple_choice": 8}


@pytest.mark.slow
def test_eval_command_prints_and_saves_the_score(tmp_path, scorers, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", RECORDS)
    out = tmp_path / "eval.json"
    args = ["eval", "tiny", "--data", f"qa={qa}", "--data", "general=demo:general", "--max-examples", "3", "--max-new-tokens", "2",
            "--output", str(out)]
    assert main([*args, "--metric", f"qa={scorers}:ids", "--metric", "general=loss"]) == 0
    saved = json.loads(out.read_text())
    assert saved["metrics"] == {"qa": f"{scorers}:ids", "general": "loss"}
    assert saved["results"]["general"]["score"] == saved["results"]["general"]["loss"]
    assert "score" in capsys.readouterr().err
    assert main([*args, "--metric", f"qa={scorers}:fails"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set 'qa': scoring function" in err[0] and "ZeroDivisionError" in err[0]
    assert main([*args, "--metric", "general=exact_macth"]) == 2
    assert "did you mean 'exact_match'" in capsys.readouterr().err
