"""Bad input never hurts: one line naming the file:line or the config field, exit code 2, no
traceback, and nothing on disk touched (every file under the test's folder is byte-identical
afterwards and no new file or folder appears).

Every case runs the real CLI in-process (``forgetless.cli.main``) and fails before training
starts; one case runs it as a subprocess to prove that no traceback reaches the terminal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from forgetless.cli import main
from tests.conftest import FAST_MODEL, PC_RECORDS, write_jsonl

GOOD_LINE = json.dumps(PC_RECORDS[0])
BROKEN_JSONL = GOOD_LINE + '\n{"prompt": "a", "completion": \n'
LATIN1_JSONL = GOOD_LINE.encode() + b'\n{"prompt": "caf\xe9", "completion": " x"}\n'
LATIN1_TXT = b"first paragraph\n\nsecond caf\xe9\n"
CSV_NO_COLUMNS = "question,answer\nq,a\n"
JSON_NOT_A_LIST = '{"a": 1}'
CHAT = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}."}]} for i in range(4)]


# --------------------------------------------------------------------------------------------
# The workspace every case runs in, and how to prove it was not touched
# --------------------------------------------------------------------------------------------


def make_workspace(t: Path) -> None:
    """Good data, an earlier run, a folder of someone else's files, and a plain file."""
    write_jsonl(t / "good.jsonl", PC_RECORDS[:8])
    write_jsonl(t / "chat.jsonl", CHAT)
    run = t / "earlier_run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name_or_path: tiny}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    (run / "summary.json").write_text('{"train": {"steps": 1}}\n')
    (run / "model" / "model.safetensors").write_bytes(os.urandom(256))
    (t / "photos").mkdir()
    (t / "photos" / "cat.jpg").write_bytes(os.urandom(64))
    (t / "notes.txt").write_text("not a folder\n")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: the sha256 of each file, 'dir' for each folder."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def base(t: Path, *extra: str) -> list[str]:
    """A valid fast training command line; ``extra`` overrides come last and win."""
    return [*FAST_MODEL, f"output.dir={t / 'out'}", f"data.train={t / 'good.jsonl'}", "output.progress=false",
            "train.max_steps=1", "data.max_length=64", *extra]


def data(t: Path, name: str, content: str | bytes) -> Path:
    p = t / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def records(t: Path, name: str, recs: list) -> Path:
    return write_jsonl(t / name, recs)


def yaml_config(t: Path, text: str) -> str:
    p = t / "run.yaml"
    p.write_text(text, encoding="utf-8")
    return str(p)


def model_dir(t: Path, chat_template: bool) -> Path:
    """A local model directory: tokenizer and config.json, no weights file."""
    from transformers import LlamaConfig

    from forgetless.models.tiny import load_tiny_tokenizer

    d = t / ("model_no_template" if not chat_template else "model_no_weights")
    tok = load_tiny_tokenizer()
    if not chat_template:
        tok.chat_template = None
    tok.save_pretrained(d)
    LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(d)
    return d


# --------------------------------------------------------------------------------------------
# The cases: (name, command line after `train`, regex the one error line must match)
# --------------------------------------------------------------------------------------------

