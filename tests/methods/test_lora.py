import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import forgetless
from forgetless.config import ModelConfig, TinyModelConfig, load_config
from forgetless.errors import ConfigError
from forgetless.methods import REGISTRY
from forgetless.models import load_model, load_tokenizer
from forgetless.models.adapters import adapters_disabled
from forgetless.models.saving import base_reference
from tests.methods.conftest import COMMON, forgot

pytestmark = pytest.mark.slow

SHAPE = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
TINY = [f"model.tiny.{k}={v}" for k, v in vars(SHAPE).items() if k != "max_position_embeddings"]


def _tiny():
    cfg = ModelConfig(name_or_path="tiny", tiny=SHAPE)
    tok = load_tokenizer(cfg)
    return load_model(cfg, tok), tok


def _lora(**options):
    return REGISTRY["lora"].build(REGISTRY["lora"].config(**options))


def _ids(tok):
    return torch.tensor([tok("The capital of France is Paris")["input_ids"]])


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_adapted_model_starts_equal_to_base_and_trains_only_the_adapter(variant):
    model, tok = _tiny()
    ids = _ids(tok)
    base = model(ids).logits
    method = _lora(variant=variant, r=4)
    peft = method.wrap_model(model, None)
    out = peft(ids).logits
    if variant == "dora":  # the magnitude is ||W||, recomputed: equal up to rounding
        torch.testing.assert_close(out, base, rtol=0, atol=1e-6)
    else:  # B = 0: the update is exactly zero
        assert torch.equal(out, base)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    facts = method.describe()
    assert facts["variant"] == variant and facts["r"] == 4
    assert facts["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    # r·(in + out) per adapted matrix (q, k, v, o, gate, up, down): 512·r per block; DoRA adds one
    # magnitude per output feature (256 per block).
    assert facts["trainable_params"] == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert facts["trainable_params"] == 4 * 1024 + (512 if variant == "dora" else 0)


def test_target_modules_layers_and_scaling():
    model, tok = _tiny()
    peft = _lora(target_modules=["q_proj", "v_proj"], layers=[1], r=2, alpha=8).wrap_model(model, None)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft.named_parameters() if ".lora_A." in n}
    assert adapted == {"base_model.model.model.layers.1.self_attn.q_proj", "base_model.model.model.layers.1.self_attn.v_proj"}
    assert peft.base_model.model.model.layers[1].self_attn.q_proj.scaling["default"] == 8 / 2
    model, _ = _tiny()
    peft = _lora(variant="rslora", r=4, alpha=8).wrap_model(model, None)
    assert peft.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 8 / 4**0.5


@pytest.fixture(scope="module")
def lora_run(scenario):
    return scenario.finetune("lora", "methods.lora.r=8")


def test_lora_reduces_forgetting_and_still_learns(scenario, lora_run):
    plain = scenario.plain
    print(f"\nforgot: lora r=8 {forgot(lora_run):.4f} vs plain {forgot(plain):.4f}")
    assert forgot(lora_run) < 0.5 * forgot(plain)
    assert lora_run.after["elements"]["loss"] < lora_run.before["elements"]["loss"] - 1.0


def test_base_weights_are_bit_identical_and_the_run_saves_a_peft_adapter(scenario, lora_run):
    from peft import PeftModel, get_base_model_state_dict
    from transformers import AutoModelForCausalLM

    base_file = load_file(str(scenario.base_dir / "model.safetensors"))
    after = get_base_model_state_dict(lora_run.model)
    assert all(torch.equal(base_file[k], after[k]) for k in base_file)
    model_dir = lora_run.run_dir / "model"
    saved = json.loads((model_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(scenario.base_dir.resolve())  # a local base is referenced, not copied
    assert not (model_dir / "base_model").exists() and not (model_dir / "model.safetensors").exists()
    assert lora_run.train["trainable_params"] == lora_run.train["methods"]["lora"]["trainable_params"]

    tok = load_tokenizer(ModelConfig(name_or_path=str(lora_run.run_dir)))
    ids = _ids(tok)
    trained = lora_run.model.eval()
    expected = trained(ids).logits
    plain_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved["base_model_name_or_path"]), str(model_dir))
    torch.testing.assert_close(plain_peft(ids).logits, expected, rtol=0, atol=1e-6)
    ours = load_model(ModelConfig(name_or_path=str(lora_run.run_dir)), tok)
    torch.testing.assert_close(ours(ids).logits, expected, rtol=0, atol=1e-6)
    with adapters_disabled(trained):  # the base model's outputs, without a copy
        torch.testing.assert_close(trained(ids).logits, AutoModelForCausalLM.from_pretrained(scenario.base_dir)(ids).logits, rtol=0, atol=1e-6)


