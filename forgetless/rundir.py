"""The run directory: creating it safely, and the summary every run ends with.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (training and
evaluation records), ``model/`` (weights in safetensors and the tokenizer), ``summary.json`` and
``summary.md``. An existing run directory is never replaced unless the user asks, and a folder
that is not a forgetless run is never emptied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.table import Table

from forgetless.errors import UserError
from forgetless.progress import console

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json")
METRICS = (("loss", "loss", True), ("token_accuracy", "token acc", False), ("exact_match", "exact match", False))


def prepare_run_dir(path: Path, overwrite: bool, is_main: bool = True) -> Path:
    """Create ``path`` (or empty it when ``overwrite`` and it holds a forgetless run)."""
    if not is_main:
        return path
    if path.exists() and not path.is_dir():
        raise UserError(f"output.dir {path}: exists and is a file; choose another output.dir")
    if path.is_dir() and any(path.iterdir()):
        is_run = any((path / m).exists() for m in RUN_MARKERS)
        if not overwrite:
            raise UserError(f"output.dir {path}: already holds files; pass --overwrite (output.overwrite=true) to replace a run, or choose another output.dir")
        if not is_run:
            raise UserError(f"output.dir {path}: holds files that are not a forgetless run; refusing to empty it, choose another output.dir")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output.dir {path}: cannot write there ({e.strerror}); choose a writable output.dir") from None
    return path


def summary_rows(before: dict, after: dict, roles: dict[str, str]) -> list[dict[str, Any]]:
    """One row per eval set: every metric before, after, and the change."""
    rows = []
    for name, role in roles.items():
        row: dict[str, Any] = {"set": name, "role": role}
        for key, _, _ in METRICS:
            b, a = before.get(name, {}).get(key), after.get(name, {}).get(key)
            row[key] = {"before": b, "after": a, "change": (a - b) if a is not None and b is not None else None}
        rows.append(row)
    return rows


def _fmt(metric: dict, lower_is_better: bool) -> str:
    b, a, c = metric["before"], metric["after"], metric["change"]
    if a is None:
        return "-"
    if b is None:
        return f"{a:.3f}"
    good = (c < 0) == lower_is_better if c else None
    colour = "green" if good else ("red" if good is False else "white")
    return f"{b:.3f} -> {a:.3f} [{colour}]({c:+.3f})[/{colour}]"


def print_summary(rows: list[dict], train_info: dict, title: str = "forgetless run") -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("set")
    table.add_column("role")
    for _, label, _ in METRICS:
        table.add_column(label + " (before -> after)")
    for r in rows:
        table.add_row(r["set"], "learn" if r["role"] == "new" else "keep", *(_fmt(r[k], low) for k, _, low in METRICS))
    console.print(table)
    t = train_info
    share = 100.0 * t["trainable_params"] / max(t["total_params"], 1)
    console.print(
        f"{t['steps']} steps, {t['tokens']:,} tokens in {t['train_time_s']:.1f}s ({t['tokens_per_s']:,.0f} tok/s), "
        f"final loss {t['final_loss']:.4f}, trainable parameters {t['trainable_params']:,} of {t['total_params']:,} ({share:.1f}%)"
    )


def summary_markdown(rows: list[dict], train_info: dict) -> str:
    head = "| set | role | " + " | ".join(f"{label} before | {label} after | change" for _, label, _ in METRICS) + " |"
    lines = ["# Run summary", "", head, "|" + " --- |" * (2 + 3 * len(METRICS))]
    num = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        cells = [r["set"], r["role"]]
        for k, _, _ in METRICS:
            cells += [num(r[k]["before"]), num(r[k]["after"]), "" if r[k]["change"] is None else f"{r[k]['change']:+.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Training: " + ", ".join(f"{k} = {v}" for k, v in train_info.items()), ""]
    return "\n".join(lines)


def write_summary(run_dir: Path, before: dict, after: dict, roles: dict, train_info: dict, data_info: dict) -> list[dict]:
    rows = summary_rows(before, after, roles)
    payload = {"sets": rows, "before": before, "after": after, "train": train_info, "data": data_info}
    (run_dir / "summary.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    (run_dir / "summary.md").write_text(summary_markdown(rows, train_info), encoding="utf-8")
    return rows
