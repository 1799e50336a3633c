import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from forgetless.config import TinyModelConfig, load_config
from forgetless.errors import ConfigError
from forgetless.methods import REGISTRY, Context
from forgetless.methods.ewc import EWC, STATE_FILE, anchored_squares
from forgetless.methods.fisher import diagonal_fisher
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer
from tests.methods.conftest import forgot

SHAPE = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
TOK = load_tiny_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def setup(*overrides: str, keep: bool = True):
    """The EWC config and a recipe-like Context, without a training run."""
    cfg = load_config(None, [
        "data.train={path: demo:elements, limit: 8}",
        *(["data.keep.capitals={path: demo:capitals, limit: 12}"] if keep else []),
        "data.max_length=48",
        "methods.ewc.samples=6",
        *overrides,
    ])
    return cfg.methods["ewc"], Context.build(cfg, TOK, seed=0)


def tiny(seed: int = 0):
    return build_tiny_model(SHAPE, TOK, seed=seed)


def perturb(model, seed: int = 1, scale: float = 0.01) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def start_ewc(model, *overrides: str) -> tuple[EWC, Context]:
    cfg, ctx = setup(*overrides)
    ewc = EWC(cfg)
    ewc.before_train(model, ctx)
    return ewc, ctx


def test_penalty_is_zero_at_start_and_its_gradient_is_the_formula():
    model = tiny()
    ewc, ctx = start_ewc(model, "methods.ewc.weight=7.5")
    # the (sampled, seeded) Fisher of the first data.keep set, capped at `samples`, at the start weights
    capitals = ctx.load_dataset(ctx.keep)[:6]
    reference = diagonal_fisher(model, capitals, TOK.pad_token_id, "sampled", seed=ctx.seed)
    fisher = dict(zip(ewc.names, ewc.fisher))
    for n in reference:
        torch.testing.assert_close(fisher[n], reference[n])
    assert ewc.step_terms(model)["ewc"].item() == 0.0

    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb(model)
    value = ewc.step_terms(model)["ewc"]
    value.backward()
    params = dict(model.named_parameters())
    expected = 7.5 / 2 * sum(float((fisher[n].double() * (params[n].detach().double() - start[n].double()) ** 2).sum()) for n in fisher)
    assert value.item() == pytest.approx(expected, rel=1e-5) and expected > 0
    for n, p in params.items():
        torch.testing.assert_close(p.grad, 7.5 * fisher[n] * (p.detach() - start[n]), rtol=1e-5, atol=1e-12)


