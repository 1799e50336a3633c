import json

import pytest
import torch
from safetensors.torch import load_file

from forgetless.config import ModelConfig, TinyModelConfig, load_config
from forgetless.errors import ConfigError
from forgetless.methods import REGISTRY
from forgetless.methods.moe_lora import EXPERTS, LoRAExperts, expert_layers, routing_shares
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


def _method(name, **options):
    return REGISTRY[name].build(REGISTRY[name].config(**options))


def _ids(tok):
    return torch.tensor([tok("The chemical symbol of gold is Au")["input_ids"]])


def _train(model, ids, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _earlier_run(tmp_path, tok):
    """A saved moe_lora adapter (3 experts, top 2) with non-zero experts, and its logits."""
    model, _ = _tiny()
    model = _method("moe_lora", num_experts=3, r=4).wrap_model(model, None)
    with torch.no_grad():
        for layer in expert_layers(model).values():
            layer.B[0].normal_(std=0.3)
    ADAPTER_KINDS["moe_lora"].save(model, tmp_path / "earlier", "tiny")
    return tmp_path / "earlier", model(_ids(tok)).logits


def test_without_previous_it_starts_from_the_new_experts_at_the_base():
    model, tok = _tiny()
    base = model(_ids(tok)).logits
    method = _method("expansion", new_experts=2)
    model = method.wrap_model(model, None)
    assert torch.equal(model(_ids(tok)).logits, base)
    layers = expert_layers(model)
    assert len(layers) == 14 and all(l.num_experts == 2 and l.num_routed == 2 and l.top_k == 2 for l in layers.values())
    assert all(p.requires_grad == (EXPERTS in n) for n, p in model.named_parameters())
    assert method.describe()["earlier_experts"] == 0


def test_added_experts_are_gated_against_earlier_ones_only():
    torch.manual_seed(0)
    layer = LoRAExperts(torch.empty(6, 5), r=2, alpha=2.0, top_k=1, dropout=0.0)
    layer.add(2)
    layer.add(2, routed=False)
    logits = torch.randn(7, 4)
    gates = layer.gates(logits)
    assert ((gates[:, :2] > 0).sum(-1) == 1).all() and torch.equal(gates[:, :2].sum(-1), torch.ones(7))
    torch.testing.assert_close(gates[:, 2], logits[:, :3].softmax(-1)[:, 2])
    torch.testing.assert_close(gates[:, 3], logits.softmax(-1)[:, 3])
    layer.add(1, routed=False)  # a later expert changes no earlier gate
    assert torch.equal(layer.gates(torch.cat([logits, torch.randn(7, 1)], -1))[:, :4], gates)


@pytest.mark.parametrize("train_router", [False, True])
def test_starts_at_the_earlier_model_and_keeps_its_experts_bit_identical(tmp_path, train_router):
    _, tok = _tiny()
    ids = _ids(tok)
    earlier_dir, earlier_logits = _earlier_run(tmp_path, tok)
    model, _ = _tiny()
    method = _method("expansion", previous=str(earlier_dir), train_router=train_router)
    model = method.wrap_model(model, None)
    assert torch.equal(model(ids).logits, earlier_logits)  # the new expert adds exactly zero
    layer = expert_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.num_experts == 4 and layer.num_routed == 3 and not layer.B[1].any()
    saved = load_file(str(earlier_dir / "moe_lora.safetensors"))
    _train(model, ids)
    for name, layer in expert_layers(model).items():
        assert torch.equal(layer.A[0], saved[f"{name}.A"]) and torch.equal(layer.B[0], saved[f"{name}.B"])
        assert torch.equal(layer.router[0], saved[f"{name}.router"]) != train_router
        assert layer.B[1].any()
    if not train_router:  # the reference model (e.g. for methods.kl) is the one this run started from
        with adapters_disabled(model):
            assert torch.equal(model(ids).logits, earlier_logits)
    assert method.describe() == {"earlier_experts": 3, "new_experts": 1, "layers": 14, "train_router": train_router,
                                 "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    # saved and loaded again (4 experts, 3 of them routed), it gives the same outputs
    ADAPTER_KINDS["moe_lora"].save(model, tmp_path / "after", "tiny")
    loaded = load_model(ModelConfig(name_or_path=str(tmp_path / "after")), tok)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert expert_layers(loaded)["model.layers.0.self_attn.q_proj"].num_routed == 3


@pytest.fixture(scope="module")
def chain(scenario):
    """Currencies with one expert, then elements with a second one (and, to compare, with the first one trained on)."""
    first = scenario.finetune("exp_currencies", "data.train={path: demo:currencies, limit: 30}", KEEP_CURRENCIES, "methods.expansion=true")
    second = scenario.finetune("exp_elements", KEEP_CURRENCIES, f"methods.expansion.previous={first.run_dir}")
    same = scenario.finetune("exp_same_expert", KEEP_CURRENCIES, f"model.name_or_path={first.run_dir}", "methods.moe_lora=true")
    return first, second, same


@pytest.mark.slow
def test_expansion_keeps_old_experts_and_reduces_forgetting(scenario, chain):
    first, second, same = chain
    plain = scenario.plain
    print(f"\nforgot capitals: expansion {forgot(second):.4f} vs plain {forgot(plain):.4f}; "
          f"forgot currencies: new expert {forgot(second, 'currencies'):.4f} vs training the same expert on {forgot(same, 'currencies'):.4f}")
    assert forgot(first, "currencies") < -1.0  # the first expert learned currencies
    assert second.before["currencies"] == first.after["currencies"]  # the second run starts from the first one's model
    assert forgot(second) < 0.5 * forgot(plain)
    assert forgot(second, "currencies") < forgot(same, "currencies")
    assert second.after["elements"]["loss"] < second.before["elements"]["loss"] - 1.0
    old = load_file(str(first.run_dir / "model" / "moe_lora.safetensors"))
    new = load_file(str(second.run_dir / "model" / "moe_lora.safetensors"))
    assert old.keys() == new.keys() and all(torch.equal(new[k][:1], old[k]) and new[k].shape[0] == 2 for k in old)
    assert json.loads((second.run_dir / "model" / "moe_lora_config.json").read_text())["num_routed"] == 1


@pytest.mark.slow
def test_the_router_chooses_per_token_at_inference(chain):
    _, second, _ = chain
    tok = load_tokenizer(ModelConfig(name_or_path=str(second.run_dir)))
    model = load_model(ModelConfig(name_or_path=str(second.run_dir)), tok).eval()
    ids = torch.tensor([tok("The chemical symbol of gold is Au. The currency of Japan is the yen")["input_ids"]])
    layer = expert_layers(model)["model.layers.0.mlp.down_proj"]
    layer.seen = []
    model(input_ids=ids)  # no task id: the plain model call
    gates = layer.seen[0]
    layer.seen = None
    assert torch.equal(gates[:, 0], torch.ones(len(gates)))  # the first task's expert, alone in its top-k
    print(f"\nnew expert's gate over the tokens (layer 0 down_proj): {[round(g, 2) for g in gates[:, 1].tolist()]}")
    assert gates[:, 1].max() - gates[:, 1].min() > 0.1  # it depends on the token
    shares = routing_shares(model, ids, torch.ones_like(ids))
    assert shares[0] == 1 and 0 < shares[1] < 1


def test_bad_expansion_options(tmp_path):
    base = ["data.train=x.jsonl"]
    for option, message in [
        ("new_experts=0", r"methods\.expansion\.new_experts must be at least 1"),
        ("r=0", r"methods\.expansion\.r must be at least 1"),
        ("top_k=0", r"methods\.expansion\.top_k must be at least 1"),
        ("alpha=-1", r"methods\.expansion\.alpha must be positive"),
        ("previous=' '", r"methods\.expansion\.previous is empty"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, f"methods.expansion.{option}"])
    with pytest.raises(ConfigError, match="expansion and olora cannot be combined"):
        load_config(None, [*base, "methods.expansion=true", "methods.olora=true"])
    model, tok = _tiny()
    with pytest.raises(ConfigError, match=r"methods\.expansion\.previous: .*nowhere holds no saved adapter \(forgetless_adapter\.json\)"):
        _method("expansion", previous=str(tmp_path / "nowhere")).wrap_model(model, None)
    earlier_dir, _ = _earlier_run(tmp_path, tok)
    with pytest.raises(ConfigError, match=r"methods\.expansion: r and alpha must match the earlier experts' \(r=4, alpha=16\.0\)"):
        _method("expansion", previous=str(earlier_dir), r=8).wrap_model(_tiny()[0], None)
    with pytest.raises(ConfigError, match=r"methods\.expansion\.top_k: the earlier experts route top 2"):
        _method("expansion", previous=str(earlier_dir), top_k=1).wrap_model(_tiny()[0], None)
    olora = _method("olora").wrap_model(_tiny()[0], None)
    ADAPTER_KINDS["olora"].save(olora, tmp_path / "olora", "tiny")
    with pytest.raises(ConfigError, match=r"methods\.expansion\.previous: .* holds 'olora' adapters, not 'moe_lora' ones"):
        _method("expansion", previous=str(tmp_path / "olora")).wrap_model(_tiny()[0], None)
    with pytest.raises(ConfigError, match=r"methods\.expansion: the model carries olora adapters"):
        _method("expansion").wrap_model(olora, None)
