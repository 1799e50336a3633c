import json

import pytest
import torch
from safetensors.torch import load_file

from forgetless.config import load_config
from forgetless.errors import ConfigError
from tests.methods.conftest import forgot

pytestmark = pytest.mark.slow


def _weights(run_or_dir):
    return load_file(str(run_or_dir / "model" / "model.safetensors"))


def test_frozen_parameters_are_bit_identical(scenario):
    r = scenario.finetune("freeze_last", "methods.freeze.train_last_n=1", steps=4)
    base = load_file(str(scenario.base_dir / "model.safetensors"))
    after = _weights(r.run_dir)
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed, "the unfrozen block must train"
    assert all(k.startswith("model.layers.2.") for k in changed), changed
    assert r.train["methods"]["freeze"]["trained_blocks"] == [2]
    assert r.train["trainable_params"] < r.train["total_params"] / 2


def test_module_patterns(scenario):
    r = scenario.finetune("freeze_mlp", "methods.freeze.train_modules=[mlp]", "methods.freeze.train_first_n=1", steps=2)
    base = load_file(str(scenario.base_dir / "model.safetensors"))
    after = _weights(r.run_dir)
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed and all(k.startswith("model.layers.0.mlp.") for k in changed), changed


def test_importance_scores_are_saved_and_choose_blocks(scenario):
    r = scenario.finetune("freeze_imp", "methods.freeze.by_importance=1", "methods.freeze.importance_samples=8", steps=2)
    saved = json.loads((r.run_dir / "freeze_importance.json").read_text())
    scores = saved["scores"]
    assert len(scores) == 3 and all(s > 0 for s in scores)
    assert saved["trained_blocks"] == [min(range(3), key=lambda i: scores[i])]


def test_freezing_reduces_forgetting(scenario):
    r = scenario.finetune("freeze_forget", "methods.freeze.train_last_n=1")
    assert forgot(r) < forgot(scenario.plain)


def test_bad_freeze_options():
    with pytest.raises(ConfigError, match="says nothing to freeze"):
        load_config(None, ["data.train=x.jsonl", "methods.freeze=true"])
    with pytest.raises(ConfigError, match="not a list of indices"):
        load_config(None, ["data.train=x.jsonl", "methods.freeze.train_blocks=a-b"])
    with pytest.raises(ConfigError, match="unknown method 'freez'.*did you mean 'freeze'"):
        load_config(None, ["data.train=x.jsonl", "methods.freez.train_last_n=1"])