def test_bfloat16_state_halves_the_device_tensors_and_gives_the_formula_on_them():
    model = tiny()
    ewc, _ = start_ewc(model, "methods.ewc.weight=7.5", "methods.ewc.anchor_dtype=bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in [*ewc.anchors, *ewc.weights])
    assert all(f.dtype == torch.float32 for f in ewc.fisher)  # the raw Fisher (saved, accumulated) stays float32
    perturb(model)
    value = ewc.step_terms(model)["ewc"]
    value.backward()
    params = dict(model.named_parameters())
    w = {n: t.float() for n, t in zip(ewc.names, ewc.weights)}
    a = {n: t.float() for n, t in zip(ewc.names, ewc.anchors)}
    expected = sum(float((w[n].double() * (params[n].detach().double() - a[n].double()) ** 2).sum()) for n in w) / 2
    assert value.item() == pytest.approx(expected, rel=1e-5) and expected > 0
    for n in w:
        torch.testing.assert_close(params[n].grad, w[n] * (params[n].detach() - a[n]), rtol=1e-5, atol=1e-12)


def test_empirical_kind_uses_the_data_labels():
    model = tiny()
    ewc, ctx = start_ewc(model, "methods.ewc.fisher=empirical", "methods.ewc.samples=4")
    capitals = ctx.load_dataset(ctx.keep)[:4]
    reference = diagonal_fisher(model, capitals, TOK.pad_token_id, "empirical")
    for n, f in zip(ewc.names, ewc.fisher):
        torch.testing.assert_close(f, reference[n])


def test_penalty_function_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True), torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)]
    anchors = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    weights = [torch.rand(3, 4, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *ps: anchored_squares(list(ps), anchors, weights), params)
    assert torch.autograd.gradcheck(lambda *ps: anchored_squares(list(ps), anchors, 0.5), params)
    value = anchored_squares(params, anchors, weights)
    assert value.item() == pytest.approx(sum(float((w * (p.detach() - a) ** 2).sum()) / 2 for w, p, a in zip(weights, params, anchors)))


def test_only_trainable_parameters_are_anchored():
    model = tiny()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.layers.1."))
    ewc, _ = start_ewc(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ewc.names) == trainable
    perturb(model)
    ewc.step_terms(model)["ewc"].backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n


def test_normalize_max_scales_the_penalty_not_the_saved_fisher(tmp_path):
    model = tiny()
    ewc, ctx = start_ewc(model, "methods.ewc.normalize=max", "methods.ewc.weight=3")
    assert max(float(w.max()) for w in ewc.weights) == pytest.approx(3.0)  # weight x F / max F
    ctx.run_dir = tmp_path
    ewc.after_train(model, ctx)
    saved = load_file(str(tmp_path / STATE_FILE))
    assert max(float(v.max()) for k, v in saved.items() if k.startswith("fisher.")) == pytest.approx(ewc.describe()["fisher_max"])
    assert ewc.describe()["fisher_max"] < 0.5


def test_online_ewc_accumulates_the_previous_fisher(tmp_path):
    model = tiny()
    first, ctx = start_ewc(model)
    ctx.run_dir = tmp_path
    first.after_train(model, ctx)
    saved = load_file(str(tmp_path / STATE_FILE))
    for n, f, a in zip(first.names, first.fisher, first.anchors):
        assert torch.equal(saved[f"fisher.{n}"], f) and torch.equal(saved[f"anchor.{n}"], a)

    perturb(model)  # as if the first task had trained
    capitals = ctx.load_dataset(ctx.keep)[:6]
    new = diagonal_fisher(model, capitals, TOK.pad_token_id, "sampled", seed=ctx.seed)
    for previous in (tmp_path, tmp_path / STATE_FILE):  # a run directory or the file itself
        second, _ = start_ewc(model, f"methods.ewc.previous_state={previous}", "methods.ewc.gamma=0.5")
        for n, f, a in zip(second.names, second.fisher, second.anchors):
            torch.testing.assert_close(f, 0.5 * saved[f"fisher.{n}"] + new[n])
            assert torch.equal(a, dict(model.named_parameters())[n].detach())  # anchored at this run's start
        assert second.step_terms(model)["ewc"].item() == 0.0
        assert second.describe()["online"]["gamma"] == 0.5


def test_state_dict_restores_the_anchors():
    model = tiny()
    first, _ = start_ewc(model)
    perturb(model)
    before = first.step_terms(model)["ewc"].item()
    resumed, _ = start_ewc(model)  # anchored at the perturbed weights...
    assert resumed.step_terms(model)["ewc"].item() == 0.0
    resumed.load_state_dict(first.state_dict())  # ...until the run's own state is loaded
    assert resumed.step_terms(model)["ewc"].item() == pytest.approx(before, rel=1e-6) and before > 0


def test_previous_state_must_match_the_model(tmp_path):
    model = tiny()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.layers.1."))
    first, ctx = start_ewc(model)
    ctx.run_dir = tmp_path
    first.after_train(model, ctx)
    with pytest.raises(ConfigError, match=r"methods.ewc.previous_state: .* no Fisher for trainable parameter model\.embed_tokens"):
        start_ewc(tiny(), f"methods.ewc.previous_state={tmp_path}")
    wider = build_tiny_model(TinyModelConfig(hidden_size=64, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1), TOK, 0)
    for n, p in wider.named_parameters():
        p.requires_grad_(n.startswith("model.layers.1."))
    with pytest.raises(ConfigError, match=r"methods.ewc.previous_state: .* has shape"):
        start_ewc(wider, f"methods.ewc.previous_state={tmp_path}")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ConfigError, match="methods.ewc.previous_state: .* is not an EWC state"):
        start_ewc(model, f"methods.ewc.previous_state={other}")
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not safetensors")
    with pytest.raises(ConfigError, match="methods.ewc.previous_state: cannot read"):
        start_ewc(model, f"methods.ewc.previous_state={junk}")


@pytest.mark.parametrize(
    "override, message",
    [
        ("methods.ewc.weight=-1", r"methods\.ewc\.weight must be >= 0"),
        ("methods.ewc.fisher=exact", r"methods\.ewc\.fisher: must be one of 'empirical', 'sampled'"),
        ("methods.ewc.samples=0", r"methods\.ewc\.samples must be at least 1"),
        ("methods.ewc.chunk_size=0", r"methods\.ewc\.chunk_size must be at least 1"),
        ("methods.ewc.gamma=1.5", r"methods\.ewc\.gamma must be in \[0, 1\]"),
        ("methods.ewc.previous_state=no/such/ewc_state.safetensors", r"methods\.ewc\.previous_state: no/such.* not found"),
    ],
)
def test_bad_options(override, message):
    with pytest.raises(ConfigError, match=message):
        setup(override)


