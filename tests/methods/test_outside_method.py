"""A method written outside the package (here, in this test file) runs end to end: a training run,
a two-task sequence that carries its state from task to task, an exact resume, and the report.
No file of the package names it: registering it is all it takes (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

import forgetless
from forgetless.config import option
from forgetless.methods.base import Context, Method, TaskLink
from forgetless.registry import REGULARIZE, STARTS_AT_BASE, register, unregister
from tests.conftest import FAST_MODEL, PC_RECORDS, write_jsonl
from tests.resume.conftest import assert_same_run, killed, resume, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

STATE_FILE = "anchor_tasks.json"
CHILD = "FORGETLESS_TEST_REGISTER_PULL"


@dataclass
class PullConfig:
    """A pull toward the weights each run starts from, counting the tasks it has protected."""

    weight: float = option(0.5, "Multiplier of the squared distance to the start weights.")
    previous: Optional[str] = option(None, "The run directory of the previous task (set by next_task).")


class Pull(Method):
    name = "pull"

    def __init__(self, cfg: PullConfig):
        self.cfg = cfg
        self.params: list[torch.nn.Parameter] = []
        self.anchors: list[torch.Tensor] = []
        self.tasks = 0

    def before_train(self, model, ctx: Context) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchors = [p.detach().clone() for p in self.params]
        earlier = 0
        if self.cfg.previous is not None:
            earlier = json.loads((Path(self.cfg.previous) / STATE_FILE).read_text())["tasks"]
        self.tasks = earlier + 1

    def step_terms(self, model) -> dict[str, torch.Tensor]:
        return {"pull": self.cfg.weight * sum(((p - a) ** 2).sum() for p, a in zip(self.params, self.anchors))}

    def after_train(self, model, ctx: Context) -> None:
        ctx.save_artifact(STATE_FILE, lambda path: path.write_text(json.dumps({"tasks": self.tasks})))

    def state_dict(self) -> dict:
        return {"tasks": self.tasks, **{f"anchor.{i}": a for i, a in enumerate(self.anchors)}}

    def load_state_dict(self, state: dict) -> None:
        self.tasks = int(state["tasks"])
        self.anchors = [state[f"anchor.{i}"] for i in range(len(self.params))]

    def describe(self) -> dict:
        return {"tasks": self.tasks, "weight": self.cfg.weight}

    @classmethod
    def next_task(cls, options: PullConfig, link: TaskLink) -> PullConfig:
        if link.previous is not None:
            options.previous = str(link.previous)
        return options


def _register() -> None:
    register("pull", PullConfig, Pull, "Test: a pull toward the start weights.", phase=REGULARIZE, provides={STARTS_AT_BASE: ""})


if os.environ.get(CHILD):
    # An isolated strategy runs in a child process, which imports the module that registered each
    # outside method (forgetless passes it --import); a user's module registers at import, this
    # test module only when the test that starts such a child asks it to.
    _register()


@pytest.fixture(autouse=True)
def pull():
    _register()
    yield
    unregister("pull")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pc.jsonl", PC_RECORDS)


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register("pull", PullConfig, Pull, "again")
    with pytest.raises(ValueError, match="prefix 'lora_x' clashes with 'lora'"):
        register("other", PullConfig, Pull, "clash", prefix="lora_x")


def test_trains_and_resumes_exactly(tmp_path, data):
    out = tmp_path / "run"
    result = train(out, data, "methods.pull.weight=0.5")
    assert result.train["methods"]["pull"] == {"tasks": 1, "weight": 0.5}
    assert json.loads((out / STATE_FILE).read_text()) == {"tasks": 1}
    terms = [json.loads(line)["terms"]["pull"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"terms"' in line]
    assert terms[0] == 0.0 and terms[-1] > 0  # zero at the start, then a real pull

    broken = tmp_path / "broken"
    assert killed(broken, data, "step:5", "methods.pull.weight=0.5") == 137
    resume(broken, data, "methods.pull.weight=0.5")
    assert_same_run(out, broken)


def test_a_sequence_carries_its_state_and_reports(tmp_path, data, monkeypatch):
    monkeypatch.setenv(CHILD, "1")  # each strategy runs in a child process (continual.isolate)
    config = {
        "model": {"name_or_path": "tiny", "tiny": {k.split(".")[-1]: int(v) for k, v in (o.split("=") for o in FAST_MODEL) if k.startswith("model.tiny.")}},
        "tasks": [{"name": "first", "train": str(data), "max_steps": 2}, {"name": "second", "train": str(data), "max_steps": 2}],
        "data": {"max_length": 64},
        "train": {"micro_batch_size": 4, "lr": 1e-3},
        "eval": {"max_examples": 4, "generation": False},
        "output": {"dir": str(tmp_path / "seq"), "progress": False},
        "methods": {"pull": {"weight": 0.25}},
    }
    path = tmp_path / "sequence.yaml"
    path.write_text(yaml.safe_dump(config))
    seq = forgetless.run_sequence(forgetless.load_config(str(path)))
    (name,) = seq.results["strategies"]
    runs = sorted((tmp_path / "seq" / name).glob("task-*"))
    second = json.loads((runs[1] / "summary.json").read_text())
    assert second["train"]["methods"]["pull"]["tasks"] == 2  # task 2 read task 1's file through next_task
    saved = yaml.safe_load((runs[1] / "config.yaml").read_text())
    assert Path(saved["methods"]["pull"]["previous"]) == runs[0]
    assert (tmp_path / "seq" / "report.html").is_file() and "pull" in (tmp_path / "seq" / "results.json").read_text()


PLUGIN = '''"""A user's own method, in a file of its own: the config's plugins: list imports it."""
from dataclasses import dataclass

from forgetless.config import option
from forgetless.methods.base import Method
from forgetless.registry import register


@dataclass
class ShrinkConfig:
    """A pull of the weights toward zero."""

    weight: float = option(0.001, "Multiplier of the sum of squared weights.")


class Shrink(Method):
    name = "shrink"

    def __init__(self, cfg):
        self.cfg = cfg

    def before_train(self, model, ctx):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step_terms(self, model):
        return {"shrink": self.cfg.weight * sum((p ** 2).sum() for p in self.params)}

    def describe(self):
        return {"weight": self.cfg.weight}


register("shrink", ShrinkConfig, Shrink, "A user's method: pull the weights toward zero.")
'''


@pytest.fixture
def plugin_file(tmp_path):
    (tmp_path / "my_methods.py").write_text(PLUGIN)
    yield tmp_path / "my_methods.py"
    unregister("shrink")
    for name in [n for n in sys.modules if n.startswith("forgetless_plugin_")]:
        del sys.modules[name]


def test_the_cli_runs_a_method_from_a_plugin_file(tmp_path, data, plugin_file, capsys):
    from forgetless.cli import main

    tiny = {k.split(".")[-1]: int(v) for k, v in (o.split("=") for o in FAST_MODEL) if k.startswith("model.tiny.")}
    common = {"model": {"name_or_path": "tiny", "tiny": tiny}, "data": {"max_length": 64}, "train": {"micro_batch_size": 4},
              "eval": {"max_examples": 4, "generation": False}, "output": {"progress": False}}
    run = {**common, "plugins": ["my_methods.py"], "data": {"max_length": 64, "train": str(data)}, "train": {"micro_batch_size": 4, "max_steps": 2},
           "output": {"progress": False, "dir": str(tmp_path / "run")}, "methods": {"shrink": {"weight": 0.002}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train"]["methods"]["shrink"] == {"weight": 0.002}

    # a comparison runs each strategy in a child process, which imports the plugin through the config
    seq = {**common, "plugins": ["my_methods.py"], "output": {"progress": False, "dir": str(tmp_path / "seq")},
           "tasks": [{"name": "only", "train": str(data), "max_steps": 2}],
           "continual": {"strategies": {"plain": {"methods": {}}, "shrink": {"methods": {"shrink": {}}}}}}
    (tmp_path / "seq.yaml").write_text(yaml.safe_dump(seq))
    assert main(["compare", str(tmp_path / "seq.yaml")]) == 0
    results = json.loads((tmp_path / "seq" / "results.json").read_text())
    assert set(results["strategies"]) == {"plain", "shrink"}

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**run, "plugins": ["missing.py"]}))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plugins[0]: plugin file missing.py not found" in err and "bad.yaml" in err


SCRIPT = '''"""A user's script: a method registered in __main__, then a comparison whose strategies run in child processes."""
import sys
from dataclasses import dataclass

