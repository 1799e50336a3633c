import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from forgetless.config import ModelConfig, RunConfig, TinyModelConfig, load_config
from forgetless.errors import ConfigError
from forgetless.methods import REGISTRY
from forgetless.methods.bottleneck import ADAPTER_NAME, _apply_adapter
from forgetless.models import load_model, load_tokenizer
from forgetless.models.adapters import adapters_disabled, has_adapters
from forgetless.models.saving import save_model
from tests.methods.conftest import forgot

pytestmark = pytest.mark.slow

SHAPE = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, num_kv_heads=1)


def _tiny():
    cfg = ModelConfig(name_or_path="tiny", tiny=SHAPE)
    tok = load_tokenizer(cfg)
    return load_model(cfg, tok), tok


def _bottleneck(**options):
    return REGISTRY["bottleneck"].build(REGISTRY["bottleneck"].config(**options))


def _ids(tok):
    return torch.tensor([tok("The capital of France is Paris")["input_ids"]])


def _randomise_up(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ADAPTER_NAME in n and ".up." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("placement,layers,modules", [
    ("mlp", [], ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"]),
    ("both", [], [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn", "mlp")]),
    ("attention", [0, 2], ["model.layers.0.self_attn", "model.layers.2.self_attn"]),
])
def test_adapters_start_bit_exact_and_only_they_train(placement, layers, modules):
    model, tok = _tiny()
    ids = _ids(tok)
    base = model(ids).logits
    method = _bottleneck(placement=placement, layers=layers, reduction_factor=4)
    model = method.wrap_model(model, None)
    assert torch.equal(model(ids).logits, base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{ADAPTER_NAME}.{l}.{w}" for m in modules for l in ("down", "up") for w in ("weight", "bias")}
    d, b = 32, 8  # hidden 32 / reduction_factor 4
    facts = method.describe()
    assert facts == {"placement": placement, "size": b, "activation": "relu", "adapted_modules": len(modules), "trainable_params": len(modules) * (2 * d * b + b + d)}
    assert has_adapters(model)


def test_adapter_adds_up_f_down_to_the_sub_layer_output_and_disables_to_the_base():
    model, tok = _tiny()
    ids = _ids(tok)
    base = model(ids).logits
    model = _bottleneck(placement="both", size=4, activation="gelu").wrap_model(model, None)
    _randomise_up(model)
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 5, 32)
    raw = mlp.forward(x)  # .forward() skips the hook: the base MLP's output
    a = getattr(mlp, ADAPTER_NAME)
    torch.testing.assert_close(mlp(x), raw + a.up(nn.functional.gelu(a.down(raw))))
    attn = model.model.layers[0].self_attn
    h, weights = torch.randn(1, 3, 32), torch.randn(1, 2, 3, 3)
    out = _apply_adapter(attn, (), (h, weights))  # attention returns a tuple: only the hidden states change
    a = getattr(attn, ADAPTER_NAME)
    assert out[1] is weights and torch.equal(out[0], a(h))
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base)
    with adapters_disabled(model):
        assert torch.equal(model(ids).logits, base)
    assert torch.equal(model(ids).logits, adapted)


def test_save_load_round_trip_with_the_tiny_base_beside(tmp_path):
    model, tok = _tiny()
    ids = _ids(tok)
    base = model(ids).logits
    model = _bottleneck(placement="both", size=4, layers=[1, 2]).wrap_model(model, None)
    _randomise_up(model)
    expected = model(ids).logits
    save_model(model, tok, tmp_path / "run" / "model", RunConfig(model=ModelConfig(name_or_path="tiny", tiny=SHAPE)))
    saved = tmp_path / "run" / "model"
    assert json.loads((saved / "forgetless_adapter.json").read_text()) == {"kind": "bottleneck", "base_model": "base_model"}
    assert set(load_file(str(saved / "bottleneck_adapter.safetensors"))) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(ADAPTER_NAME in k for k in load_file(str(saved / "base_model" / "model.safetensors")))
    moved = shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))
    loaded = load_model(ModelConfig(name_or_path=f"{moved}/model"), load_tokenizer(ModelConfig(name_or_path=f"{moved}/model")))
    assert torch.equal(loaded(ids).logits, expected)
    with adapters_disabled(loaded):
        assert torch.equal(loaded(ids).logits, base)
    # training a loaded bottleneck model again continues its adapters instead of adding more
    again = _bottleneck(placement="mlp").wrap_model(loaded, None)
    assert sum(isinstance(m, type(getattr(again.model.layers[1].mlp, ADAPTER_NAME))) for m in again.modules()) == 4
    assert torch.equal(again(ids).logits, expected)


@pytest.fixture(scope="module")
def bottleneck_run(scenario):
    return scenario.finetune("bottleneck", "methods.bottleneck.size=16")


def test_bottleneck_reduces_forgetting_and_still_learns(scenario, bottleneck_run):
    plain = scenario.plain
    print(f"\nforgot: bottleneck size=16 {forgot(bottleneck_run):.4f} vs plain {forgot(plain):.4f}")
    assert forgot(bottleneck_run) < 0.5 * forgot(plain)
    # the loss of the answers alone (eval leaves the appended EOS unscored: learning to stop is not learning the task)
    assert bottleneck_run.after["elements"]["loss"] < bottleneck_run.before["elements"]["loss"] - 0.5


def test_base_weights_are_bit_identical_and_the_run_loads_back(scenario, bottleneck_run):
    from transformers import AutoModelForCausalLM

    base_file = load_file(str(scenario.base_dir / "model.safetensors"))
    after = bottleneck_run.model.state_dict()
    assert all(torch.equal(base_file[k], after[k]) for k in base_file)
    model_dir = bottleneck_run.run_dir / "model"
    meta = json.loads((model_dir / "forgetless_adapter.json").read_text())
    assert meta["base_model"] == str(scenario.base_dir.resolve()) and not (model_dir / "base_model").exists()
    tok = load_tokenizer(ModelConfig(name_or_path=str(bottleneck_run.run_dir)))
    ids = _ids(tok)
    trained = bottleneck_run.model.eval()
    loaded = load_model(ModelConfig(name_or_path=str(bottleneck_run.run_dir)), tok)
    assert torch.equal(loaded(ids).logits, trained(ids).logits)
    with adapters_disabled(trained):
        assert torch.equal(trained(ids).logits, AutoModelForCausalLM.from_pretrained(meta["base_model"])(ids).logits)


class _OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer, self.mlp = nn.Linear(4, 4), nn.Linear(4, 4)


class _OddModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2, hidden_size=4)
        self.layers = nn.ModuleList([_OddBlock(), _OddBlock()])


