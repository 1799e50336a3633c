"""GGUF input: a .gguf file (or a folder + model.gguf_file) loads as a plain model with the file's
tokenizer, trains, and its run saves an ordinary safetensors model; adapter runs reference the
file. Offline: the GGUF is the built-in tiny Llama, written in the test (tests/models/tiny_gguf.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

import forgetless  # noqa: E402
from forgetless.cli import main  # noqa: E402
from forgetless.config import ModelConfig, TinyModelConfig  # noqa: E402
from forgetless.errors import UserError  # noqa: E402
from forgetless.models import load_model, load_tokenizer  # noqa: E402
from forgetless.models.gguf import _dense, supported_architectures  # noqa: E402
from forgetless.models.loading import model_gguf  # noqa: E402
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer  # noqa: E402
from tests.conftest import PC_RECORDS, write_jsonl  # noqa: E402
from tests.models.tiny_gguf import write_tiny_gguf  # noqa: E402

SHAPE = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
TEXT = "The capital of France is Paris. <|im_start|>user\n  two  spaces, é<|im_end|>\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path of the .gguf, the model written to it, its tokenizer)."""
    tok = load_tiny_tokenizer()
    model = build_tiny_model(SHAPE, tok, seed=3).eval()
    path = write_tiny_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")
    return path, model, tok


def _ids(tok) -> torch.Tensor:
    return torch.tensor([tok(TEXT)["input_ids"]])


def _overrides(out: Path, train: Path, model: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model}", f"data.train={train}", f"output.dir={out}", "output.progress=false",
        "train.micro_batch_size=2", "train.max_steps=2", "train.lr=1e-3", "data.max_length=64",
        "eval.max_examples=4", "eval.generation=false", *extra,
    ]


def test_a_gguf_file_loads_as_the_model_and_tokenizer_written_to_it(tiny):
    path, ref, ref_tok = tiny
    cfg = ModelConfig(name_or_path=str(path))
    tok = load_tokenizer(cfg)
    assert tok(TEXT)["input_ids"] == ref_tok(TEXT)["input_ids"] and tok.decode(tok(TEXT)["input_ids"]) == TEXT
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    model = load_model(cfg, tok)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    ids = _ids(ref_tok)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    # The same file named as a folder + model.gguf_file, loaded into bfloat16.
    folder = ModelConfig(name_or_path=str(path.parent), gguf_file=path.name, dtype="bfloat16")
    assert load_model(folder, load_tokenizer(folder)).dtype == torch.bfloat16


def test_training_from_a_gguf_saves_a_plain_safetensors_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _, ref_tok = tiny
    train = write_jsonl(tmp_path / "train.jsonl", PC_RECORDS[:8])
    result = forgetless.train(forgetless.load_config(None, _overrides(tmp_path / "run", train, path)))
    saved = result.run_dir / "model"
    assert (saved / "model.safetensors").is_file() and not list(saved.glob("*.gguf"))
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(saved)  # no gguf_file: an ordinary model directory
    tok = AutoTokenizer.from_pretrained(saved)
    assert tok(TEXT)["input_ids"] == ref_tok(TEXT)["input_ids"] and tok.chat_template == ref_tok.chat_template
    ids = _ids(ref_tok)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, result.model.eval()(ids).logits, rtol=0, atol=1e-5)
    # WiSE-FT takes the run's base from its config.yaml: the .gguf again.
    from forgetless.interpolate import run_interpolation

    out = run_interpolation(str(result.run_dir), new={"train": str(train)}, alphas=(0.0, 1.0), max_examples=2, generation=False)
    assert (Path(out["output"]) / "model.safetensors").is_file() and out["base"] == str(path)


def test_a_lora_run_on_a_gguf_references_the_file_and_evaluates_and_merges(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from forgetless.models.merge import merge_model

    path, _, ref_tok = tiny
    train = write_jsonl(tmp_path / "train.jsonl", PC_RECORDS[:8])
    cfg = forgetless.load_config(None, _overrides(tmp_path / "run", train, path, "methods.lora.r=4", "train.lr=5e-2"))
    result = forgetless.train(cfg)
    saved = result.run_dir / "model"
    adapter = json.loads((saved / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(path.resolve())  # the file itself, not a copy
    assert not (saved / "base_model").exists()
    ids = _ids(ref_tok)
    with torch.no_grad():
        expected = result.model.eval()(ids).logits
        reloaded = load_model(ModelConfig(name_or_path=str(result.run_dir)), ref_tok)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-5)
    assert main(["eval", str(result.run_dir), "--data", f"train={train}", "--max-examples", "2", "--no-generation"]) == 0
    assert (result.run_dir / "eval.json").is_file()
    merge_model(result.run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-4)


def test_a_run_directory_is_never_a_gguf_source(tiny, tmp_path):
    """The next task of a sequence starts from the previous run directory with the sequence's
    model.gguf_file still set: the run's saved model/ is meant, not a GGUF."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    assert model_gguf(str(run), "tiny-f32.gguf") is None
    src = model_gguf(str(tiny[0].parent), tiny[0].name)
    assert src is not None and src.path == tiny[0]


def test_gguf_errors_are_one_line_user_errors(tiny, tmp_path):
    path, _, tok = tiny

    def error(**kw) -> str:
        cfg = ModelConfig(**kw)
        for load in (load_tokenizer, lambda c: load_model(c, tok)):
            with pytest.raises(UserError) as e:
                load(cfg)
            assert "\n" not in str(e.value)
        return str(e.value)

    assert "GGUF file not found" in error(name_or_path=str(tmp_path / "missing.gguf"))
    assert "model.gguf_file=tiny-f32.gguf" in error(name_or_path=str(path.parent))  # a folder of GGUFs, none named
    assert "is not in the folder (it holds tiny-f32.gguf)" in error(name_or_path=str(path.parent), gguf_file="other.gguf")
    assert "not a file" in error(name_or_path=str(path), gguf_file=path.name)
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all, just text" * 4)
    assert "not a GGUF file" in error(name_or_path=str(tmp_path / "fake.gguf"))


def test_an_architecture_transformers_cannot_load_is_named_with_the_supported_ones(tmp_path):
    tok = load_tiny_tokenizer()
    path = write_tiny_gguf(build_tiny_model(SHAPE, tok, seed=0), tok, tmp_path / "odd.gguf", architecture="rwkv")
    with pytest.raises(UserError) as e:
        load_model(ModelConfig(name_or_path=str(path)), tok)
    message = str(e.value)
    assert "GGUF architecture 'rwkv'" in message and "llama" in message and "qwen2" in message and "\n" not in message
    assert "rwkv" not in supported_architectures() and "general" not in supported_architectures()


def test_without_the_gguf_package_the_cli_says_what_to_install(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(UserError, match=r"needs the gguf package .*pip install 'forgetless\[gguf\]'"):
        load_tokenizer(ModelConfig(name_or_path=str(tiny[0])))
    train = write_jsonl(tmp_path / "train.jsonl", PC_RECORDS[:4])
    assert main(["train", *_overrides(tmp_path / "run", train, tiny[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("forgetless: error:") and "pip install 'forgetless[gguf]'" in err and len(err.splitlines()) == 1


def test_a_model_loaded_with_its_quantizer_attached_is_made_plain(tiny, tmp_path):
    """Older transformers releases leave the GGUF quantizer on a dequantized model; it would refuse
    to save. forgetless takes it off."""
    from transformers import AutoModelForCausalLM

    path = tiny[0]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is None:
        pytest.skip("this transformers release attaches no quantizer to a dequantized GGUF model")
    model = _dense(model, "test")
    model.save_pretrained(tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