def test_tiny_base_is_saved_beside_the_adapter_and_the_run_can_move(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, [
        "model.name_or_path=tiny", *TINY, *COMMON, f"output.dir={tmp_path / 'run'}",
        "data.train={path: demo:elements, limit: 16}", "data.eval.elements={path: demo:elements, limit: 16}",
        "train.max_steps=3", "train.lr=1e-2", "methods.lora.r=4",
    ])
    r = forgetless.train(cfg)
    model_dir = r.run_dir / "model"
    assert json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "base_model"
    assert (model_dir / "base_model" / "model.safetensors").is_file() and (model_dir / "base_model" / "tokenizer.json").is_file()
    moved = shutil.move(str(r.run_dir), str(tmp_path / "moved"))
    tok = load_tokenizer(ModelConfig(name_or_path=moved))
    ids = _ids(tok)
    expected = r.model.eval()(ids).logits
    plain_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{moved}/model/base_model"), f"{moved}/model")
    torch.testing.assert_close(plain_peft(ids).logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(load_model(ModelConfig(name_or_path=moved), tok)(ids).logits, expected, rtol=0, atol=1e-6)
    scores = forgetless.evaluate(moved, {"elements": "demo:elements"}, max_examples=16, generation=False, max_length=48)
    assert scores["elements"]["loss"] == pytest.approx(r.after["elements"]["loss"], abs=1e-5)

    # A LoRA run as the starting point: its adapter is folded in and a fresh one starts at zero.
    loaded = load_model(ModelConfig(name_or_path=moved), tok)
    before = loaded(ids).logits
    again = _lora(r=2).wrap_model(loaded, None)
    torch.testing.assert_close(again(ids).logits, before, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in again.parameters() if p.requires_grad) == 2 * 1024
    assert base_reference(moved) is None  # its saved run must carry the merged base beside the adapter


def test_bad_lora_options():
    base = ["data.train=x.jsonl"]
    with pytest.raises(ConfigError, match=r"methods\.lora\.r must be at least 1"):
        load_config(None, [*base, "methods.lora.r=0"])
    with pytest.raises(ConfigError, match=r"methods\.lora\.alpha must be positive"):
        load_config(None, [*base, "methods.lora.alpha=0"])
    with pytest.raises(ConfigError, match=r"methods\.lora\.dropout must be in \[0, 1\)"):
        load_config(None, [*base, "methods.lora.dropout=1"])
    with pytest.raises(ConfigError, match=r"methods\.lora\.variant.*'lora', 'dora', 'rslora'"):
        load_config(None, [*base, "methods.lora.variant=qlora"])
    with pytest.raises(ConfigError, match=r"'all-linear' cannot be combined"):
        load_config(None, [*base, "methods.lora.target_modules=[all-linear, q_proj]"])
    with pytest.raises(ConfigError, match="lora and freeze cannot be combined: LoRA freezes every base weight"):
        load_config(None, [*base, "methods.lora=true", "methods.freeze.train_last_n=1"])
    with pytest.raises(ConfigError, match="bottleneck and lora cannot be combined|lora and bottleneck cannot be combined"):
        load_config(None, [*base, "methods.lora=true", "methods.bottleneck=true"])
    model, _ = _tiny()
    with pytest.raises(ConfigError, match=r"methods\.lora\.target_modules: .*not found"):
        _lora(target_modules=["qq_proj"]).wrap_model(model, None)
    with pytest.raises(ConfigError, match=r"methods\.lora\.layers: block 5 does not exist; the model has blocks 0-1"):
        _lora(layers=[5]).wrap_model(model, None)
