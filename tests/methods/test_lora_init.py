"""methods.lora.init: PiSSA, CorDA and OLoRA ("orthonormal") through PEFT, checked by their mechanism.

PiSSA's factors are the top-r singular part of W and the frozen residual plus s·BA is W; CorDA KPM
takes its covariance from the keep data; every moving init starts at the base's outputs (to float
rounding); the saved adapter is a plain LoRA that gives the trained model on the *original* base;
methods.kl's teacher is that base, not the residual; a killed run resumes bit for bit.
"""

import json
import os

import pytest
import torch

import forgetless
from forgetless.config import DatasetSpec, ModelConfig, TinyModelConfig, load_config
from forgetless.errors import ConfigError
from forgetless.methods import REGISTRY, Context
from forgetless.models import load_model, load_tokenizer
from forgetless.models.adapters import adapters_disabled
from forgetless.models.saving import INITIAL_ADAPTER
from tests.methods.test_contract import killed
from tests.conftest import FAST_MODEL
from tests.resume.conftest import assert_same_run

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPE = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
MODEL = ModelConfig(name_or_path="tiny", tiny=SHAPE)
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "examples", "lora_pissa.yaml")
START_ATOL = 1e-6  # W_res + s·B0A0 is W up to float32 rounding (measured: ~3e-7 on these logits)


def _tiny():
    tok = load_tokenizer(MODEL)
    return load_model(MODEL, tok, seed=0), tok


def _fast_model() -> ModelConfig:
    """The model of FAST_MODEL (what the short runs train)."""
    return load_config(None, [*FAST_MODEL, "data.train=x.jsonl"]).model


def _lora(**options):
    return REGISTRY["lora"].build(REGISTRY["lora"].config(**options))


def _ids(tok):
    return torch.tensor([tok("The capital of France is Paris, and the symbol of gold is Au")["input_ids"]])


def _context(tok, *extra):
    cfg = load_config(None, ["data.train={path: demo:elements, limit: 24}", "data.keep.capitals={path: demo:capitals, limit: 24}",
                             "data.max_length=48", *extra])
    ctx = Context.build(cfg, tok)
    ctx.train_examples = ctx.load_dataset(cfg.data.train[0])
    return ctx


def _layer(peft, name="q_proj", block=0):
    mlp = name in ("gate_proj", "up_proj", "down_proj")
    parent = peft.base_model.model.model.layers[block]
    return getattr(parent.mlp if mlp else parent.self_attn, name)


@pytest.mark.parametrize("name", ["q_proj", "k_proj", "down_proj"])
def test_pissa_factors_are_the_top_singular_part_and_the_residual_completes_w(name):
    model, _ = _tiny()
    weight = dict(model.named_parameters())[f"model.layers.0.{'mlp' if name == 'down_proj' else 'self_attn'}.{name}.weight"].detach().clone()
    peft = _lora(init="pissa", r=4, alpha=8).wrap_model(model, None)
    layer = _layer(peft, name)
    A, B, s = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), layer.scaling["default"]
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    torch.testing.assert_close(s * B @ A, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], rtol=0, atol=1e-5)
    # A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s), up to the sign of each singular pair
    torch.testing.assert_close(A.abs(), (torch.sqrt(S[:4] / s)[:, None] * Vh[:4]).abs(), rtol=0, atol=1e-5)
    torch.testing.assert_close(B.abs(), (U[:, :4] * torch.sqrt(S[:4] / s)).abs(), rtol=0, atol=1e-5)
    residual = layer.base_layer.weight.detach()
    torch.testing.assert_close(residual + s * B @ A, weight, rtol=0, atol=1e-6)
    # the residual has lost exactly the top 4 singular values
    torch.testing.assert_close(torch.linalg.svdvals(residual)[: len(S) - 4], S[4:], rtol=0, atol=1e-5)
    assert layer.base_layer.weight.requires_grad is False


def test_pissa_with_a_randomized_svd_is_seeded_and_still_completes_w():
    runs = []
    for _ in range(2):
        model, _ = _tiny()
        weight = model.model.layers[1].mlp.up_proj.weight.detach().clone()
        torch.manual_seed(3)
        peft = _lora(init="pissa", init_niter=2, r=4).wrap_model(model, None)
        layer = _layer(peft, "up_proj", block=1)
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        torch.testing.assert_close(layer.base_layer.weight + layer.scaling["default"] * B @ A, weight, rtol=0, atol=1e-6)
        runs.append(A.clone())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("options", [{"init": "pissa"}, {"init": "corda"}, {"init": "corda", "corda_mode": "ipm"}, {"init": "orthonormal"}])
