import json

import pytest
import torch
from safetensors.torch import load_file

from forgetless.config import ModelConfig, TinyModelConfig, load_config
from forgetless.errors import ConfigError
from forgetless.methods import REGISTRY
from forgetless.methods.olora import ADAPTERS, TaskLoRAs, orthogonality, task_layers
from forgetless.models import load_model, load_tokenizer
from forgetless.models.adapters import ADAPTER_KINDS, adapters_disabled
from tests.methods.conftest import forgot

SHAPE = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
KEEP_CURRENCIES = "data.keep.currencies={path: demo:currencies, limit: 30}"


def _tiny():
    torch.manual_seed(0)  # the adapters' random init that follows
    cfg = ModelConfig(name_or_path="tiny", tiny=SHAPE)
    tok = load_tokenizer(cfg)
    return load_model(cfg, tok), tok


def _olora(**options):
    return REGISTRY["olora"].build(REGISTRY["olora"].config(**options))


def _ids(tok):
    return torch.tensor([tok("The currency of Japan is the yen")["input_ids"]])


def _layer(*old_As, new_A):
    """A TaskLoRAs (6 outputs, 10 inputs) with frozen LoRAs of the given A's and a trainable new one."""
    layer = TaskLoRAs(torch.empty(6, 10), dropout=0.0)
    for A in old_As:
        layer.add(A.shape[0], 8.0, A, torch.randn(6, A.shape[0]), trainable=False)
    layer.add(new_A.shape[0], 8.0)
    with torch.no_grad():
        layer.A[-1].copy_(new_A)
    return layer


def test_penalty_is_zero_for_orthogonal_subspaces_and_positive_otherwise():
    torch.manual_seed(0)
    first, second, new = torch.zeros(2, 10), torch.zeros(3, 10), torch.zeros(4, 10)
    first[:, :3] = torch.randn(2, 3)  # old tasks read inputs 0-2 and 3-5; the new one reads 6-9
    second[:, 3:6] = torch.randn(3, 3)
    new[:, 6:] = torch.randn(4, 4)
    layers = [_layer(first, second, new_A=new), _layer(first, new_A=new)]
    assert orthogonality(layers).item() == 0.0
    overlapping = new.clone()
    overlapping[0, 4] = 0.5
    assert orthogonality([_layer(first, second, new_A=overlapping)]).item() > 0
    rotated = torch.linalg.qr(torch.randn(10, 10)).Q.T  # orthonormal rows: the first 5 against the last 5
    assert orthogonality([_layer(rotated[:5], new_A=rotated[5:])]).item() < 1e-10
    assert orthogonality([_layer(new_A=new)]).item() == 0.0  # no earlier task, nothing to penalise


def test_step_terms_and_their_gradients_match_the_formulas():
    torch.manual_seed(0)
    olds = [torch.randn(2, 10), torch.randn(3, 10)]
    layers = [_layer(*olds, new_A=torch.randn(4, 10)), _layer(olds[0], new_A=torch.randn(4, 10))]
    with torch.no_grad():
        for layer in layers:
            layer.B[-1].normal_()
    method = _olora(orth_weight=0.7, l2_weight=0.3)
    method.layers = layers
    terms = method.step_terms(None)
    expected = 0.7 * sum(((o @ layers[0].A[-1].T) ** 2).sum() for o in olds) + 0.7 * ((olds[0] @ layers[1].A[-1].T) ** 2).sum()
    torch.testing.assert_close(terms["olora"], expected)
    torch.testing.assert_close(terms["olora_l2"], 0.3 * sum(l.A[-1].pow(2).sum() + l.B[-1].pow(2).sum() for l in layers))
    (terms["olora"] + terms["olora_l2"]).backward()
    for layer, old in ((layers[0], olds), (layers[1], olds[:1])):
        A, B = layer.A[-1], layer.B[-1]
        gram = sum(o.T @ o for o in old)
        torch.testing.assert_close(A.grad, 2 * 0.7 * A.detach() @ gram + 2 * 0.3 * A.detach())
        torch.testing.assert_close(B.grad, 2 * 0.3 * B.detach())
        assert all(p.grad is None for p in list(layer.A)[:-1] + list(layer.B)[:-1])


