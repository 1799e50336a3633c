"""methods.osf: PEFT's orthogonal subspace fine-tuning, checked by its mechanism.

After real training steps the projection of every trained weight onto its protected top-k singular
subspace (left and right) is what it was, while the rest moved; without forgetless's projection of the
weights after each step, AdamW leaks into that subspace. The saved model is a plain model with the
trained outputs, and a task sequence protects more directions task by task.
"""

import json
import os

import pytest
import torch

import forgetless
from forgetless.config import ModelConfig, load_config
from forgetless.errors import ConfigError
from forgetless.methods import REGISTRY, Context, TaskLink
from forgetless.methods.osf import osf_layers
from forgetless.models import load_model, load_tokenizer
from forgetless.models.adapters import adapters_disabled
from tests.conftest import FAST_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "examples", "osf.yaml")


def _model_cfg() -> ModelConfig:
    return load_config(None, [*FAST_MODEL, "data.train=x.jsonl"]).model


def _osf(**options):
    return REGISTRY["osf"].build(REGISTRY["osf"].config(**options))


def _ids(tok):
    return torch.tensor([tok("The capital of France is Paris, and the symbol of gold is Au")["input_ids"]])


def _leaks(model, originals: dict) -> tuple[float, float]:
    """(largest |U_kᵀ ΔW| or |ΔW V_k| over all OSF layers, largest |ΔW|), with U_k, V_k the top-k singular
    vectors of each original weight (torch.linalg.svd), k the layer's protected rank."""
    worst, moved = 0.0, 0.0
    for name, layer in model.base_model.model.named_modules():
        if layer in osf_layers(model):
            w = originals[f"{name}.weight"]
            delta = (layer.base_layer.weight + layer.get_delta_weight("default")).detach() - w
            k = layer.effective_rank["default"]
            U, _, Vh = torch.linalg.svd(w, full_matrices=False)
            worst = max(worst, float((U[:, :k].T @ delta).abs().max()), float((delta @ Vh[:k].T).abs().max()))
            moved = max(moved, float(delta.abs().max()))
    return worst, moved


@pytest.fixture(scope="module")
def osf_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("osf") / "run"
    cfg = forgetless.load_config(EXAMPLE, [
        *FAST_MODEL, f"output.dir={out}", "output.progress=false", "train.max_steps=6", "train.micro_batch_size=8",
        "train.lr=1e-2", "train.seed=0", "eval.max_examples=8", "eval.generation=false", "data.max_length=48",
    ])
    return forgetless.train(cfg)


def test_training_leaves_the_protected_subspace_of_every_weight_fixed(osf_run):
    tok = load_tokenizer(_model_cfg())
    originals = {k: v.detach().clone() for k, v in load_model(_model_cfg(), tok, seed=0).state_dict().items()}
    model = osf_run.model
    worst, moved = _leaks(model, originals)
    assert moved > 1e-2, f"the weights hardly moved ({moved:.3g}): the check would be empty"
    assert worst < 1e-5, f"the protected subspace moved by {worst:.3g} (the weights by {moved:.3g})"
    assert len(osf_layers(model)) == 14 and osf_run.train["methods"]["osf"]["protected_fraction"] == pytest.approx(0.3, abs=0.02)
    # the base weights themselves are untouched: adapters off is the base model
    with adapters_disabled(model):
        ids = _ids(tok)
        torch.testing.assert_close(model(ids).logits, load_model(_model_cfg(), tok, seed=0)(ids).logits, rtol=0, atol=0)