def test_moving_inits_start_at_the_base_outputs(options):
    model, tok = _tiny()
    ids = _ids(tok)
    base = model(ids).logits
    method = _lora(r=4, corda_samples=16, **options)
    peft = method.wrap_model(model, _context(tok))
    diff = float((peft(ids).logits - base).detach().abs().max())
    assert diff <= START_ATOL, f"{options}: the wrapped model's logits differ from the base's by {diff:.3g}"
    assert all("lora_" in n for n, p in peft.named_parameters() if p.requires_grad)
    assert method.describe()["init"] == options["init"]
    assert getattr(peft, INITIAL_ADAPTER), "the initial adapter is kept for the conversion at save"
    with adapters_disabled(peft):  # what makes these inits different: adapters off is the residual
        assert float((peft(ids).logits - base).abs().max()) > 1e-3


def test_corda_kpm_takes_its_covariance_from_the_keep_data():
    def init_of(tok_ctx, **options):
        model, tok = _tiny()
        method = _lora(init="corda", r=4, corda_samples=24, **options)
        peft = method.wrap_model(model, tok_ctx(tok))
        return _layer(peft, "v_proj").lora_A["default"].weight.detach().clone(), method.describe()

    keep_a, facts = init_of(_context)
    assert facts["corda_mode"] == "kpm" and facts["corda_data"] == "demo:capitals" and facts["corda_samples"] == 24
    again, _ = init_of(_context)
    assert torch.equal(keep_a, again), "the same data must give the same init (resume recomputes it)"
    other_keep, _ = init_of(lambda tok: _context(tok, "data.keep.capitals={path: demo:currencies, limit: 24}"))
    assert (keep_a - other_keep).abs().max() > 1e-3, "other keep data must give another init"
    named, facts = init_of(_context, corda_data=DatasetSpec(path="demo:currencies", limit=24))
    assert facts["corda_data"] == "demo:currencies"
    torch.testing.assert_close(named, other_keep, rtol=0, atol=0)  # corda_data overrides data.keep
    ipm, facts = init_of(_context, corda_mode="ipm")
    assert facts["corda_data"] == "train" and (ipm - keep_a).abs().max() > 1e-3


def test_corda_kpm_trains_the_components_the_keep_data_uses_least():
    """KPM's adapter is the *last* r components of the SVD of W·C, IPM's the first: on the keep data's
    inputs, the adapter's share of the layer's output is much smaller under KPM."""
    shares = {}
    for mode in ("kpm", "ipm"):
        model, tok = _tiny()
        ctx = _context(tok, "data.train={path: demo:capitals, limit: 24}")  # ipm on the same data: the contrast is the mode
        peft = _lora(init="corda", corda_mode=mode, r=4, corda_samples=24).wrap_model(model, ctx)
        layer, seen = _layer(peft, "o_proj", block=1), []
        handle = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
        with torch.no_grad():
            for e in ctx.load_dataset(ctx.keep)[:8]:
                peft(torch.tensor([e.input_ids]))
        handle.remove()
        x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
        adapter = layer.scaling["default"] * x @ (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).T
        shares[mode] = float(adapter.norm() / (x @ layer.base_layer.weight.T + adapter).norm())
    assert shares["kpm"] < 0.2 * shares["ipm"], shares


def _train(tmp_path, name, *extra):
    cfg = forgetless.load_config(EXAMPLE, [
        *FAST_MODEL, f"output.dir={tmp_path / name}", "output.progress=false", "output.log_every=1", "train.max_steps=4",
        "train.micro_batch_size=8", "train.lr=3e-3", "eval.max_examples=8", "eval.generation=false", "data.max_length=48",
        "train.seed=0", "methods.lora.r=4", "methods.lora.corda_samples=16", *extra,
    ])
    return forgetless.train(cfg)


