"""Experiment trackers by accelerate's names (output.report_to): every metrics record reaches them.

trackio stands in for any tracker accelerate knows: a fake package (the functions accelerate's
TrackioTracker calls, writing what it receives to a file) is put on the path of a real CLI run,
next to the real TensorBoard.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import fast_overrides

pytestmark = pytest.mark.slow

FAKE_TRACKIO = '''
import json, os

def _write(kind, data):
    with open(os.environ["FAKE_TRACKIO_LOG"], "a") as f:
        f.write(json.dumps({"kind": kind, **data}) + "\\n")

class _Config:
    def update(self, values, allow_val_change=True):
        _write("config", {"values": values})

config = _Config()

class _Run:
    def log(self, values, step=None, **kwargs):
        _write("log", {"step": step, "values": values})
    def finish(self):
        _write("finish", {})

def init(project, **kwargs):
    _write("init", {"project": project})
    return _Run()
'''


def fake_package(root: Path) -> Path:
    (root / "trackio").mkdir(parents=True)
    (root / "trackio" / "__init__.py").write_text(FAKE_TRACKIO)
    meta = root / "trackio-0.0.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: trackio\nVersion: 0.0.0\n")
    return root


def cli(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forgetless", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_any_tracker_by_name_gets_the_metrics(tmp_path, pc_file):
    site = fake_package(tmp_path / "site")
    log = tmp_path / "trackio.jsonl"
    out = tmp_path / "run"
    args = ["train", *fast_overrides(out, pc_file, "output.log_every=1", "output.report_to=[trackio,tensorboard]", "output.project=my-exp")]
    proc = cli(args, PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", FAKE_TRACKIO_LOG=str(log))
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[0] == {"kind": "init", "project": "my-exp"}
    config = next(e["values"] for e in events if e["kind"] == "config")
    assert config["train/lr"] == 1e-3 and config["output/project"] == "my-exp"
    logged = {e["step"]: e["values"] for e in events if e["kind"] == "log" and "loss" in e["values"]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert sorted(logged) == sorted(steps) == [1, 2, 3, 4]
    assert all(logged[s]["loss"] == steps[s]["loss"] for s in steps)
    assert events[-1]["kind"] == "finish"
    assert list((out / "tensorboard" / "my-exp").glob("events.out.tfevents.*"))


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, pc_file):
    proc = cli(["train", *fast_overrides(tmp_path / "run", pc_file, "output.report_to=[mlflow]")])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "forgetless: error: output.report_to: mlflow needs its package, which is not installed: pip install mlflow"
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_refused_with_a_suggestion(tmp_path, pc_file):
    proc = cli(["train", *fast_overrides(tmp_path / "run", pc_file, "output.report_to=[tensorbord]")])
    assert proc.returncode == 2
    assert "output.report_to[0]: unknown tracker 'tensorbord' (did you mean 'tensorboard'?)" in proc.stderr