def test_bad_bottleneck_options():
    base = ["data.train=x.jsonl"]
    with pytest.raises(ConfigError, match=r"methods\.bottleneck\.reduction_factor must be at least 1"):
        load_config(None, [*base, "methods.bottleneck.reduction_factor=0"])
    with pytest.raises(ConfigError, match=r"methods\.bottleneck\.size must be at least 1"):
        load_config(None, [*base, "methods.bottleneck.size=0"])
    with pytest.raises(ConfigError, match=r"methods\.bottleneck\.activation.*'relu', 'gelu', 'silu'"):
        load_config(None, [*base, "methods.bottleneck.activation=tanh"])
    with pytest.raises(ConfigError, match=r"methods\.bottleneck\.placement.*'attention', 'mlp', 'both'"):
        load_config(None, [*base, "methods.bottleneck.placement=ffn"])
    with pytest.raises(ConfigError, match=r"methods\.bottleneck\.layers: block indices must be >= 0"):
        load_config(None, [*base, "methods.bottleneck.layers=[-1]"])
    with pytest.raises(ConfigError, match="bottleneck and freeze cannot be combined: bottleneck adapters freeze every base weight"):
        load_config(None, [*base, "methods.bottleneck=true", "methods.freeze.train_last_n=1"])
    model, _ = _tiny()
    with pytest.raises(ConfigError, match=r"methods\.bottleneck\.layers: block 3 does not exist; the model has blocks 0-2"):
        _bottleneck(layers=[3]).wrap_model(model, None)
    with pytest.raises(ConfigError, match=r"block _OddBlock has no sub-module named self_attn / attn / attention / self_attention \(its children: mixer, mlp\)"):
        _bottleneck(placement="both").wrap_model(_OddModel(), None)
    assert _bottleneck(placement="mlp").wrap_model(_OddModel(), None).layers[0].mlp.bottleneck_adapter.down.out_features == 1
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ConfigError, match="methods.bottleneck: the model is a PEFT adapter model"):
        _bottleneck().wrap_model(get_peft_model(model, LoraConfig(target_modules=["q_proj"])), None)
