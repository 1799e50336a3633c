"""A real task sequence on the tiny model: the accuracy matrix, carried state, baselines, CLI."""

import json
from pathlib import Path

import pytest

from forgetless.cli import main
from forgetless.config import load_config
from forgetless.eval import metrics as M
from forgetless.recipes.continual import run_sequence

pytestmark = pytest.mark.slow

SEQ = """
model: {name_or_path: tiny, tiny: {hidden_size: 64, intermediate_size: 128, num_layers: 2}}
tasks:
  - {name: capitals, train: {path: demo:capitals, limit: 16}}
  - {name: elements, train: {path: demo:elements, limit: 16}}
data: {max_length: 48, keep: {general: {path: demo:general, limit: 4}}}
train: {max_steps: 3, micro_batch_size: 8, lr: 0.003, seed: 1}
eval: {max_examples: 8, generation: false, batch_size: 16}
output: {progress: false}
"""


def _write(tmp_path, text):
    p = tmp_path / "seq.yaml"
    p.write_text(text)
    return p


def test_matrix_rows_are_the_scores_after_each_task_and_state_is_carried(tmp_path, one_thread):
    cfg = load_config(_write(tmp_path, SEQ + "methods: {replay: {size_examples: 6, ratio: 0.25}}\ncontinual: {isolate: false, baselines: [joint]}\n"),
                      [f"output.dir={tmp_path / 'out'}"])
    res = run_sequence(cfg)
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"] == ["capitals", "elements"] and set(data["strategies"]) == {"replay", "joint"}
    s = data["strategies"]["replay"]
    R = s["matrix"]
    assert len(R) == 3 and all(len(row) == 2 for row in R)
    first = json.loads((out / "replay/task-1-capitals/summary.json").read_text())
    second = json.loads((out / "replay/task-2-elements/summary.json").read_text())
    assert R[0] == [first["before"]["capitals"]["token_accuracy"], first["before"]["elements"]["token_accuracy"]]
    assert R[1] == [first["after"]["capitals"]["token_accuracy"], first["after"]["elements"]["token_accuracy"]]
    assert R[2] == [second["after"]["capitals"]["token_accuracy"], second["after"]["elements"]["token_accuracy"]]
    assert s["summary"]["bwt"] == pytest.approx(M.backward_transfer(R))
    assert s["summary"]["final_average"] == pytest.approx(M.final_average(R))
    # task 2 started from task 1's model and replayed task 1's data
    cfg2 = load_config(out / "replay/task-2-elements/config.yaml")
    assert cfg2.model.name_or_path == str(out / "replay/task-1-capitals")
    assert second["train"]["methods"]["replay"]["examples"] == 6
    assert "replay" not in first["train"]["methods"]  # nothing to replay on the first task
    assert s["general"]["general"]["perplexity"][0] == first["before"]["general"]["perplexity"]
    j = data["strategies"]["joint"]
    assert j["matrix"][1] == [None, None] and None not in j["matrix"][2]
    assert j["summary"]["bwt"] is None and j["summary"]["final_average"] == pytest.approx(sum(j["matrix"][2]) / 2)
    assert res.results == data


def test_compare_cli_isolated_processes_and_resume(tmp_path, capsys):
    cfg = _write(tmp_path, SEQ + "continual: {strategies: {plain: {methods: {}}, l2sp: {methods: {l2sp: {weight: 0.1}}}}}\n")
    out = tmp_path / "cmp"
    assert main(["compare", str(cfg), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "plain" in err and "l2sp" in err and "BWT" in err
    data = json.loads((out / "results.json").read_text())
    assert data["kind"] == "compare" and data["strategies"]["plain"]["peak_memory_mb"] > 0
    # A second run refuses to overwrite; --resume keeps every finished task and strategy.
    assert main(["compare", str(cfg), "-o", str(out)]) == 2
    stamp = (out / "l2sp/task-1-capitals/summary.json").stat().st_mtime_ns
    (out / "l2sp/strategy.json").unlink()
    assert main(["compare", str(cfg), "-o", str(out), "--resume"]) == 0
    assert (out / "l2sp/task-1-capitals/summary.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["strategies"]["l2sp"]["matrix"] == data["strategies"]["l2sp"]["matrix"]
    # resuming with another config is refused
    assert main(["compare", str(cfg), "-o", str(out), "--resume", "train.lr=0.1"]) == 2
    assert "train.lr is 0.003" in capsys.readouterr().err  # names the field that changed
