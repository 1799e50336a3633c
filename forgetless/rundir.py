"""The run directory: creating it safely, and the summary every run ends with.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (training and
evaluation records), ``model/`` (weights in safetensors and the tokenizer), ``summary.json`` and
``summary.md``, and ``versions.json`` (Python, torch, transformers, ... and forgetless's git commit;
written when the run starts, and repeated in ``summary.json``). An existing run directory is never replaced unless the user asks, and a folder
that is not a forgetless run is never emptied.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from rich.table import Table

from forgetless.config import redact_secrets
from forgetless.errors import UserError
from forgetless.files import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, SUMMARY_MD, VERSIONS_FILE, write_text_atomic
from forgetless.progress import console

RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, VERSIONS_FILE)  # versions.json: written first
METRICS = (("loss", "loss", True), ("token_accuracy", "token acc", False), ("exact_match", "exact match", False))


def check_run_dir(path: Path, overwrite: bool, resume: bool = False) -> None:
    """The UserError :func:`prepare_run_dir` would raise, without touching anything: callers check
    early, before minutes of loading, and learn of an occupied or unwritable output.dir at once."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output.dir {path}: exists and is a file; choose another output.dir")
    if path.is_dir() and any(path.iterdir()):
        is_run = any((path / m).exists() for m in RUN_MARKERS)
        if resume and not is_run:
            raise UserError(f"output.dir {path}: holds files that are not a forgetless run, so there is nothing to resume; choose another output.dir")
        if resume:
            return
        if not overwrite:
            raise UserError(f"output.dir {path}: already holds files; pass --overwrite (output.overwrite=true) to replace a run, --resume to continue it, or choose another output.dir")
        if not is_run:
            raise UserError(f"output.dir {path}: holds files that are not a forgetless run; refusing to empty it, choose another output.dir")
        return
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output.dir {path}: cannot write there ({existing} is not a writable folder); choose a writable output.dir")


def prepare_run_dir(path: Path, overwrite: bool, is_main: bool = True, resume: bool = False) -> Path:
    """Create ``path`` (or empty it when ``overwrite`` and it holds a forgetless run). With ``resume``
    a run already there is kept as it is (resume takes precedence over overwrite)."""
    if not is_main:
        return path
    check_run_dir(path, overwrite, resume)
    if path.is_dir() and any(path.iterdir()):
        if resume:
            return path
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output.dir {path}: cannot write there ({e.strerror}); choose a writable output.dir") from None
    (path / VERSIONS_FILE).write_text(json.dumps(environment_versions(), indent=2) + "\n", encoding="utf-8")
    return path


@functools.lru_cache(maxsize=None)
def environment_versions() -> dict[str, Any]:
    """What a run ran on: Python, the libraries that shape its numbers, and forgetless itself
    (with its git commit when it runs from a checkout)."""
    import torch

    import forgetless

    versions: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    versions["forgetless"] = forgetless.__version__
    versions.update(_git_state(Path(forgetless.__file__).resolve().parent.parent))
    versions["cuda"] = torch.version.cuda
    return versions


def _git_state(root: Path) -> dict[str, Any]:
    """The commit of a forgetless checkout and whether it has local changes; nothing when forgetless
    is installed (only the checkout's own top folder counts, never a repository around it)."""
    if not (root / ".git").exists():
        return {}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    if commit.returncode != 0:
        return {}
    return {"forgetless_git_commit": commit.stdout.strip(), "forgetless_git_dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


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


def print_summary(rows: list[dict], train_info: dict, title: str = "forgetless run", flips: Optional[dict] = None) -> None:
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
    if line := flips_line(flips or {}):
        console.print(line + " (flips.json)", highlight=False)


def flips_line(flips: dict[str, dict]) -> Optional[str]:
    """'flipped answers ...: capitals 12 lost / 3 gained of 77, ...' from each set's flip counts."""
    if not flips:
        return None
    parts = [f"{name} {f['lost']} lost / {f['gained']} gained of {f['judged']}" for name, f in flips.items()]
    return "flipped answers (right before -> wrong after / the reverse): " + ", ".join(parts)


def summary_markdown(rows: list[dict], train_info: dict, flips: Optional[dict] = None) -> str:
    head = "| set | role | " + " | ".join(f"{label} before | {label} after | change" for _, label, _ in METRICS) + " |"
    lines = ["# Run summary", "", head, "|" + " --- |" * (2 + 3 * len(METRICS))]
    num = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        cells = [r["set"], r["role"]]
        for k, _, _ in METRICS:
            cells += [num(r[k]["before"]), num(r[k]["after"]), "" if r[k]["change"] is None else f"{r[k]['change']:+.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if flips:
        lines += ["", "Flipped answers (flips.json lists them):", "", "| set | judged | right before | right after | lost | gained |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {n} | {f['judged']} | {f['right_before']} | {f['right_after']} | {f['lost']} | {f['gained']} |" for n, f in flips.items()]
    lines += ["", "Training: " + ", ".join(f"{k} = {v}" for k, v in train_info.items()), ""]
    return "\n".join(lines)


def write_summary(run_dir: Path, before: dict, after: dict, roles: dict, train_info: dict, data_info: dict,
                  flips: Optional[dict] = None) -> list[dict]:
    """summary.md and summary.json; ``flips``: per set, the counts of forgetless.eval.flips.counts."""
    rows = summary_rows(before, after, roles)
    payload = redact_secrets({"sets": rows, "before": before, "after": after, "train": train_info, "data": data_info})
    if flips:
        payload["flips"] = flips
    payload["versions"] = environment_versions()
    (run_dir / SUMMARY_MD).write_text(summary_markdown(rows, train_info, flips), encoding="utf-8")
    # summary.json marks a finished run (resume and task sequences rely on it): written last, atomically
    write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(payload, indent=2))
    return rows
