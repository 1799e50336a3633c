"""A task sequence killed at any point and resumed ends exactly where an uninterrupted one does."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from forgetless.cli import main
from forgetless.config import load_config
from forgetless.recipes.continual import run_sequence

pytestmark = pytest.mark.slow

SEQ = """
model: {name_or_path: tiny, tiny: {hidden_size: 48, intermediate_size: 96, num_layers: 2}}
tasks:
  - {name: capitals, train: {path: demo:capitals, limit: 12}}
  - {name: elements, train: {path: demo:elements, limit: 12}}
data: {max_length: 40, keep: {general: {path: demo:general, limit: 3}}}
train: {max_steps: 3, micro_batch_size: 4, lr: 0.003, seed: 3}
eval: {max_examples: 6, generation: false}
output: {progress: false, checkpoint_every: 1}
methods: {replay: {size_examples: 4, ratio: 0.25}, ewc: {weight: 10, samples: 4}}
continual: {isolate: false}
"""


def _weights(run_dir):
    model = run_dir / "model"
    return {f.name: load_file(f) for f in sorted(model.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_thread):
    # one thread, like the killed child (OMP_NUM_THREADS=1): bitwise equality is promised for the
    # same thread count (a float32 matmul's reduction split may depend on it)
    root = tmp_path_factory.mktemp("seq")
    (root / "seq.yaml").write_text(SEQ)
    run_sequence(load_config(root / "seq.yaml", [f"output.dir={root / 'out'}"]))
    return root


# step 4: the first step of the second task; eval 3: the second task's final evaluation (every
# task's model is saved, its summary not yet written); eval 2: the first task's final evaluation.
@pytest.mark.parametrize("fault", ["step:4", "eval:2", "eval:3"])
def test_killed_sequence_resumes_to_the_same_results(uninterrupted, tmp_path, fault):
    cfg = uninterrupted / "seq.yaml"
    out = tmp_path / "out"
    env = {**os.environ, "FORGETLESS_FAULT": fault, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "forgetless.cli", "continual", str(cfg), "-o", str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not (out / "results.json").exists() or "replay+ewc" not in json.loads((out / "results.json").read_text())["strategies"]
    assert main(["continual", str(cfg), "-o", str(out), "--resume"]) == 0
    a = json.loads((uninterrupted / "out" / "results.json").read_text())["strategies"]["replay+ewc"]
    b = json.loads((out / "results.json").read_text())["strategies"]["replay+ewc"]
    assert a["matrix"] == b["matrix"] and a["scores"] == b["scores"] and a["general"] == b["general"]
    wa = _weights(uninterrupted / "out" / "replay+ewc" / "task-2-elements")
    wb = _weights(out / "replay+ewc" / "task-2-elements")
    assert wa.keys() == wb.keys() and all((wa[f][k] == wb[f][k]).all() for f in wa for k in wa[f])
    memory = "replay+ewc/task-2-elements/replay_memory.jsonl"
    assert (uninterrupted / "out" / memory).read_text() == (out / memory).read_text()
