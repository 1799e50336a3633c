import json

import pytest
import torch

from forgetless.config import DatasetSpec, TinyModelConfig, load_config
from forgetless.data.batching import collate
from forgetless.data.formats import IGNORE
from forgetless.errors import ConfigError
from forgetless.loss import Outputs, forward as lm_forward
from forgetless.methods import REGISTRY
from forgetless.methods.base import Context
from forgetless.methods.kl import KL
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer
from tests.methods.conftest import forgot

pytestmark = pytest.mark.slow


def _setup(*options):
    cfg = load_config(None, ["data.train=x.jsonl", "data.max_length=48", "train.micro_batch_size=4", "methods.kl=true", *options])
    tok = load_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1), tok, seed=0)
    ctx = Context.build(cfg, tok, seed=0)
    batch = collate(ctx.load_dataset(DatasetSpec("demo:capitals", limit=3)), tok.pad_token_id)
    return cfg, model, ctx, batch


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _kl_rows(student, teacher, T):
    """Direct formula: T² Σ_v p_t (log p_t − log p_s) per row."""
    p_t = torch.softmax(teacher / T, -1)
    return T * T * (p_t * (torch.log_softmax(teacher / T, -1) - torch.log_softmax(student / T, -1))).sum(-1)


def _first_terms(run_dir):
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "terms" in rec:
            return rec["terms"]


def test_value_and_gradient_match_the_formula():
    T, w = 2.0, 0.5
    cfg, model, ctx, batch = _setup(f"methods.kl.temperature={T}", f"methods.kl.weight={w}")
    kl = KL(cfg.methods["kl"])
    kl.before_train(model, ctx)
    teacher = kl.teacher
    assert teacher is not model and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        z_t = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    _perturb(model)  # the student moves; the teacher must not
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # the student's outputs as full logits, to take the gradient with respect to them
    term = kl.batch_terms(model, batch, Outputs(None, None, logits.shape[-1], logits=logits))["kl"]
    (grad,) = torch.autograd.grad(term, logits)

    select = torch.zeros_like(batch["labels"], dtype=torch.bool)
    select[:, :-1] = batch["labels"][:, 1:] != IGNORE  # position i predicts token i+1
    z_s = logits.detach()
    expected = w * _kl_rows(z_s[select], z_t[select], T).sum()
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)
    assert term.item() > 0
    # d/dz_s [w T² KL(p_t || p_s)] = w T (p_s − p_t) at the selected positions, 0 elsewhere
    expected_grad = torch.zeros_like(z_s)
    expected_grad[select] = w * T * (torch.softmax(z_s[select] / T, -1) - torch.softmax(z_t[select] / T, -1))
    assert torch.allclose(grad, expected_grad, atol=1e-6)
    assert grad[~select].abs().max() == 0