def test_without_the_weight_projection_adamw_leaks_into_the_protected_subspace():
    """PEFT's gradient hooks alone: AdamW's per-coordinate scaling takes the step out of the projected space."""
    tok = load_tokenizer(_model_cfg())
    ids = _ids(tok)
    leaks = {}
    for project in (True, False):
        model = load_model(_model_cfg(), tok, seed=0)
        originals = {k: v.detach().clone() for k, v in model.state_dict().items()}
        method = _osf(project_weights=project)
        peft = method.wrap_model(model, None)
        optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
        method.configure_optimizer(optimizer)
        for _ in range(4):
            peft(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        leaks[project] = _leaks(peft, originals)
    (kept, moved_kept), (leaked, moved) = leaks[True], leaks[False]
    assert kept < 1e-5 and moved_kept > 1e-2
    assert leaked > 100 * kept and leaked > 0.05 * moved, leaks


def test_the_saved_model_is_plain_and_gives_the_trained_outputs(osf_run, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = osf_run.run_dir / "model"
    assert (model_dir / "model.safetensors").is_file() and not (model_dir / "adapter_config.json").exists()
    tok = load_tokenizer(ModelConfig(name_or_path=str(osf_run.run_dir)))
    ids = _ids(tok)
    expected = osf_run.model.eval()(ids).logits
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(load_model(ModelConfig(name_or_path=str(osf_run.run_dir)), tok)(ids).logits, expected, rtol=0, atol=1e-5)
    scores = forgetless.evaluate(str(osf_run.run_dir), {"elements": "demo:elements"}, max_examples=8, generation=False, max_length=48)
    assert scores["elements"]["loss"] == pytest.approx(osf_run.after["elements"]["loss"], abs=1e-5)
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"


def test_starts_at_base_and_distillation_needs_no_copy():
    tok = load_tokenizer(_model_cfg())
    model = load_model(_model_cfg(), tok, seed=0)
    ids = _ids(tok)
    base = model(ids).logits.detach()
    peft = _osf(effective_rank=8).wrap_model(model, None)
    assert float((peft(ids).logits.detach() - base).abs().max()) <= 1e-6
    assert {layer.effective_rank["default"] for layer in osf_layers(peft)} == {8}
    assert all("osf_svd_params" in n for n, p in peft.named_parameters() if p.requires_grad)
    kl = REGISTRY["kl"].build(REGISTRY["kl"].config())
    kl.before_train(peft, Context.build(load_config(None, ["data.train=demo:elements"]), tok))
    assert kl.teacher is None  # adapters off is the base: OSF leaves W itself as it is


@pytest.mark.parametrize("start, grow, expected, notes", [
    (0.3, 0.2, [0.3, 0.5, 0.7, 0.9, 0.9], 1),  # PEFT's continual example: 30 %, 50 %, 70 %; stops below 1
    (0.5, 0.0, [0.5, 0.5, 0.5], 0),
    (8, 4, [8, 12, 16], 0),  # counts grow by counts
])
def test_a_task_sequence_protects_more_directions_task_by_task(start, grow, expected, notes):
    got, link_notes = [], []
    for index in range(1, len(expected) + 1):
        link = TaskLink(index, None)
        options = REGISTRY["osf"].config(effective_rank=start, grow_by=grow)
        got.append(REGISTRY["osf"].build.next_task(options, link).effective_rank)
        link_notes += link.notes
    assert got == pytest.approx(expected)
    assert len(link_notes) == notes and all("methods.osf" in n for n in link_notes)


def test_bad_osf_options():
    base = ["data.train=x.jsonl"]
    with pytest.raises(ConfigError, match=r"methods\.osf\.effective_rank must be positive"):
        load_config(None, [*base, "methods.osf.effective_rank=0"])
    with pytest.raises(ConfigError, match=r"methods\.osf\.effective_rank 2\.5: 1 or more is a count"):
        load_config(None, [*base, "methods.osf.effective_rank=2.5"])
    with pytest.raises(ConfigError, match=r"methods\.osf\.grow_by 0\.5 must be a whole number"):
        load_config(None, [*base, "methods.osf.effective_rank=8", "methods.osf.grow_by=0.5"])
    with pytest.raises(ConfigError, match="lora and osf cannot be combined|osf and lora cannot be combined"):
        load_config(None, [*base, "methods.osf=true", "methods.lora=true"])
    with pytest.raises(ConfigError, match="freeze and osf cannot be combined|osf and freeze cannot be combined"):
        load_config(None, [*base, "methods.osf=true", "methods.freeze.train_last_n=1"])
    tok = load_tokenizer(_model_cfg())
    with pytest.raises(ConfigError, match=r"methods\.osf\.target_modules: .*"):
        _osf(target_modules=["qq_proj"]).wrap_model(load_model(_model_cfg(), tok, seed=0), None)
    with pytest.raises(ConfigError, match=r"protects every direction of every target layer"):
        _osf(effective_rank=1000).wrap_model(load_model(_model_cfg(), tok, seed=0), None)