Build = Callable[[Path], list[str]]
CASES: list[tuple[str, Build, str]] = [
    # -- data files -------------------------------------------------------------------------
    ("malformed jsonl line",
     lambda t: base(t, f"data.train={data(t, 'bad.jsonl', BROKEN_JSONL)}"),
     r"bad\.jsonl:2: malformed JSON .*; fix or remove this line"),
    ("non-utf8 bytes",
     lambda t: base(t, f"data.train={data(t, 'latin.jsonl', LATIN1_JSONL)}"),
     r"latin\.jsonl:2: not valid UTF-8 \(byte 16 of the line\); re-save the file as UTF-8"),
    ("non-utf8 bytes in a txt file",
     lambda t: base(t, f"data.train={data(t, 'latin.txt', LATIN1_TXT)}"),
     r"latin\.txt:3: not valid UTF-8 \(byte 11 of the line\); re-save the file as UTF-8"),
    ("jsonl line that is not an object",
     lambda t: base(t, f"data.train={data(t, 'list.jsonl', '[1, 2]')}"),
     r"list\.jsonl:1: expected a JSON object per line, got list"),
    ("wrong field type",
     lambda t: base(t, f"data.train={records(t, 'typed.jsonl', [PC_RECORDS[0], {'prompt': 'x', 'completion': 5}])}"),
     r"typed\.jsonl:2: field 'completion' must be a string, got int"),
    ("missing field",
     lambda t: base(t, f"data.train={records(t, 'half.jsonl', [{'prompt': 'only a prompt'}])}"),
     r"half\.jsonl:1: field 'completion' is missing"),
    ("empty completion",
     lambda t: base(t, f"data.train={records(t, 'blank.jsonl', [{'prompt': 'x', 'completion': '  '}])}"),
     r"blank\.jsonl:1: field 'completion' is empty; give it text or remove the record"),
    ("empty dataset file",
     lambda t: base(t, f"data.train={data(t, 'empty.jsonl', '')}"),
     r"empty\.jsonl: the dataset is empty; it needs at least one record"),
    ("record of unknown shape",
     lambda t: base(t, f"data.train={records(t, 'qa.jsonl', [{'question': 'q', 'answer': 'a'}])}"),
     r"qa\.jsonl:1: the record has none of the fields .*found 'question', 'answer'.*rename its fields"),
    ("messages is not a list",
     lambda t: base(t, f"data.train={records(t, 'm.jsonl', [{'messages': 'hello'}])}"),
     r"m\.jsonl:1: field 'messages' must be a non-empty list"),
    ("messages with a bad role",
     lambda t: base(t, f"data.train={records(t, 'roles.jsonl', [{'messages': [{'role': 'user', 'content': 'a'}, {'role': 'asistant', 'content': 'b'}]}])}"),
     r"roles\.jsonl:1: messages\[1\]\.role 'asistant' is not a known role \(did you mean 'assistant'\?\)"),
    ("missing data file",
     lambda t: base(t, f"data.train={t / 'missing.jsonl'}"),
     r"missing\.jsonl: file not found; check the path"),
    ("unsupported file extension",
     lambda t: base(t, f"data.train={data(t, 'data.xml', '<a/>')}"),
     r"data\.xml: unsupported file type \.xml; use \.jsonl, \.json, \.csv, \.parquet or \.txt"),
    ("csv without usable columns",
     lambda t: base(t, f"data.train={data(t, 'cols.csv', CSV_NO_COLUMNS)}"),
     r"cols\.csv:2: the record has none of the fields"),
    ("hub dataset id offline",
     lambda t: base(t, "data.train=someone/not-a-real-dataset-xyz"),
     r"someone/not-a-real-dataset-xyz: not a local file, and loading it as a hub dataset failed .*check the path or id"),
    ("truncation=drop drops everything",
     lambda t: base(t, "data.max_length=4", "data.truncation=drop"),
     r"good\.jsonl: no usable records after tokenization \(8 too long, 0 with no target tokens\); raise data.max_length"),
    # -- config files and overrides ---------------------------------------------------------
    ("unknown config key",
     lambda t: base(t, "train.lrr=1e-3"),
     r"override train\.lrr: unknown key 'lrr' \(did you mean 'lr'\?\)"),
    ("unknown key in a yaml file",
     lambda t: [yaml_config(t, "data:\n  train: good.jsonl\ntrain:\n  max_step: 3\n"), *FAST_MODEL, f"output.dir={t / 'out'}"],
     r"run\.yaml:4: train\.max_step: unknown key 'max_step' \(did you mean 'max_steps'\?\)"),
    ("wrong yaml type",
     lambda t: [yaml_config(t, "data:\n  train: good.jsonl\ntrain:\n  micro_batch_size: lots\n"), *FAST_MODEL, f"output.dir={t / 'out'}"],
     r"run\.yaml:4: train\.micro_batch_size: expected an integer, got 'lots'; fix the value"),
    ("yaml syntax error",
     lambda t: [yaml_config(t, "data:\n  train: [good.jsonl\ntrain: {}\n"), *FAST_MODEL],
     r"run\.yaml:3: invalid YAML .*; check the indentation and quoting there"),
    ("missing config file",
     lambda t: [str(t / "nope.yaml")],
     r"nope\.yaml: config file not found; check the path"),
    ("malformed key=value override",
     lambda t: base(t, "train.lr"),
     r"override 'train\.lr': expected key=value, e\.g\. train\.lr=1e-4"),
    ("override with an empty key",
     lambda t: base(t, "=3"),
     r"override '=3': the key is empty; write key=value"),
    ("negative learning rate",
     lambda t: base(t, "train.lr=-1e-3"),
     r"train\.lr must be >= 0, got -0\.001"),
    ("eval.max_examples=0",
     lambda t: base(t, "eval.max_examples=0"),
     r"eval\.max_examples must be positive or null, got 0"),
    ("max_length beyond the model's context",
     lambda t: base(t, "data.max_length=100000"),
     r"data\.max_length \(100000\) exceeds the model's context \(512\); set data\.max_length<=512"),
    # -- methods ----------------------------------------------------------------------------
    ("unknown method",
     lambda t: base(t, "methods.lorra.r=8"),
     r"override methods\.lorra: unknown method 'lorra' \(did you mean 'lora'\?\)"),
    ("negative ewc weight",
     lambda t: base(t, "methods.ewc.weight=-1"),
     r"methods\.ewc\.weight must be >= 0, got -1"),
    ("negative l2sp weight",
     lambda t: base(t, "methods.l2sp.weight=-0.5"),
     r"methods\.l2sp\.weight must be >= 0, got -0\.5"),
    ("negative kl weight",
     lambda t: base(t, "methods.kl.weight=-2"),
     r"methods\.kl\.weight must be positive, got -2"),
    ("incompatible methods",
     lambda t: base(t, "methods.lora=true", "methods.bottleneck=true"),
     r"methods: bottleneck and lora cannot be combined|methods: lora and bottleneck cannot be combined"),
    ("negative mixing weight",
     lambda t: base(t, "methods.mix.sources.general=demo:general", "methods.mix.weights.general=-0.2"),
     r"methods\.mix\.weights\.general is negative \(-0\.2\); shares must be >= 0"),
    ("mixing weights all zero",
     lambda t: base(t, "methods.mix.sources.general=demo:general", "methods.mix.weights.general=0"),
     r"methods\.mix\.weights are all zero; give at least one source a positive share"),
    # -- models -----------------------------------------------------------------------------
    ("missing model directory",
     lambda t: base(t, f"model.name_or_path={t / 'no_such_model'}"),
     r"no_such_model'?: directory not found; check the path"),
    ("model directory without weights",
     lambda t: base(t, f"model.name_or_path={model_dir(t, chat_template=True)}"),
     r"model_no_weights': no weights in the directory \(model\.safetensors or pytorch_model\.bin\); copy the weights there"),
    ("model without a chat template for messages data",
     lambda t: base(t, f"model.name_or_path={model_dir(t, chat_template=False)}", f"data.train={t / 'chat.jsonl'}"),
     r"chat\.jsonl:1: 'messages' data needs a chat template.*set data\.chat_template=chatml"),
    # -- the run directory ------------------------------------------------------------------
    ("run directory exists without --overwrite",
     lambda t: base(t, f"output.dir={t / 'earlier_run'}"),
     r"earlier_run: already holds files; pass --overwrite"),
    ("--overwrite on a folder that is not a run",
     lambda t: base(t, f"output.dir={t / 'photos'}", "output.overwrite=true"),
     r"photos: holds files that are not a forgetless run; refusing to empty it"),
    ("output.dir is a file",
     lambda t: base(t, f"output.dir={t / 'notes.txt'}"),
     r"notes\.txt: exists and is a file; choose another output\.dir"),
    ("unwritable output directory",
     lambda t: base(t, f"output.dir={t / 'notes.txt' / 'run'}"),
     r"run: cannot write there \(.*\); choose a writable output\.dir"),
    ("bad data with --overwrite keeps the earlier run",
     lambda t: base(t, f"output.dir={t / 'earlier_run'}", "output.overwrite=true", f"data.train={t / 'missing.jsonl'}"),
     r"missing\.jsonl: file not found"),
    ("hub model id offline",
     lambda t: base(t, "model.name_or_path=someone/not-a-real-model-xyz"),
     r"model 'someone/not-a-real-model-xyz': could not load its tokenizer .*; check the id or path"),
    ("json document that is not a list of records",
     lambda t: base(t, f"data.train={data(t, 'doc.json', JSON_NOT_A_LIST)}"),
     r"doc\.json: expected a list of records"),
    ("yaml config that is not a mapping",
     lambda t: [yaml_config(t, "- data.train=good.jsonl\n"), *FAST_MODEL],
     r"run\.yaml: the top level must be a mapping"),
]


