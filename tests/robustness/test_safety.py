"""Safe loading and secrets.

- No code path unpickles: the package source has no ``torch.load`` without
  ``weights_only=True``, no pickle loading, no ``weights_only=False``, and ``trust_remote_code``
  is never switched on by default; a .bin checkpoint that carries code is refused, and its code
  does not run.
- Access tokens in the environment, or pasted into a config value, never reach the run directory.
"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch

import forgetless
from forgetless.cli import main
from forgetless.config import REDACTED, ModelConfig, redact_secrets
from forgetless.errors import UserError
from tests.conftest import fast_overrides

PACKAGE = Path(forgetless.__file__).parent
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
              ("cloudpickle", "load"), ("cloudpickle", "loads"), ("joblib", "load")}


def unsafe_calls(source: str) -> list[str]:
    """Every unsafe loading construct in ``source``, as 'line N: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in {"pickle", "dill", "cloudpickle", "joblib", "torch"}:
            for alias in node.names:
                if (node.module, alias.name) in UNPICKLERS or (node.module, alias.name) == ("torch", "load"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        if isinstance(node, ast.Import) and any(a.name in {"dill", "cloudpickle", "joblib"} for a in node.names):
            found.append(f"line {node.lineno}: import of an unpickling library")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        keywords = {k.arg: k.value for k in node.keywords}
        if (owner, name) == ("torch", "load"):
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if (owner, name) in UNPICKLERS:
            found.append(f"line {node.lineno}: {owner}.{name}")
        for key, unsafe in (("weights_only", False), ("trust_remote_code", True)):
            value = keywords.get(key)
            if isinstance(value, ast.Constant) and value.value is unsafe:
                found.append(f"line {node.lineno}: {key}={unsafe}")
    for node in ast.walk(ast.parse(source)):
        # def f(trust_remote_code=True) / trust_remote_code: bool = option(True, ...) / = True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + node.args.kw_defaults
            for arg, default in zip(args, defaults):
                if arg.arg == "trust_remote_code" and isinstance(default, ast.Constant) and default.value is not False:
                    found.append(f"line {node.lineno}: {node.name}(trust_remote_code={default.value!r})")
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "trust_remote_code":
            value = node.value
            if isinstance(value, ast.Call) and value.args:
                value = value.args[0]
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"line {node.lineno}: the field trust_remote_code does not default to False")
    return found


def test_the_scanner_finds_unsafe_code():
    bad = (
        "import torch, pickle\nfrom torch import load\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\npickle.loads(b'')\n"
        "f(trust_remote_code=True)\ndef g(trust_remote_code=True): pass\n"
        "class C:\n    trust_remote_code: bool = option(True, 'h')\n"
    )
    assert len(unsafe_calls(bad)) == 8, unsafe_calls(bad)  # torch.load(weights_only=False) counts twice
    good = "torch.load('x', weights_only=True, map_location='cpu')\nf(trust_remote_code=cfg.trust_remote_code)\ndef g(trust_remote_code=False): pass\n"
    assert unsafe_calls(good) == []


def test_package_source_loads_nothing_unsafely():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems = [f"{path.relative_to(PACKAGE.parent)} {p}" for path in files for p in unsafe_calls(path.read_text(encoding="utf-8"))]
    assert problems == []


def test_trust_remote_code_is_off_everywhere_by_default():
    from forgetless.cli import build_parser
    from forgetless.eval.run import evaluate_with_metrics  # evaluate() passes its options on to it

    assert ModelConfig().trust_remote_code is False
    assert inspect.signature(evaluate_with_metrics).parameters["trust_remote_code"].default is False
    args = build_parser().parse_args(["eval", "tiny", "--data", "a=demo:capitals"])
    assert args.trust_remote_code is False


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: code, not a tensor."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_bin_checkpoint_that_carries_code_is_refused_and_never_runs(tmp_path):
    from transformers import LlamaConfig

    from forgetless.models import load_model
    from forgetless.models.tiny import load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": torch.zeros(len(tok), 32), "x": Payload(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"holds more than tensors \(pickled code\), so it was not loaded; use safetensors") as e:
        load_model(ModelConfig(name_or_path=str(tmp_path)), tok)
    assert "\n" not in str(e.value)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------

HF_MARKER = "hf_" + "Mk7" * 12  # shaped like a Hugging Face token
ENV_MARKERS = {
    "HF_TOKEN": HF_MARKER,
    "HUGGING_FACE_HUB_TOKEN": "hubtoken-" + "Q9z" * 10,
    "WANDB_API_KEY": "0a1b2c3d4e" * 4,  # 40 hex characters, like a W&B key
}


def test_redaction_of_values():
    env_like = "abc" + "9" * 37
    out = redact_secrets(
        {"a": [f"x {HF_MARKER} y", "https://bob:s3cret@example.org/data.jsonl", "max_new_tokens", 3, None, env_like],
         "b": "ghp_" + "A" * 36}
    )
    assert out["a"][:5] == [f"x {REDACTED} y", f"https://{REDACTED}@example.org/data.jsonl", "max_new_tokens", 3, None]
    assert out["a"][5] == env_like  # no token shape, not in the environment: kept
    assert out["b"] == REDACTED


@pytest.mark.slow
def test_tokens_never_reach_the_run_directory(tmp_path, pc_file, monkeypatch, capsys):
    for name, value in ENV_MARKERS.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    rc = main(["train", *fast_overrides(out, pc_file, "train.max_steps=2", "eval.generation=false", "output.log_every=1",
                                        f"output.wandb_project=team-{HF_MARKER}",  # a token pasted into a config value
                                        f"model.revision={ENV_MARKERS['WANDB_API_KEY']}")])
    assert rc == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"config.yaml", "metrics.jsonl", "summary.json", "versions.json"} <= {p.name for p in files}
    printed = capsys.readouterr()
    for secret in [HF_MARKER, *ENV_MARKERS.values()]:
        for p in files:
            assert secret.encode() not in p.read_bytes(), f"{secret} found in {p.relative_to(out)}"
        assert secret not in printed.out + printed.err
    saved = (out / "config.yaml").read_text()
    assert f"wandb_project: team-{REDACTED}" in saved and f"revision: {REDACTED}" in saved
    assert json.loads((out / "summary.json").read_text())["train"]["steps"] == 2
