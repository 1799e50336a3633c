import pytest
import torch

from forgetless.config import ModelConfig, TinyModelConfig
from forgetless.errors import UserError
from forgetless.models import load_model, load_tokenizer

SHAPE = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)


def test_tiny_model_is_a_real_llama_and_deterministic():
    cfg = ModelConfig(name_or_path="tiny", tiny=SHAPE)
    tok = load_tokenizer(cfg)
    a, b, c = load_model(cfg, tok, seed=0), load_model(cfg, tok, seed=0), load_model(cfg, tok, seed=1)
    assert type(a).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.config.vocab_size == len(tok) and tok.chat_template


def test_saved_model_loads_back_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ModelConfig(name_or_path="tiny", tiny=SHAPE)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = torch.tensor([tok2("The capital of France is")["input_ids"]])
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
    # and through forgetless's own loader, by directory
    loaded = load_model(ModelConfig(name_or_path=str(tmp_path / "m")), tok2)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_missing_directory_and_file_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="directory not found"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nope")))
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a model directory"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "f")))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not load its tokenizer"):
        load_tokenizer(ModelConfig(name_or_path="someone/not-a-real-model-xyz"))


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False


def _saved_tiny(path):
    cfg = ModelConfig(name_or_path="tiny", tiny=SHAPE)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def test_loading_options_reach_transformers(tmp_path):
    """model.attn_implementation and model.device_map are transformers' own options, passed through."""
    model, tok = _saved_tiny(tmp_path / "m")
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    eager = load_model(ModelConfig(name_or_path=str(tmp_path / "m"), attn_implementation="eager", device_map="cpu"), tok)
    assert eager.config._attn_implementation == "eager" and {p.device.type for p in eager.parameters()} == {"cpu"}
    sdpa = load_model(ModelConfig(name_or_path=str(tmp_path / "m"), attn_implementation="sdpa"), tok)
    assert sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits)  # same model, another kernel
    tiny = load_model(ModelConfig(name_or_path="tiny", tiny=SHAPE, attn_implementation="eager"), tok)
    assert tiny.config._attn_implementation == "eager"
    with pytest.raises(UserError, match=r"could not load it \(.*no_such_kernel"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "m"), attn_implementation="no_such_kernel"), tok)


def test_device_map_is_refused_with_several_processes(tmp_path, monkeypatch):
    import forgetless

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = forgetless.load_config(None, ["model.device_map=auto", "data.train=demo:capitals", f"output.dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="model.device_map places one model over several devices in one process"):
        forgetless.train(cfg)
    assert not (tmp_path / "run").exists()


def test_eval_takes_the_dtype(tmp_path):
    import json

    from forgetless.cli import main

    _saved_tiny(tmp_path / "m")
    out = tmp_path / "scores.json"
    assert main(["eval", str(tmp_path / "m"), "--data", "caps=demo:capitals", "--max-examples", "4", "--dtype", "bfloat16",
                 "--no-generation", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["caps"]["loss"] > 0