def test_positions_all_and_general_data_are_scaled_to_the_train_case():
    cfg, model, ctx, batch = _setup("methods.kl.positions=all")
    kl = KL(cfg.methods["kl"])
    kl.before_train(model, ctx)
    z_t = kl.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    _perturb(model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    n_targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    real = batch["attention_mask"][:, 1:] == 1
    assert int(real.sum()) > n_targets  # prompts count too
    got = kl.batch_terms(model, batch, lm_forward(model, batch["input_ids"], batch["attention_mask"]))["kl"]
    assert got.item() == pytest.approx(n_targets * _kl_rows(logits[:, :-1][real], z_t[:, :-1][real], 1.0).mean().item(), rel=1e-5)

    # general data: the method asks the recipe for it (paired_data) and adds nothing to the training batch;
    # its paired term is the sum over the selected positions of a micro-batch of that data
    cfg, model, ctx, batch = _setup("methods.kl.data={path: demo:currencies, limit: 10}")
    kl = KL(cfg.methods["kl"])
    general = kl.paired_data(ctx)
    assert len(general) == 10
    kl.before_train(model, ctx)
    _perturb(model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert kl.batch_terms(model, batch, lm_forward(model, batch["input_ids"], batch["attention_mask"])) == {}
    first = collate(general[:4], 0)
    logits = model(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
    term = kl.paired_terms(model, first, lm_forward(model, first["input_ids"], first["attention_mask"]))["kl"]
    with torch.no_grad():
        z_t = kl.teacher(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
    sel = first["labels"][:, 1:] != IGNORE
    assert kl.paired_count(first) == int(sel.sum())
    assert term.item() == pytest.approx(_kl_rows(logits.detach()[:, :-1][sel], z_t[:, :-1][sel], 1.0).sum().item(), rel=1e-5)
    term.backward()  # the student forward on the general data carries the gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_adapters_give_the_teacher_without_a_copy(monkeypatch):
    from peft import LoraConfig, get_peft_model

    import forgetless.methods.kl as kl_module

    cfg, base, ctx, batch = _setup("methods.kl.temperature=1.5")
    with torch.no_grad():
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter: the model no longer equals its base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))

    def no_copy(*args, **kwargs):
        raise AssertionError("the teacher must not be a copy when adapters can be disabled")

    monkeypatch.setattr(kl_module.copy, "deepcopy", no_copy)
    calls = []
    original = model.disable_adapter
    monkeypatch.setattr(model, "disable_adapter", lambda: calls.append(1) or original())
    kl = KL(cfg.methods["kl"])
    kl.before_train(model, ctx)
    held = [v for v in vars(kl).values() if isinstance(v, (torch.Tensor, torch.nn.Module))]
    assert kl.teacher is None and held == []
    assert kl.describe()["teacher"] == "adapters disabled (no copy)"

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(logits, base_logits)
    term = kl.batch_terms(model, batch, lm_forward(model, batch["input_ids"], batch["attention_mask"]))["kl"]
    assert calls == [1]
    assert model.training  # restored after the teacher's forward in eval mode
    sel = batch["labels"][:, 1:] != IGNORE
    direct = _kl_rows(logits.detach()[:, :-1][sel], base_logits[:, :-1][sel], 1.5).sum()
    assert term.item() == pytest.approx(direct.item(), rel=1e-5)

    # a trainable base weight would move the "teacher" too: then a frozen copy is required
    monkeypatch.undo()
    model.base_model.model.lm_head.weight.requires_grad_(True)
    kl = KL(cfg.methods["kl"])
    kl.before_train(model, ctx)
    assert kl.teacher is not None


@pytest.fixture(scope="module")
def kl_runs(scenario):
    """Full runs with the KL on the training batch and on the capitals (shared by the tests below)."""
    return {
        "train": scenario.finetune("kl_train", "methods.kl.weight=1.0"),
        "general": scenario.finetune("kl_general", "methods.kl.data={path: demo:capitals, limit: 40}"),
    }


def test_kl_is_zero_at_step_0(kl_runs):
    for r in kl_runs.values():
        assert _first_terms(r.run_dir)["kl"] == 0.0
        assert r.train["methods"]["kl"]["teacher"] == "frozen copy"
    last = json.loads([line for line in (kl_runs["train"].run_dir / "metrics.jsonl").read_text().splitlines() if '"terms"' in line][-1])
    assert last["terms"]["kl"] > 0.01  # and it grows once the model moves


def test_kl_with_lora_uses_disable_adapter(scenario):
    if "lora" not in REGISTRY:
        pytest.skip("methods.lora is not available")
    r = scenario.finetune("kl_lora", "methods.lora.r=4", "methods.kl.weight=1.0", steps=3)
    assert r.train["methods"]["kl"]["teacher"] == "adapters disabled (no copy)"
    assert _first_terms(r.run_dir)["kl"] == 0.0


def test_kl_reduces_forgetting(scenario, kl_runs):
    on_train, on_general = kl_runs["train"], kl_runs["general"]
    plain = forgot(scenario.plain)
    print(f"forgot: plain {plain:.3f}, kl on train {forgot(on_train):.3f}, kl on capitals {forgot(on_general):.3f}")
    assert forgot(on_train) < 0.7 * plain
    assert forgot(on_general) < 0.2 * plain
    # distilling on other data leaves the task free to be learned
    assert on_general.after["elements"]["loss"] < on_general.before["elements"]["loss"] / 3


def test_bad_kl_options():
    base = ["data.train=x.jsonl"]
    with pytest.raises(ConfigError, match=r"methods\.kl\.weight must be positive"):
        load_config(None, [*base, "methods.kl.weight=0"])
    with pytest.raises(ConfigError, match=r"methods\.kl\.temperature must be positive"):
        load_config(None, [*base, "methods.kl.temperature=-1"])
    with pytest.raises(ConfigError, match=r"methods\.kl\.positions.*'targets', 'all'"):
        load_config(None, [*base, "methods.kl.positions=prompt"])
    with pytest.raises(ConfigError, match=r"methods\.kl\.data\.limit must be a positive"):
        load_config(None, [*base, "methods.kl.data={path: demo:general, limit: 0}"])
    assert load_config(None, [*base, "methods.kl.data=train"]).methods["kl"].data.path == "train"
