"""forgetless.files: atomic writes and the flat key view of nested mappings."""

from __future__ import annotations

import pytest

from forgetless.files import TMP_PREFIX, flatten, write_atomic, write_text_atomic


def test_write_text_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    assert write_text_atomic(path, "new ü") == path
    assert path.read_text(encoding="utf-8") == "new ü"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_crash)
    assert path.read_text() == "old"
    assert (tmp_path / f"{TMP_PREFIX}config.yaml").read_text() == "half"  # what a resume cleans up


def test_flatten_joins_keys_and_keeps_empty_mappings_and_lists():
    tree = {"train": {"lr": 1e-3, "sched": {"warmup": 5}}, "methods": {}, "tasks": [{"name": "a"}], "seed": None}
    assert flatten(tree) == {"train.lr": 1e-3, "train.sched.warmup": 5, "methods": {}, "tasks": [{"name": "a"}], "seed": None}
    assert flatten({"eval": {"old": {"loss": 2.0}}, "step": 3}, sep="/") == {"eval/old/loss": 2.0, "step": 3}
    assert flatten({}) == {}