def test_at_least_25_distinct_cases():
    names = [c[0] for c in CASES]
    assert len(set(names)) == len(names) >= 25


@pytest.mark.parametrize("name, build, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path, capsys, monkeypatch, name, build, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    make_workspace(tmp_path)
    args = build(tmp_path)
    before = snapshot(tmp_path)
    assert main(["train", *args]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("forgetless: error: ") and "Traceback" not in captured.err
    assert re.search(message, lines[0]), lines[0]
    assert captured.out == ""
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_no_traceback_reaches_the_terminal(tmp_path):
    """From the shell, through transformers' loading code: still one line, nothing else printed."""
    make_workspace(tmp_path)
    build, message = next((b, m) for n, b, m in CASES if n == "model directory without weights")
    args = build(tmp_path)
    before = snapshot(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "forgetless", "train", *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == "" and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("forgetless: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert snapshot(tmp_path) == before


def test_a_run_stopped_at_its_start_is_still_a_run(tmp_path):
    """versions.json is the first file a run writes: a run that failed right after it is refused
    without --overwrite, and replaced with it (a folder of other files never is)."""
    from forgetless.errors import UserError
    from forgetless.rundir import prepare_run_dir

    run = prepare_run_dir(tmp_path / "run", overwrite=False)
    assert sorted(p.name for p in run.iterdir()) == ["versions.json"]
    with pytest.raises(UserError, match="already holds files; pass --overwrite"):
        prepare_run_dir(run, overwrite=False)
    (run / "partial.bin").write_bytes(b"x")
    prepare_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["versions.json"]