import forgetless
from forgetless.config import option
from forgetless.methods.base import Method
from forgetless.registry import register


@dataclass
class NoopConfig:
    """Nothing at all."""

    weight: float = option(0.0, "Unused.")


class Noop(Method):
    name = "noop"

    def __init__(self, cfg):
        self.cfg = cfg

    def describe(self):
        return {"registered_in": __name__}


register("noop", NoopConfig, Noop, "A method registered in a user's script.")

if __name__ == "__main__":
    seq = forgetless.run_sequence(forgetless.load_config(sys.argv[1]), compare=True)
    print(sorted(seq.results["strategies"]))
'''


def test_a_method_registered_in_a_script_reaches_the_child_processes(tmp_path, data):
    import subprocess

    tiny = {k.split(".")[-1]: int(v) for k, v in (o.split("=") for o in FAST_MODEL) if k.startswith("model.tiny.")}
    seq = {"model": {"name_or_path": "tiny", "tiny": tiny}, "data": {"max_length": 64}, "train": {"micro_batch_size": 4},
           "eval": {"max_examples": 4, "generation": False}, "output": {"progress": False, "dir": str(tmp_path / "seq")},
           "tasks": [{"name": "only", "train": str(data), "max_steps": 1}],
           "continual": {"strategies": {"noop": {"methods": {"noop": {}}}}}}
    (tmp_path / "seq.yaml").write_text(yaml.safe_dump(seq))
    (tmp_path / "script.py").write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path / "seq.yaml")], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "['noop']" in done.stdout
    summary = json.loads(next((tmp_path / "seq" / "noop").glob("task-1-*/summary.json")).read_text())
    assert summary["train"]["methods"]["noop"]["registered_in"].startswith("forgetless_plugin_")  # the child imported the script as a file


def test_plugins_from_an_override_are_saved_resolved(tmp_path, plugin_file, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "run.yaml").write_text(yaml.safe_dump({"data": {"train": "demo:capitals"}, "methods": {"shrink": {}}}))
    monkeypatch.chdir(tmp_path)
    cfg = forgetless.load_config(str(tmp_path / "sub" / "run.yaml"), ["plugins=[my_methods.py]"])
    assert cfg.plugins == [str(plugin_file.resolve())]
    again = forgetless.config.config_from_dict(forgetless.config.to_dict(cfg))  # as a child process rebuilds it
    assert "shrink" in again.methods
