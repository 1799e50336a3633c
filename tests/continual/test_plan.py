"""How a task sequence becomes runs: what each task trains on, scores, and carries over."""

from pathlib import Path

import pytest

from forgetless.config import load_config, strategy_configs
from forgetless.errors import ConfigError
from forgetless.recipes.continual import joint_run_config, plan, task_run_config

SEQ = """
model: {name_or_path: tiny}
tasks:
  - {name: capitals, train: {path: demo:capitals, limit: 20}, max_steps: 3}
  - {name: elements, train: {path: demo:elements, limit: 30}, eval: {path: demo:elements, limit: 10}}
  - {name: currencies, train: {path: demo:currencies, limit: 40}, epochs: 2}
data: {keep: {general: demo:general}}
train: {max_steps: 5, micro_batch_size: 4}
methods: {replay: {size_examples: 8}, ewc: {weight: 10}}
"""


def _cfg(tmp_path, text=SEQ, overrides=()):
    p = tmp_path / "seq.yaml"
    p.write_text(text)
    return load_config(p, list(overrides))


def test_each_task_trains_on_its_data_and_scores_every_task_and_probe(tmp_path):
    cfg = _cfg(tmp_path)
    c1, _ = task_run_config(cfg, 1, tmp_path / "s", None)
    assert [s.path for s in c1.data.train] == ["demo:capitals"]
    assert list(c1.data.eval) == ["capitals"] and set(c1.data.keep) == {"general", "elements", "currencies"}
    assert c1.data.keep["elements"].limit == 10  # a task's own eval data when given
    assert c1.data.keep["currencies"].limit == 40  # else its training data
    assert c1.train.max_steps == 3 and c1.eval.before and c1.model.name_or_path == "tiny"
    c3, _ = task_run_config(cfg, 3, tmp_path / "s", tmp_path / "s" / "task-2-elements")
    assert c3.train.max_steps is None and c3.train.epochs == 2  # the task's own budget
    assert not c3.eval.before  # row t-1 already holds these scores
    assert c3.model.name_or_path == str(tmp_path / "s" / "task-2-elements")
    assert Path(c3.output.dir).name == "task-3-currencies"


def test_replay_memory_grows_and_online_ewc_chains(tmp_path):
    cfg = _cfg(tmp_path)
    c1, notes = task_run_config(cfg, 1, tmp_path, None)
    assert "replay" not in c1.methods and any("replay" in n for n in notes)  # nothing to replay yet
    assert "ewc" not in c1.methods  # no earlier task to protect
    prev = tmp_path / "task-1-capitals"
    prev.mkdir()
    c2, _ = task_run_config(cfg, 2, tmp_path, prev)
    assert [s.path for s in c2.methods["replay"].memory] == ["demo:capitals"] and c2.methods["replay"].previous is None
    assert c2.methods["ewc"].data.path == "demo:capitals" and c2.methods["ewc"].previous_state is None
    (prev / "replay_memory.jsonl").write_text("")
    (prev / "ewc_state.safetensors").write_bytes(b"")
    c2b, _ = task_run_config(cfg, 2, tmp_path, prev)
    assert c2b.methods["replay"].previous.path == str(prev / "replay_memory.jsonl")
    assert [s.path for s in c2b.methods["replay"].memory] == ["demo:capitals"]  # the newest task joins the stream
    assert c2b.methods["ewc"].previous_state == str(prev)


def test_experts_load_the_previous_run_onto_the_base_model(tmp_path):
    cfg = _cfg(tmp_path, overrides=["methods={olora: {}}"])
    c2, _ = task_run_config(cfg, 2, tmp_path, tmp_path / "task-1-capitals")
    assert c2.model.name_or_path == "tiny" and c2.methods["olora"].previous == [str(tmp_path / "task-1-capitals")]
    cfg = _cfg(tmp_path, overrides=["methods={expansion: {}}"])
    c2, _ = task_run_config(cfg, 2, tmp_path, tmp_path / "task-1-capitals")
    assert c2.model.name_or_path == "tiny" and c2.methods["expansion"].previous == str(tmp_path / "task-1-capitals")


def test_joint_baseline_gets_all_data_and_the_summed_budget(tmp_path):
    cfg = _cfg(tmp_path)
    j = joint_run_config(cfg, tmp_path)
    assert [s.path for s in j.data.train] == ["demo:capitals", "demo:elements", "demo:currencies"]
    assert list(j.data.eval) == ["capitals", "elements", "currencies"] and not j.methods
    assert j.train.max_steps == 3 + 5 + 20  # 3 steps, train.max_steps, 2 epochs x 40 records / batch 4


def test_strategies_merge_sections_and_replace_methods(tmp_path):
    cfg = _cfg(tmp_path, SEQ + "continual: {strategies: {plain: {methods: {}}, fast: {train: {lr: 0.1}}}, baselines: [joint]}\n")
    s = strategy_configs(cfg)
    assert not s["plain"].methods and s["plain"].train.micro_batch_size == 4
    assert set(s["fast"].methods) == {"replay", "ewc"} and s["fast"].train.lr == 0.1
    assert [(n, b) for n, _, b in plan(cfg, compare=True)] == [("plain", None), ("fast", None), ("joint", "joint")]
    assert [(n, b) for n, _, b in plan(cfg, compare=False)] == [("replay+ewc", None), ("joint", "joint")]


@pytest.mark.parametrize("extra, message", [
    ("continual: {strategies: {bad: {methods: {ewc: {weight: -1}}}}}\n", "seq.yaml:"),
    ("continual: {strategies: {bad: {tarin: {lr: 1}}}}\n", "not 'tarin'"),
    ("continual: {strategies: {bad: {methods: {lroa: {}}}}}\n", "did you mean 'lora'"),
])
def test_bad_strategies_name_the_line(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, SEQ + extra)


def test_sequence_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="used twice"):
        _cfg(tmp_path, SEQ.replace("name: elements", "name: capitals"))
    with pytest.raises(ConfigError, match="data.train and tasks"):
        _cfg(tmp_path, overrides=["data.train=demo:capitals"])
    with pytest.raises(ConfigError, match="strategies is empty"):
        plan(_cfg(tmp_path), compare=True)
    with pytest.raises(ConfigError, match="need a task sequence"):
        load_config(None, ["data.train=demo:capitals", "continual.baselines=[joint]"])


def test_carried_run_directories_are_absolute(tmp_path, monkeypatch):
    """A task's config.yaml names the previous run; relative paths in it would be read relative to the file."""
    from forgetless.config import load_config
    from forgetless.recipes.continual import task_run_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["tasks=[{name: a, train: demo:capitals}, {name: b, train: demo:elements}]", "methods.expansion=true"])
    c2, _ = task_run_config(cfg, 2, Path("out"), Path("out/task-1-a"))
    assert c2.methods["expansion"].previous == str(tmp_path / "out" / "task-1-a")