def _train(model, method, ids, steps=4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss + sum(method.step_terms(model).values())
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_earlier_loras_stay_in_the_model_frozen_and_load_back(tmp_path):
    model, tok = _tiny()
    ids = _ids(tok)
    base = model(ids).logits
    model = _olora(target_modules=["q_proj", "v_proj"]).wrap_model(model, None)
    assert torch.equal(model(ids).logits, base)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.{m}.{ADAPTERS}.{w}.0" for i in range(2) for m in ("q_proj", "v_proj") for w in ("A", "B")}
    with torch.no_grad():
        for layer in task_layers(model).values():
            layer.B[0].normal_(std=0.3)
    first_logits = model(ids).logits
    ADAPTER_KINDS["olora"].save(model, tmp_path / "first", "tiny")

    second, _ = _tiny()
    method = _olora(previous=[str(tmp_path / "first")], r=4)
    second = method.wrap_model(second, None)
    assert torch.equal(second(ids).logits, first_logits)  # the new LoRA adds exactly zero
    assert method.describe()["earlier_tasks"] == 1
    saved = load_file(str(tmp_path / "first" / "olora.safetensors"))
    overlap = orthogonality(method.layers).item()
    _train(second, method, ids)
    assert orthogonality(method.layers).item() < overlap
    for name, layer in task_layers(second).items():
        assert torch.equal(layer.A[0], saved[f"{name}.A.0"]) and torch.equal(layer.B[0], saved[f"{name}.B.0"])
        assert layer.A[1].shape == (4, 32) and layer.B[1].any()
    with adapters_disabled(second):  # the reference model (e.g. for methods.kl) is the one this run started from
        assert torch.equal(second(ids).logits, first_logits)
    ADAPTER_KINDS["olora"].save(second, tmp_path / "second", "tiny")
    settings = json.loads((tmp_path / "second" / "olora_config.json").read_text())
    assert [t["r"] for t in settings["tasks"]] == [8, 4]
    loaded = load_model(ModelConfig(name_or_path=str(tmp_path / "second")), tok)
    assert torch.equal(loaded(ids).logits, second(ids).logits)
    with adapters_disabled(loaded):  # nothing trains: the base model
        assert torch.equal(loaded(ids).logits, base)
    # naming both runs of the chain loads each task's LoRA once
    third = _olora(previous=[str(tmp_path / "first"), str(tmp_path / "second")])
    third.wrap_model(_tiny()[0], None)
    assert third.describe()["earlier_tasks"] == 2
    # so does training on from the loaded model with the first run as previous
    fourth = _olora(previous=[str(tmp_path / "first")])
    fourth.wrap_model(loaded, None)
    assert fourth.describe()["earlier_tasks"] == 2


@pytest.fixture(scope="module")
def chain(scenario):
    """O-LoRA on currencies, then on elements with the first run as previous (and without the penalty)."""
    first = scenario.finetune("olora_currencies", "data.train={path: demo:currencies, limit: 30}", KEEP_CURRENCIES, "methods.olora=true")
    second = scenario.finetune("olora_elements", KEEP_CURRENCIES, f"methods.olora.previous=[{first.run_dir}]")
    unpenalised = scenario.finetune("olora_elements_0", KEEP_CURRENCIES, f"methods.olora.previous=[{first.run_dir}]", "methods.olora.orth_weight=0")
    return first, second, unpenalised


@pytest.mark.slow
def test_olora_reduces_forgetting_of_the_earlier_task(scenario, chain):
    first, second, unpenalised = chain
    plain = scenario.plain
    print(f"\nforgot currencies: olora {forgot(second, 'currencies'):.4f} vs orth_weight=0 {forgot(unpenalised, 'currencies'):.4f}; "
          f"forgot capitals: olora {forgot(second):.4f} vs plain {forgot(plain):.4f}")
    assert forgot(first, "currencies") < -1.0  # the first LoRA learned currencies
    assert second.before["currencies"] == first.after["currencies"]  # the earlier LoRA is in the model
    assert forgot(second, "currencies") < 0.75 * forgot(unpenalised, "currencies")
    assert forgot(second) < 0.5 * forgot(plain)
    assert second.after["elements"]["loss"] < second.before["elements"]["loss"] - 1.0
    facts, free = second.train["methods"]["olora"], unpenalised.train["methods"]["olora"]
    assert facts["earlier_tasks"] == 1 and facts["final_overlap"] < 0.5 * free["final_overlap"]
    old = load_file(str(first.run_dir / "model" / "olora.safetensors"))
    new = load_file(str(second.run_dir / "model" / "olora.safetensors"))
    assert all(torch.equal(new[k], old[k]) for k in old) and len(new) == 2 * len(old)
    logged = [json.loads(line) for line in (second.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["terms"]["olora"] > 0 for r in logged if "terms" in r)


def test_bad_olora_options(tmp_path):
    base = ["data.train=x.jsonl"]
    for option, message in [
        ("r=0", r"methods\.olora\.r must be at least 1"),
        ("alpha=0", r"methods\.olora\.alpha must be positive"),
        ("dropout=-0.1", r"methods\.olora\.dropout must be in \[0, 1\)"),
        ("orth_weight=-1", r"methods\.olora\.orth_weight must be >= 0"),
        ("l2_weight=-1", r"methods\.olora\.l2_weight must be >= 0"),
        ("previous=['']", r"methods\.olora\.previous has an empty path"),
        ("target_modules=[]", r"methods\.olora\.target_modules is empty"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, f"methods.olora.{option}"])
    with pytest.raises(ConfigError, match="lora and olora cannot be combined|olora and lora cannot be combined"):
        load_config(None, [*base, "methods.olora=true", "methods.lora=true"])
    with pytest.raises(ConfigError, match=r"methods\.olora\.previous: .*nowhere holds no saved adapter"):
        _olora(previous=[str(tmp_path / "nowhere")]).wrap_model(_tiny()[0], None)
    first = _olora(target_modules=["q_proj"]).wrap_model(_tiny()[0], None)
    ADAPTER_KINDS["olora"].save(first, tmp_path / "first", "tiny")
    with pytest.raises(ConfigError, match=r"methods\.olora\.target_modules must name the earlier LoRAs' layers"):
        _olora(previous=[str(tmp_path / "first")], target_modules=["v_proj"]).wrap_model(_tiny()[0], None)
    moe = REGISTRY["moe_lora"].build(REGISTRY["moe_lora"].config()).wrap_model(_tiny()[0], None)
    ADAPTER_KINDS["moe_lora"].save(moe, tmp_path / "moe", "tiny")
    with pytest.raises(ConfigError, match=r"methods\.olora\.previous: .* holds 'moe_lora' adapters, not 'olora' ones"):
        _olora(previous=[str(tmp_path / "moe")]).wrap_model(_tiny()[0], None)
