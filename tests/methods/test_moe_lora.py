import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from forgetless.config import ModelConfig, RunConfig, TinyModelConfig, load_config
from forgetless.errors import ConfigError
from forgetless.loss import forward as lm_forward
from forgetless.methods import REGISTRY
from forgetless.methods.moe_lora import EXPERTS, LoRAExperts, balance_loss, expert_layers, routing_shares
from forgetless.models import load_model, load_tokenizer
from forgetless.models.adapters import ADAPTER_KINDS, adapters_disabled
from forgetless.models.saving import save_model
from tests.methods.conftest import forgot

SHAPE = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)


def _tiny():
    torch.manual_seed(0)  # the adapters' random init that follows
    cfg = ModelConfig(name_or_path="tiny", tiny=SHAPE)
    tok = load_tokenizer(cfg)
    return load_model(cfg, tok), tok


def _moe(**options):
    return REGISTRY["moe_lora"].build(REGISTRY["moe_lora"].config(**options))


def _ids(tok):
    return torch.tensor([tok("The capital of France is Paris")["input_ids"]])


def _randomise_B(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in expert_layers(model).values():
            for B in layer.B:
                B.copy_(torch.randn(B.shape, generator=g) * 0.3)


def test_starts_bit_exact_and_only_experts_and_routers_train():
    model, tok = _tiny()
    ids = _ids(tok)
    base = model(ids).logits
    model = _moe(num_experts=3, top_k=2, r=4, target_modules=["q_proj", "down_proj"]).wrap_model(model, None)
    assert torch.equal(model(ids).logits, base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    assert trainable == {f"{m}.{EXPERTS}.{w}.0" for m in layers for w in ("A", "B", "router")}
    A, B, R = expert_layers(model)["model.layers.0.mlp.down_proj"].weights()
    assert A.shape == (3, 4, 64) and B.shape == (3, 32, 4) and R.shape == (3, 64) and not B.any()
    assert model.state_dict()["model.layers.0.mlp.down_proj.weight"].shape == (32, 64)  # base names untouched


def _naive(layer: LoRAExperts, x):
    """The formula token by token: Σ_{e in topk} softmax(top logits)_e · s · B_e A_e x."""
    A, B, R = layer.weights()
    out = []
    for t in x.reshape(-1, x.shape[-1]):
        logits = R @ t
        top, chosen = logits.topk(layer.top_k)
        g = top.softmax(-1)
        out.append(sum(g[i] * layer.scaling * (B[e] @ (A[e] @ t)) for i, e in enumerate(chosen.tolist())))
    return torch.stack(out).view(*x.shape[:-1], -1)


def test_batched_experts_equal_the_per_token_formula():
    torch.manual_seed(0)
    layer = LoRAExperts(torch.empty(12, 10), r=3, alpha=6.0, top_k=2, dropout=0.0)
    layer.add(5)
    with torch.no_grad():
        layer.B[0].normal_()
    x = torch.randn(2, 7, 10)
    torch.testing.assert_close(layer(x), _naive(layer, x))
    gates = layer.gates(torch.randn(4, 5))
    assert ((gates > 0).sum(-1) == 2).all() and torch.allclose(gates.sum(-1), torch.ones(4))


def test_balance_term_is_the_switch_loss_summed_over_target_tokens():
    torch.manual_seed(0)
    layer = LoRAExperts(torch.empty(8, 6), r=2, alpha=4.0, top_k=2, dropout=0.0)
    layer.add(4)
    layer.record = True
    x = torch.randn(3, 5, 6)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0  # padding is left out of f and P
    layer(x)
    loss, shares = balance_loss([layer], mask)
    keep = mask.reshape(-1).bool()
    logits = (x.reshape(-1, 6) @ layer.router[0].T)[keep]
    f = torch.nn.functional.one_hot(logits.topk(2).indices, 4).sum(1).float().mean(0) / 2
    torch.testing.assert_close(loss, 4 * (f * logits.softmax(-1).mean(0)).sum())
    torch.testing.assert_close(shares, f)
    assert layer.stats is None  # used up: each forward records its own
    loss.backward()
    assert layer.router[0].grad.abs().sum() > 0 and layer.A[0].grad is None
    with torch.no_grad():
        layer.router[0].zero_()  # a uniform router: P = 1/E, so the loss is exactly 1
    layer(x)
    assert balance_loss([layer], mask)[0].item() == pytest.approx(1.0)

    model, tok = _tiny()
    method = _moe(balance_weight=0.5)
    model = method.wrap_model(model, None).train()
    ids = torch.cat([_ids(tok), _ids(tok)])
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    out = lm_forward(model, ids, batch["attention_mask"])
    per_layer = [balance_loss([layer], batch["attention_mask"])[0] for layer in method.layers]
    model(input_ids=ids, attention_mask=batch["attention_mask"])  # the same forward again, to record again
    term = method.batch_terms(model, batch, out)["moe_balance"]
    targets = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(term, 0.5 * torch.stack(per_layer).mean() * targets)


def test_adapters_disabled_gives_the_base_and_routing_shares_sum_to_one():
    model, tok = _tiny()
    ids = _ids(tok)
    base = model(ids).logits
    model = _moe().wrap_model(model, None)
    _randomise_B(model)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base)
    with adapters_disabled(model):
        assert torch.equal(model(ids).logits, base)
    assert torch.equal(model(ids).logits, adapted)
    shares = routing_shares(model, ids, torch.ones_like(ids))
    assert shares.shape == (4,) and shares.sum().item() == pytest.approx(1.0)


def test_save_load_round_trip(tmp_path):
    model, tok = _tiny()
    ids = _ids(tok)
    base = model(ids).logits
    model = _moe(num_experts=3, top_k=1).wrap_model(model, None)
    _randomise_B(model)
    expected = model(ids).logits
    # the adapter kind's own save, given the tiny base: the base weights go beside it
    ADAPTER_KINDS["moe_lora"].save(model, tmp_path / "a", "tiny")
    meta = json.loads((tmp_path / "a" / "forgetless_adapter.json").read_text())
    assert meta == {"kind": "moe_lora", "base_model": "base_model"}
    assert not any(EXPERTS in k for k in load_file(str(tmp_path / "a" / "base_model" / "model.safetensors")))
    moved = shutil.move(str(tmp_path / "a"), str(tmp_path / "moved"))
    loaded = load_model(ModelConfig(name_or_path=moved), tok)
    assert torch.equal(loaded(ids).logits, expected)
    with adapters_disabled(loaded):
        assert torch.equal(loaded(ids).logits, base)
    # the run's save (forgetless/models/saving.py) goes through the same kind
    save_model(model, tok, tmp_path / "run" / "model", RunConfig(model=ModelConfig(name_or_path="tiny", tiny=SHAPE)))
    again = load_model(ModelConfig(name_or_path=str(tmp_path / "run" / "model")), tok)
    assert torch.equal(again(ids).logits, expected)
    # training a loaded model with moe_lora continues its experts instead of adding more
    again = _moe(num_experts=8).wrap_model(again, None)
    assert {layer.num_experts for layer in expert_layers(again).values()} == {3}
    assert all(p.requires_grad == (EXPERTS in n) for n, p in again.named_parameters())


@pytest.fixture(scope="module")
def moe_run(scenario):
    return scenario.finetune("moe_lora", "methods.moe_lora=true")


@pytest.mark.slow
def test_moe_lora_reduces_forgetting_and_keeps_the_base(scenario, moe_run):
    plain = scenario.plain
    print(f"\nforgot: moe_lora (4 experts, top 2) {forgot(moe_run):.4f} vs plain {forgot(plain):.4f}")
    assert forgot(moe_run) < 0.5 * forgot(plain)
    assert moe_run.after["elements"]["loss"] < moe_run.before["elements"]["loss"] - 1.0
    base_file = load_file(str(scenario.base_dir / "model.safetensors"))
    after = moe_run.model.state_dict()
    assert all(torch.equal(base_file[k], after[k]) for k in base_file)
    facts = moe_run.train["methods"]["moe_lora"]
    assert facts["layers"] == 21 and sum(facts["routing_share"]) == pytest.approx(1.0, abs=1e-3)
    assert min(facts["routing_share"]) > 0.1  # balanced: no expert left unused
    logged = [json.loads(line) for line in (moe_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    balance = [r["terms"]["moe_balance"] for r in logged if "terms" in r]
    assert balance and all(0.01 * 1.0 <= b <= 0.01 * 4 + 1e-6 for b in balance)  # weight x (1 .. E)
    tok = load_tokenizer(ModelConfig(name_or_path=str(moe_run.run_dir)))
    ids = _ids(tok)
    loaded = load_model(ModelConfig(name_or_path=str(moe_run.run_dir)), tok)
    assert torch.equal(loaded(ids).logits, moe_run.model.eval()(ids).logits)


def test_bad_moe_lora_options():
    base = ["data.train=x.jsonl"]
    for option, message in [
        ("num_experts=0", r"methods\.moe_lora\.num_experts must be at least 1"),
        ("top_k=5", r"methods\.moe_lora\.top_k \(5\) cannot exceed num_experts \(4\)"),
        ("r=0", r"methods\.moe_lora\.r must be at least 1"),
        ("alpha=0", r"methods\.moe_lora\.alpha must be positive"),
        ("dropout=1", r"methods\.moe_lora\.dropout must be in \[0, 1\)"),
        ("target_modules=[]", r"methods\.moe_lora\.target_modules is empty"),
        ("balance_weight=-1", r"methods\.moe_lora\.balance_weight must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, f"methods.moe_lora.{option}"])
    with pytest.raises(ConfigError, match="lora and moe_lora cannot be combined|moe_lora and lora cannot be combined"):
        load_config(None, [*base, "methods.moe_lora=true", "methods.lora=true"])
    with pytest.raises(ConfigError, match="expansion and moe_lora cannot be combined|moe_lora and expansion cannot be combined"):
        load_config(None, [*base, "methods.moe_lora=true", "methods.expansion=true"])
    model, _ = _tiny()
    with pytest.raises(ConfigError, match=r"methods\.moe_lora\.target_modules: no linear layer is named \['qkv'\]; the model's linear layers are \[.*'q_proj'"):
        _moe(target_modules=["qkv"]).wrap_model(model, None)
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ConfigError, match="methods.moe_lora: the model carries a PEFT adapter"):
        _moe().wrap_model(get_peft_model(model, LoraConfig(target_modules=["q_proj"])), None)
