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
