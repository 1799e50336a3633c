"""methods.task_merge: every task trains from the base; the model is the merge of the tasks' deltas."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import forgetless
from forgetless.config import load_config
from forgetless.errors import ConfigError
from forgetless.merging import merge_task_vectors
from forgetless.models import load_model, load_tokenizer
from forgetless.recipes.continual import run_sequence
from tests.conftest import FAST_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = """
model: {name_or_path: tiny, tiny: {hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2}}
tasks:
  - {name: capitals, train: {path: demo:capitals, limit: 16}}
  - {name: elements, train: {path: demo:elements, limit: 16}}
data: {max_length: 48}
train: {max_steps: 3, micro_batch_size: 8, lr: 0.003, seed: 1}
eval: {max_examples: 4, generation: false, batch_size: 16}
output: {progress: false}
continual: {isolate: false}
methods: {task_merge: {merge: ties, density: 0.5, scale: 0.8}}
"""


def merged_model(base: dict, vectors: list, scale: float) -> dict:
    merged = merge_task_vectors(vectors, "ties", density=0.5)
    return {k: (b.float() + scale * merged[k]).to(b.dtype) if k in merged else b for k, b in base.items()}


def test_a_two_task_sequence_merges_the_deltas_of_every_task_so_far(tmp_path):
    (tmp_path / "seq.yaml").write_text(SEQ)
    cfg = load_config(tmp_path / "seq.yaml", [f"output.dir={tmp_path / 'out'}"])
    run_sequence(cfg)
    first, second = tmp_path / "out" / "task_merge" / "task-1-capitals", tmp_path / "out" / "task_merge" / "task-2-elements"
    c2 = load_config(second / "config.yaml")
    assert c2.model.name_or_path == "tiny"  # KEEPS_BASE: task 2 trains from the base, not from task 1's model
    assert c2.methods["task_merge"].previous == [str(first.resolve())]

    base = load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.train.seed).state_dict()
    v1, v2 = (load_file(str(r / "task_vector.safetensors")) for r in (first, second))
    assert v1 and set(v1) == set(v2)
    for run, vectors in ((first, [v1]), (second, [v1, v2])):
        want = merged_model(base, vectors, 0.8)
        got = dict(AutoModelForCausalLM.from_pretrained(run / "model").named_parameters())  # tied weights once
        different = [k for k in got if not torch.equal(got[k], want[k])]
        assert not different, f"{run.name}: {different[:3]}"
    summary = json.loads((second / "summary.json").read_text())
    facts = summary["train"]["methods"]["task_merge"]
    assert facts["tasks_merged"] == 2 and facts["previous_runs"] == 1 and facts["merge"] == "ties"
    # the run's "after" scores are the merged model's: scoring the saved model gives them again
    from forgetless.eval.run import evaluate

    again = evaluate(str(second), {"capitals": c2.data.keep["capitals"]}, max_examples=4, generation=False, max_length=48)
    assert again["capitals"]["loss"] == pytest.approx(summary["after"]["capitals"]["loss"], rel=1e-4)


def train(tmp_path, *extra):
    return forgetless.train(forgetless.load_config(None, [
        *FAST_MODEL, f"output.dir={tmp_path}", "output.progress=false", "train.max_steps=2", "train.micro_batch_size=8",
        "data.max_length=48", "eval.max_examples=4", "eval.generation=false", "data.train={path: demo:elements, limit: 16}",
        *extra,
    ]))


def test_one_run_at_density_one_and_scale_one_is_the_plain_fine_tune(tmp_path):
    plain = train(tmp_path / "plain")
    merged = train(tmp_path / "merged", "methods.task_merge.merge=ties", "methods.task_merge.density=1")
    for (name, a), b in zip(plain.model.state_dict().items(), merged.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)  # base + (theta - base): float rounding only
    (name,) = plain.after
    assert merged.after[name]["loss"] == pytest.approx(plain.after[name]["loss"], rel=1e-4)
    trimmed = train(tmp_path / "trimmed", "methods.task_merge.density=0.1")
    facts = trimmed.train["methods"]["task_merge"]
    assert facts["kept_entries"] == pytest.approx(0.1 * facts["changed_entries"], rel=0.05)


def test_refuses_adapters_and_runs_without_a_task_vector(tmp_path):
    with pytest.raises(ConfigError, match="adapters"):
        train(tmp_path / "lora", "methods.task_merge.merge=ties", "methods.lora.r=4")
    with pytest.raises(ConfigError, match="has no task_vector.safetensors"):
        train(tmp_path / "x", f"methods.task_merge.previous=[{tmp_path}]")
    with pytest.raises(ConfigError, match="unknown merge method"):
        train(tmp_path / "y", "methods.task_merge.merge=mean")
