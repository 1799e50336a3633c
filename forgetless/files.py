"""The files forgetless writes: their names, and how they are written.

This module sits at the bottom of the package's layers (it imports only the standard library),
so every layer names a run directory's files with the same constants and writes them the same
way: atomically, so that a reader, a resume or a report never sees half a file.

A run directory (``forgetless train``)::

    config.yaml      the resolved config (secrets redacted)
    versions.json    what the run ran on (written first: it marks the folder as a run)
    metrics.jsonl    training and evaluation records, one JSON object a line
    checkpoints/     resumable checkpoints (see forgetless.checkpoint)
    model/           weights (safetensors) and tokenizer
    summary.json     before/after scores and training facts (written last: the run finished)
    summary.md       the same as a markdown table
    report.html      ``forgetless report RUN_DIR``

A task sequence (``forgetless continual`` / ``compare``) writes ``config.yaml``, one folder per
strategy (``strategy.json``, ``strategy.yaml`` and a run directory per task), ``results.json``
and the report (``report.html``, ``results.csv``, ``summary.md``). The demo writes
``results.json``, ``report.md`` and ``report.html``, and its task sequence ``sequence.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

# A run directory
CONFIG_FILE = "config.yaml"
VERSIONS_FILE = "versions.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"
SUMMARY_MD = "summary.md"
REPORT_HTML = "report.html"
EVAL_FILE = "eval.json"  # forgetless eval on a run directory

# A task sequence's output folder (and the demo's)
RESULTS_FILE = "results.json"
RESULTS_CSV = "results.csv"
STRATEGY_FILE = "strategy.json"
STRATEGY_CONFIG = "strategy.yaml"
REPORT_MD = "report.md"
SEQUENCE_CONFIG = "sequence.yaml"

# forgetless interpolate
INTERPOLATED_DIR = "interpolated"
INTERPOLATION_FILE = "interpolation.json"
FLIPS_FILE = "flips.json"  # the answers that flipped between before and after training
TUNE_FILE = "tune.json"  # forgetless tune: every trial, the front, the chosen one
TUNE_HTML = "tune.html"  # its report
BEST_FILE = "best.yaml"  # the chosen trial's config
MERGE_FILE = "merge.json"  # forgetless merge of task vectors: what was merged, how
INTERPOLATION_CSV = "interpolation.csv"

# A file being written is named TMP_PREFIX + its name until it is complete.
TMP_PREFIX = ".tmp-"


def fsync_path(path: Path) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Replace ``path`` with what ``write(tmp)`` writes, in one step; return ``path``.

    ``write`` writes a complete file at the path it is given (``TMP_PREFIX`` + the name, next to
    ``path``); it is flushed to disk and renamed over ``path``. A reader, or a run killed at any
    moment, sees the old file or the new one, never half of one.
    """
    path = Path(path)
    tmp = path.with_name(TMP_PREFIX + path.name)
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    if os.name == "posix":  # the rename itself reaches the disk with the folder's entries
        fsync_path(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) in one step: see :func:`write_atomic`."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def flatten(tree: Mapping, sep: str = ".") -> dict[str, Any]:
    """A nested mapping as one level, keys joined by ``sep``: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``.

    An empty mapping stays a value (``{"a": {}}`` -> ``{"a": {}}``), so "no entries" is told
    apart from "no such key"; lists and other values are kept as they are.
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update({f"{key}{sep}{k}": v for k, v in flatten(value, sep).items()})
        else:
            out[str(key)] = value
    return out
