import json

import pytest
import torch

from forgetless.config import TinyModelConfig, load_config
from forgetless.errors import ConfigError
from forgetless.methods.l2sp import L2SP, L2SPConfig
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer
from tests.methods.conftest import forgot

SHAPE = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny():
    return build_tiny_model(SHAPE, load_tiny_tokenizer(), seed=0)


def perturb(model, seed: int = 1, scale: float = 0.01) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_penalty_is_zero_at_start_and_its_gradient_is_the_formula():
    model = tiny()
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("model.layers.0."))  # a frozen part is not anchored
    l2sp = L2SP(L2SPConfig(weight=0.3))
    l2sp.before_train(model, None)
    assert l2sp.step_terms(model)["l2sp"].item() == 0.0

    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb(model)
    value = l2sp.step_terms(model)["l2sp"]
    value.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = 0.3 / 2 * sum(float(((p.detach().double() - start[n].double()) ** 2).sum()) for n, p in trainable.items())
    assert value.item() == pytest.approx(expected, rel=1e-5) and expected > 0
    for n, p in model.named_parameters():
        if n in trainable:
            torch.testing.assert_close(p.grad, 0.3 * (p.detach() - start[n]), rtol=1e-5, atol=1e-12)
        else:
            assert p.grad is None, n
    assert l2sp.describe()["anchored_params"] == sum(p.numel() for p in trainable.values())


def test_bfloat16_anchors_take_half_the_memory_and_give_the_formula_on_the_rounded_anchors():
    model = tiny()
    l2sp = L2SP(L2SPConfig(weight=0.3, anchor_dtype="bfloat16"))
    l2sp.before_train(model, None)
    assert all(a.dtype == torch.bfloat16 for a in l2sp.anchors)
    assert sum(a.nbytes for a in l2sp.anchors) * 2 == sum(p.nbytes for p in model.parameters())
    assert l2sp.describe()["held_bytes"] * 2 == sum(p.nbytes for p in model.parameters())  # what the summary reports
    rounded = {n: p.detach().to(torch.bfloat16).float() for n, p in model.named_parameters()}
    perturb(model)
    value = l2sp.step_terms(model)["l2sp"]
    value.backward()
    expected = 0.3 / 2 * sum(float(((p.detach().double() - rounded[n].double()) ** 2).sum()) for n, p in model.named_parameters())
    assert value.item() == pytest.approx(expected, rel=1e-5)
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - rounded[n]), rtol=1e-5, atol=1e-12)


def test_state_dict_restores_the_anchors():
    model = tiny()
    first = L2SP(L2SPConfig(weight=1.0))
    first.before_train(model, None)
    perturb(model)
    resumed = L2SP(L2SPConfig(weight=1.0))
    resumed.before_train(model, None)
    resumed.load_state_dict(first.state_dict())
    assert resumed.step_terms(model)["l2sp"].item() == pytest.approx(first.step_terms(model)["l2sp"].item())


def test_bad_options():
    with pytest.raises(ConfigError, match=r"methods\.l2sp\.weight must be >= 0, got -0\.5"):
        load_config(None, ["data.train=x.jsonl", "methods.l2sp.weight=-0.5"])
    with pytest.raises(ConfigError, match=r"methods\.l2sp\.alpha: unknown key 'alpha'"):
        load_config(None, ["data.train=x.jsonl", "methods.l2sp.alpha=1"])


@pytest.mark.slow
def test_l2sp_reduces_forgetting(scenario):
    r = scenario.finetune("l2sp_forget", "methods.l2sp.weight=1")
    records = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    terms = [rec["terms"]["l2sp"] for rec in records if "terms" in rec]
    assert terms[0] == 0.0 and terms[-1] > 0
    plain = scenario.plain
    print(f"\nforgot: l2sp {forgot(r):.3f} vs plain {forgot(plain):.3f}; "
          f"elements loss: l2sp {r.after['elements']['loss']:.3f} vs plain {plain.after['elements']['loss']:.3f}")
    assert forgot(r) < 0.5 * forgot(plain)
    assert r.after["elements"]["loss"] < 0.5 * r.before["elements"]["loss"], "the new task is still learned"
