"""Checkpoint files, rotation, failed writes, and what resume refuses."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

import forgetless
from forgetless import checkpoint
from forgetless.cli import main
from forgetless.errors import ConfigError, UserError
from tests.conftest import PC_RECORDS, write_jsonl
from tests.resume.conftest import assert_same_run, killed, metrics, overrides, resume, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    train(out, data, "output.keep_checkpoints=true")
    return out


@pytest.fixture
def interrupted(tmp_path, data) -> Path:
    """A run killed after step 3: its latest checkpoint is step-000002."""
    out = tmp_path / "run"
    assert killed(out, data, "step:3") == 137
    return out


def test_checkpoints_are_safetensors_and_json_and_rotate(reference):
    folder = reference / "checkpoints"
    # every 2 steps of 8, keep_last=2: step-000008 (also the end-of-training checkpoint) and step-000006
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-000006", "step-000008"]
    assert (folder / "latest").read_text().strip() == "step-000008"
    files = sorted(p.name for p in (folder / "step-000008").iterdir())
    assert files == ["methods.json", "methods.safetensors", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng-rank-0.safetensors", "trainer.json"]
    with safe_open(str(folder / "step-000008" / "optimizer.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(re.fullmatch(r"state\.\d+\.(step|exp_avg|exp_avg_sq)", k) for k in keys)
    trainer = json.loads((folder / "step-000008" / "trainer.json").read_text())
    assert trainer["step"] == 8 and trainer["processes"] == 1 and trainer["scheduler"]["last_epoch"] == 8
    assert trainer["metrics_bytes"] == len((reference / "metrics.jsonl").read_bytes()) - len(_last_line(reference))


def _last_line(run: Path) -> bytes:
    return (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)[-1]  # the final evaluation, after the checkpoint


def test_a_finished_run_is_not_trained_again(reference, data, capsys):
    before = (reference / "metrics.jsonl").read_bytes()
    result = resume(reference, data, "output.keep_checkpoints=true")
    assert "is finished" in capsys.readouterr().err
    assert (reference / "metrics.jsonl").read_bytes() == before
    assert result.after == json.loads((reference / "summary.json").read_text())["after"]


def test_resume_of_a_missing_run_starts_one(tmp_path, data, capsys):
    resume(tmp_path / "new", data, "train.max_steps=2")
    assert "no run in" in capsys.readouterr().err
    assert (tmp_path / "new" / "summary.json").is_file()


def test_a_full_disk_during_a_checkpoint_is_one_clear_error(tmp_path, data, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    write = checkpoint._write_tensors
    models = []

    def full_disk(path, tensors, metadata=None):
        if path.name == "model.safetensors":
            models.append(path)
            if len(models) == 3:  # the checkpoint of step 6
                raise OSError(errno.ENOSPC, "No space left on device")
        write(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "_write_tensors", full_disk)
    assert main(["train", *overrides(out, data)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert re.search(r"the disk is full; checkpoint step-000006 was not written and the last good checkpoint is checkpoints/step-000004; "
                     r"free space, then run again with --resume", lines[0]), lines[0]
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-000002", "step-000004"]  # no half-written folder
    assert (folder / "latest").read_text().strip() == "step-000004"

    monkeypatch.setattr(checkpoint, "_write_tensors", write)
    resume(out, data)
    assert_same_run(reference, out)


def test_resume_refuses_another_config(interrupted, data):
    with pytest.raises(ConfigError, match=r"output\.resume: train\.lr is 0\.001 in the run's config\.yaml but 0\.002 now"):
        resume(interrupted, data, "train.lr=2e-3")
    resume(interrupted, data, "output.log_every=2", "output.checkpoint_every=3")  # logging and checkpoint knobs may change


def test_resume_refuses_changed_data_and_another_number_of_processes(tmp_path, interrupted, data):
    trainer = interrupted / "checkpoints" / "step-000002" / "trainer.json"
    saved = json.loads(trainer.read_text())
    trainer.write_text(json.dumps({**saved, "processes": 2}))
    with pytest.raises(UserError, match=r"written by 2 processes, this run has 1; resume with --nproc 2"):
        resume(interrupted, data)
    trainer.write_text(json.dumps(saved))
    write_jsonl(data, PC_RECORDS[:-1] + [{"prompt": "Question 23: what is 23 plus 23?", "completion": " 47"}])
    try:
        with pytest.raises(UserError, match=r"the training data differs from the checkpoint's"):
            resume(interrupted, data)
    finally:
        write_jsonl(data, PC_RECORDS)


def test_resume_and_overwrite_together_are_refused(interrupted, data, capsys):
    assert main(["train", *overrides(interrupted, data), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite exclude each other" in capsys.readouterr().err
    assert (interrupted / "checkpoints" / "step-000002").is_dir()


def test_a_run_without_checkpoints_resumes_from_the_start(tmp_path, data, reference, capsys):
    out = tmp_path / "run"
    assert killed(out, data, "step:5", "output.checkpoint_every=0") == 137
    assert not (out / "checkpoints").exists() and len(metrics(out)) > 1
    resume(out, data, "output.checkpoint_every=0")
    assert "has no checkpoint yet; starting from the beginning" in capsys.readouterr().err
    assert_same_run(reference, out)


def test_latest_is_replaced_atomically(tmp_path):
    pointer = tmp_path / "latest"
    checkpoint.write_text_atomic(pointer, "step-000002\n")
    checkpoint.write_text_atomic(pointer, "step-000004\n")
    assert pointer.read_text() == "step-000004\n" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_config_reference_documents_checkpoints():
    keys = {row[0]: row for row in forgetless.config.reference()}
    for key in ("output.resume", "output.checkpoint_every", "output.keep_last", "output.keep_checkpoints", "train.max_nonfinite_steps"):
        assert keys[key][3], key


def test_a_run_from_before_an_option_existed_resumes(tmp_path):
    """config.yaml written before a newer option existed: the option at its empty default is no change."""
    import yaml

    from forgetless.checkpoint import check_same_config
    from forgetless.config import load_config, save_config

    cfg = load_config(None, ["data.train=demo:capitals"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["plugins"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_same_config(tmp_path / "config.yaml", cfg)
    with pytest.raises(ConfigError, match="train.lr"):
        check_same_config(tmp_path / "config.yaml", load_config(None, ["data.train=demo:capitals", "train.lr=0.5"]))