def test_bad_fisher_kind_set_in_python():
    cfg, _ = setup()
    cfg.fisher = "true"
    with pytest.raises(ConfigError, match=r"methods\.ewc\.fisher must be one of empirical, sampled"):
        cfg.validate("methods.ewc")


def test_missing_data():
    cfg, ctx = setup(keep=False)
    with pytest.raises(ConfigError, match=r"methods\.ewc\.data is not set and there is no data\.keep set"):
        EWC(cfg).before_train(tiny(), ctx)
    cfg, ctx = setup("methods.ewc.data={path: demo:capitals, limit: 4}", keep=False)
    ewc = EWC(cfg)
    ewc.before_train(tiny(), ctx)
    assert ewc.samples == 4


# ---- training runs on the shared scenario -------------------------------------------------


def _terms(run_dir, name: str) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["terms"][name] for r in records if "terms" in r]


@pytest.mark.slow
def test_in_training_with_freeze(scenario):
    r = scenario.finetune("ewc_freeze", "methods.freeze.train_last_n=1", "methods.ewc.weight=1e4", "methods.ewc.samples=16", steps=3)
    terms = _terms(r.run_dir, "ewc")
    assert terms[0] == 0.0 and terms[-1] > 0
    state = load_file(str(r.run_dir / STATE_FILE))
    names = {k.split(".", 1)[1] for k in state}
    assert names and all(n.startswith("model.layers.2.") for n in names), names
    facts = r.train["methods"]["ewc"]
    assert facts["samples"] == 16 and facts["fisher"] == "sampled" and facts["fisher_sum"] > 0


@pytest.mark.slow
def test_online_ewc_across_two_runs(scenario):
    first = scenario.finetune("ewc_task1", "methods.ewc.samples=8", steps=2)
    second = scenario.finetune(
        "ewc_task2", f"model.name_or_path={first.run_dir}", f"methods.ewc.previous_state={first.run_dir}",
        "methods.ewc.gamma=0.5", "methods.ewc.samples=8", steps=2,
    )
    assert _terms(second.run_dir, "ewc")[0] == 0.0
    _, ctx = setup()
    capitals = ctx.load_dataset(ctx.keep)[:8]  # the scenario's keep set starts the same
    new = diagonal_fisher(first.model, capitals, TOK.pad_token_id, "sampled", seed=0)  # at the second run's start
    saved1, saved2 = load_file(str(first.run_dir / STATE_FILE)), load_file(str(second.run_dir / STATE_FILE))
    for n, f in new.items():
        torch.testing.assert_close(saved2[f"fisher.{n}"], 0.5 * saved1[f"fisher.{n}"] + f, rtol=1e-5, atol=1e-12)
    assert second.train["methods"]["ewc"]["online"]["gamma"] == 0.5


@pytest.mark.slow
def test_composes_with_lora(scenario):
    if "lora" not in REGISTRY:
        pytest.skip("methods.lora is not available")
    r = scenario.finetune("ewc_lora", "methods.lora.r=4", "methods.ewc.weight=1e4", "methods.ewc.samples=16", steps=3)
    assert _terms(r.run_dir, "ewc")[0] == 0.0
    state = load_file(str(r.run_dir / STATE_FILE))
    assert state and all("lora_" in k for k in state), "the Fisher and anchors cover the adapter only"
    lora_b = [v for k, v in state.items() if k.startswith("anchor.") and "lora_B" in k]
    assert lora_b and all(not v.any() for v in lora_b), "anchored at the adapter's initial values (B = 0)"
    assert any(v.any() for k, v in state.items() if k.startswith("fisher."))


@pytest.mark.slow
def test_ewc_reduces_forgetting(scenario):
    r = scenario.finetune("ewc_forget", "methods.ewc.fisher=sampled", "methods.ewc.weight=1e5")
    plain = scenario.plain
    print(f"\nforgot: ewc {forgot(r):.3f} vs plain {forgot(plain):.3f}; "
          f"elements loss: ewc {r.after['elements']['loss']:.3f} vs plain {plain.after['elements']['loss']:.3f}")
    assert forgot(r) < 0.5 * forgot(plain)
    assert r.after["elements"]["loss"] < 0.5 * r.before["elements"]["loss"], "the new task is still learned"
