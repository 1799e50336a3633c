"""The real CLI on the tiny model: train, eval, config, help, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgetless.cli import main
from tests.conftest import FAST_MODEL, fast_overrides, write_jsonl

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forgetless", *args], capture_output=True, text=True, timeout=300)


def test_train_prompt_completion_writes_a_loadable_run(tmp_path, pc_file, chat_file):
    out = tmp_path / "run"
    rc = main(["train", *fast_overrides(out, pc_file, f"data.keep.chat={chat_file}", "output.log_every=1")])
    assert rc == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "summary.md", "model/model.safetensors", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(k in steps[0] for k in ("lr", "tokens_per_s", "grad_norm", "target_tokens"))
    evals = [r for r in records if "eval" in r]
    assert len(evals) == 2 and set(evals[0]["eval"]) == {"task", "chat"}
    summary = json.loads((out / "summary.json").read_text())
    assert {r["set"]: r["role"] for r in summary["sets"]} == {"task": "new", "chat": "keep"}
    assert summary["sets"][0]["loss"]["after"] < summary["sets"][0]["loss"]["before"]
    assert summary["data"]["train"]["formats"] == {"prompt_completion": 24}

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.chat_template
    ids = torch.tensor([tok("Question 3: what is 3 plus 3?")["input_ids"]])
    assert model(ids).logits.shape[-1] == len(tok)


def test_train_chat_data_from_yaml(tmp_path, chat_file):
    cfg = tmp_path / "chat.yaml"
    cfg.write_text(
        "model:\n  name_or_path: tiny\n  tiny: {hidden_size: 64, intermediate_size: 128, num_layers: 2}\n"
        f"data:\n  train: {chat_file.name}\n  max_length: 96\n"
        "train: {max_steps: 3, micro_batch_size: 4, lr: 1e-3}\n"
        "eval: {max_examples: 4, max_new_tokens: 6}\n"
        f"output: {{dir: {tmp_path / 'run'}, progress: false}}\n"
    )
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["train"]["formats"] == {"messages": 16}
    assert "exact_match" in summary["after"]["task"]


def test_same_seed_same_weights(tmp_path, pc_file):
    for name in ("a", "b"):
        assert main(["train", *fast_overrides(tmp_path / name, pc_file, "eval.before=false", "eval.generation=false")]) == 0
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["train", *fast_overrides(tmp_path / "c", pc_file, "eval.before=false", "eval.generation=false", "train.seed=7")]) == 0
    c = load_file(tmp_path / "c" / "model" / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_grad_accumulation_matches_a_bigger_micro_batch(tmp_path, pc_file):
    """Same global batch, different split: the same losses (token-level normalisation)."""
    common = ("eval.before=false", "eval.generation=false", "output.log_every=1", "train.max_steps=3")
    assert main(["train", *fast_overrides(tmp_path / "one", pc_file, *common, "train.micro_batch_size=8")]) == 0
    assert main(["train", *fast_overrides(tmp_path / "acc", pc_file, *common, "train.micro_batch_size=2", "train.grad_accum_steps=4")]) == 0
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_eval_command_scores_a_run(tmp_path, pc_file, chat_file):
    run = tmp_path / "run"
    assert main(["train", *fast_overrides(run, pc_file, "eval.before=false")]) == 0
    assert main(["eval", str(run), "--data", f"pc={pc_file}", "--data", f"chat={chat_file}", "--max-examples", "5", "--max-new-tokens", "4"]) == 0
    scores = json.loads((run / "eval.json").read_text())["results"]
    assert set(scores) == {"pc", "chat"}
    assert scores["pc"]["examples"] == 5 and {"loss", "perplexity", "token_accuracy", "exact_match"} <= set(scores["pc"])


def test_refuses_to_overwrite_a_run(tmp_path, pc_file):
    run = tmp_path / "run"
    assert main(["train", *fast_overrides(run, pc_file, "train.max_steps=1", "eval.before=false", "eval.generation=false")]) == 0
    before = (run / "model" / "model.safetensors").read_bytes()
    assert main(["train", *fast_overrides(run, pc_file, "train.max_steps=1")]) == 2
    assert (run / "model" / "model.safetensors").read_bytes() == before
    assert main(["train", *fast_overrides(run, pc_file, "train.max_steps=1", "eval.generation=false"), "--overwrite"]) == 0


def test_help_texts():
    r = cli("--help")
    assert r.returncode == 0 and "train" in r.stdout and "eval" in r.stdout and "demo" in r.stdout
    for sub in ("train", "eval", "demo", "config"):
        r = cli(sub, "--help")
        assert r.returncode == 0 and "usage: forgetless " + sub in r.stdout


def _bad_jsonl(tmp_path: Path) -> Path:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": \n')
    return p


BAD_INPUTS = [
    # (name, args builder, expected message fragment)
    ("missing data file", lambda t: [f"data.train={t / 'missing.jsonl'}"], "missing.jsonl: file not found"),
    ("malformed jsonl line", lambda t: [f"data.train={_bad_jsonl(t)}"], "bad.jsonl:2: malformed JSON"),
    ("record with no known fields", lambda t: [f"data.train={write_jsonl(t / 'q.jsonl', [{'question': 'x'}])}"], "q.jsonl:1: the record has none of the fields"),
    ("unknown config key", lambda t: ["data.train=demo:elements", "train.lrr=1"], "unknown key 'lrr'"),
    ("wrong type", lambda t: ["data.train=demo:elements", "train.max_steps=many"], "train.max_steps: expected an integer"),
    ("empty dataset", lambda t: [f"data.train={write_jsonl(t / 'e.jsonl', [])}"], "e.jsonl: the dataset is empty"),
    ("missing model directory", lambda t: ["data.train=demo:elements", f"model.name_or_path={t / 'nomodel'}"], "directory not found"),
    ("context too long", lambda t: ["data.train=demo:elements", "data.max_length=100000"], "exceeds the model's context"),
    ("missing config file", lambda t: [str(t / "nope.yaml")], "nope.yaml: config file not found"),
]


@pytest.mark.parametrize("name, build, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_one_line_exit_2(tmp_path, capsys, name, build, message):
    out = tmp_path / "out"
    args = build(tmp_path)
    if not args[0].endswith(".yaml"):
        args = [*FAST_MODEL, f"output.dir={out}", *args]
    assert main(["train", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("forgetless: error: ") and message in lines[0]
    assert not out.exists()  # nothing written


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    r = cli("train", *FAST_MODEL, f"output.dir={tmp_path / 'out'}", f"data.train={_bad_jsonl(tmp_path)}")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "bad.jsonl:2: malformed JSON" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_config_command(tmp_path):
    r = cli("config", "data.train=demo:capitals", "train.lr=1e-4")
    assert r.returncode == 0 and "lr: 0.0001" in r.stdout
    r = cli("config", "--markdown")
    assert r.returncode == 0 and "| `train.lr` |" in r.stdout