@pytest.mark.parametrize("init", ["pissa", "corda"])
def test_saved_adapter_on_the_original_base_gives_the_trained_model(tmp_path, init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r = _train(tmp_path, init, f"methods.lora.init={init}")
    model_dir = r.run_dir / "model"
    saved = json.loads((model_dir / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True  # PEFT's conversion: [A; A0], [B, -B0]
    assert saved["lora_alpha"] == 2 * r.train["methods"]["lora"]["alpha"]
    tok = load_tokenizer(ModelConfig(name_or_path=str(r.run_dir)))
    ids = _ids(tok)
    trained = r.model.eval()
    expected = trained(ids).logits
    assert float((expected - load_model(_fast_model(), tok, seed=0)(ids).logits).abs().max()) > 1e-2  # it did train

    # the tiny base exists nowhere: saved beside, the ORIGINAL weights (not the residual)
    beside = AutoModelForCausalLM.from_pretrained(model_dir / "base_model").eval()
    original = load_model(_fast_model(), tok, seed=0).eval()
    torch.testing.assert_close(beside(ids).logits, original(ids).logits, rtol=0, atol=START_ATOL)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir / "base_model"), str(model_dir)).eval()
    torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=1e-5)
    # ... and on the original weights themselves
    plain_on_original = PeftModel.from_pretrained(original, str(model_dir)).eval()
    torch.testing.assert_close(plain_on_original(ids).logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(load_model(ModelConfig(name_or_path=str(r.run_dir)), tok)(ids).logits, expected, rtol=0, atol=1e-5)

    scores = forgetless.evaluate(str(r.run_dir), {"elements": "demo:elements"}, max_examples=8, generation=False, max_length=48)
    assert scores["elements"]["loss"] == pytest.approx(r.after["elements"]["loss"], abs=1e-5)

    from forgetless.models.merge import merge_model

    merge_model(r.run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-5)


def test_a_local_base_is_referenced_and_the_adapter_applies_to_it(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(_fast_model())
    base_dir = tmp_path / "base"
    load_model(_fast_model(), tok, seed=0).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    r = _train(tmp_path, "local", f"model.name_or_path={base_dir}")
    model_dir = r.run_dir / "model"
    assert json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir.resolve())
    assert not (model_dir / "base_model").exists()
    ids = _ids(tok)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(model_dir)).eval()
    torch.testing.assert_close(plain(ids).logits, r.model.eval()(ids).logits, rtol=0, atol=1e-5)


def test_kl_teacher_is_the_real_base_not_the_residual():
    model, tok = _tiny()
    ids = _ids(tok)
    base = model(ids).logits
    peft = _lora(init="pissa", r=4).wrap_model(model, None)
    kl = REGISTRY["kl"].build(REGISTRY["kl"].config())
    kl.before_train(peft, _context(tok))
    assert kl.describe()["teacher"] == "frozen copy"
    torch.testing.assert_close(kl.teacher(ids).logits, base, rtol=0, atol=START_ATOL)
    assert not any(p.requires_grad for p in kl.teacher.parameters())
    out = kl.teacher_outputs(peft, ids, torch.ones_like(ids))
    torch.testing.assert_close(out.head(out.hidden), base, rtol=0, atol=START_ATOL)
    # default init: no copy, adapters off give the base
    model, _ = _tiny()
    kl = REGISTRY["kl"].build(REGISTRY["kl"].config())
    kl.before_train(_lora(r=4).wrap_model(model, None), _context(tok))
    assert kl.teacher is None


@pytest.mark.parametrize("init", ["methods.lora.init_niter=2", "methods.lora.init=corda"])
def test_killed_and_resumed_run_recomputes_the_same_init(tmp_path, init):
    def cfg(out, *extra):
        return forgetless.load_config(EXAMPLE, [
            *FAST_MODEL, f"output.dir={out}", "output.progress=false", "output.log_every=1", "output.checkpoint_every=1",
            "train.max_steps=3", "train.micro_batch_size=4", "eval.max_examples=4", "eval.generation=false",
            "methods.lora.r=4", "methods.lora.corda_samples=8", init, *extra,
        ])

    reference = tmp_path / "reference"
    forgetless.train(cfg(reference))
    out = tmp_path / "run"
    assert killed(cfg(out), "step:2") == 137
    forgetless.train(cfg(out, "output.resume=true"))
    assert_same_run(reference, out)


def test_bad_init_options():
    base = ["data.train=x.jsonl"]
    with pytest.raises(ConfigError, match=r"methods\.lora\.init_niter .*needs init: pissa"):
        load_config(None, [*base, "methods.lora.init_niter=4"])
    with pytest.raises(ConfigError, match=r"methods\.lora\.init: pissa cannot be combined with variant: dora"):
        load_config(None, [*base, "methods.lora.init=pissa", "methods.lora.variant=dora"])
    with pytest.raises(ConfigError, match=r"methods\.lora\.init: corda needs bias: none and no modules_to_save"):
        load_config(None, [*base, "methods.lora.init=corda", "methods.lora.modules_to_save=[lm_head]"])
    with pytest.raises(ConfigError, match=r"methods\.lora\.corda_data is only read with init: corda"):
        load_config(None, [*base, "methods.lora.corda_data=demo:capitals"])
    with pytest.raises(ConfigError, match=r"methods\.lora\.init.*'default', 'pissa', 'corda', 'orthonormal'"):
        load_config(None, [*base, "methods.lora.init=olora"])
    model, tok = _tiny()
    no_keep = Context.build(load_config(None, ["data.train=demo:elements"]), tok)
    with pytest.raises(ConfigError, match=r"kpm protects the knowledge of some data; add a data\.keep set"):
        _lora(init="corda").wrap_model(model, no_keep)
