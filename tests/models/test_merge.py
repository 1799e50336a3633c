import shutil

import pytest
import torch

from forgetless.config import ModelConfig, RunConfig, TinyModelConfig
from forgetless.errors import UserError
from forgetless.methods import REGISTRY
from forgetless.models import load_model, load_tokenizer
from forgetless.models.merge import merge_model
from forgetless.models.saving import save_model

SHAPE = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
TINY = RunConfig(model=ModelConfig(name_or_path="tiny", tiny=SHAPE))


def _adapted(method: str, **options):
    """A tiny model with adapters whose update is far from zero, as after training."""
    tok = load_tokenizer(TINY.model)
    model = REGISTRY[method].build(REGISTRY[method].config(**options)).wrap_model(load_model(TINY.model, tok), None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval(), tok


def _ids(tok):
    return torch.tensor([tok("The capital of France is Paris")["input_ids"]])


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_merged_lora_is_a_plain_model_with_the_adapter_models_outputs(tmp_path, variant):
    from transformers import AutoModelForCausalLM

    model, tok = _adapted("lora", variant=variant, r=4)
    ids = _ids(tok)
    expected = model(ids).logits
    run = tmp_path / "run"
    save_model(model, tok, run / "model", TINY)
    (run / "config.yaml").write_text("{}\n")  # a run directory, as the CLI passes it
    message = merge_model(run, tmp_path / "merged")
    assert message.startswith("merged the LoRA adapter")
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not torch.allclose(merged(ids).logits, load_model(ModelConfig(name_or_path=str(run / "model" / "base_model")), tok)(ids).logits)
    torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method, options", [
    ("bottleneck", {"placement": "both", "size": 4}),
    ("moe_lora", {"num_experts": 3, "top_k": 2, "r": 2}),
])
def test_non_linear_adapters_merge_into_a_model_plain_transformers_loads(tmp_path, method, options):
    from transformers import AutoModelForCausalLM

    model, tok = _adapted(method, **options)
    ids = _ids(tok)
    expected = model(ids).logits
    save_model(model, tok, tmp_path / "src", TINY)
    message = merge_model(tmp_path / "src", tmp_path / "merged")
    assert "non-linear and cannot be folded" in message and "trust_remote_code=True" in message
    shutil.rmtree(tmp_path / "src")  # the output depends on nothing else
    out = tmp_path / "merged"
    code = (out / "modeling_forgetless.py").read_text()
    assert "forgetless" not in "\n".join(line for line in code.splitlines() if line.startswith(("import", "from")))
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(loaded).__name__.startswith("Forgetless") and isinstance(loaded, type(model))  # the base's class, subclassed
    torch.testing.assert_close(loaded.eval()(ids).logits, expected, rtol=0, atol=1e-6)
    generated = loaded.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, model.generate(ids, max_new_tokens=3, do_sample=False))


def test_olora_folds_every_tasks_lora_into_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = _adapted("olora", r=2)
    ids = _ids(tok)
    expected = model(ids).logits
    save_model(model, tok, tmp_path / "src", TINY)
    assert merge_model(tmp_path / "src", tmp_path / "merged").startswith("folded the olora adapters")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("olora" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-5)


def test_merge_errors_are_one_line_user_errors(tmp_path):
    tok = load_tokenizer(TINY.model)
    load_model(TINY.model, tok).save_pretrained(tmp_path / "plain")
    with pytest.raises(UserError, match="holds no adapter .*already a standalone model"):
        merge_model(tmp_path / "plain", tmp_path / "out")
    with pytest.raises(UserError, match="is not a directory"):
        merge_model(tmp_path / "nope", tmp_path / "out")
    model, tok = _adapted("lora", r=2)
    save_model(model, tok, tmp_path / "adapter", TINY)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UserError, match="already exists and is not empty") as e:
        merge_model(tmp_path / "adapter", tmp_path / "full")
    assert "\n" not in str(e.value)
