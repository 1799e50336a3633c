"""The demo's second part: a sequence of three tasks, several strategies, one report.

A tiny Llama learns capitals, then element symbols, then currencies (48 facts each, shipped
data), with plain sequential fine-tuning, with each of a few anti-forgetting strategies, and the
joint baseline that sees all three tasks at once. ``forgetless compare`` does the work; the
config it runs is written to ``OUT/continual/sequence.yaml`` so the user can rerun or edit it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from forgetless.config import load_config
from forgetless.files import SEQUENCE_CONFIG
from forgetless.progress import console

RUNS_DIR = "runs"  # OUT/continual/runs: the sequence's output folder

SEQUENCE = {
    "model": {"name_or_path": "tiny", "tiny": {"hidden_size": 256, "intermediate_size": 682, "num_layers": 2}},
    "tasks": [
        {"name": "capitals", "train": {"path": "demo:capitals", "limit": 48}},
        {"name": "elements", "train": {"path": "demo:elements", "limit": 48}},
        {"name": "currencies", "train": {"path": "demo:currencies", "limit": 48}},
    ],
    # No general probe here: the demo's model starts from random weights, so it has no general
    # ability to keep (with a pretrained model, add data.keep.general: a text file).
    "data": {"max_length": 48},
    "train": {"epochs": 30, "micro_batch_size": 24, "lr": 0.002, "seed": 0, "warmup_ratio": 0.05},
    "eval": {"max_examples": 48, "batch_size": 48, "max_new_tokens": 8},
    "output": {"progress": False, "log_every": 5},
    "continual": {
        # one process: the demo's strategies are small, and process start-up would dominate
        "isolate": False,
        "baselines": ["sequential", "joint"],
        "strategies": {
            "replay": {"methods": {"replay": {"size_examples": 36, "ratio": 0.3}}},
            "ewc": {"methods": {"ewc": {"weight": 100000, "samples": 48}}},
        },
    },
}


def run_continual_demo(out: Path, quick: bool = False) -> dict:
    """Run the sequence into ``out`` (a fresh folder); ``quick`` shrinks it to a smoke test."""
    from forgetless.recipes.continual import run_sequence
    from forgetless.report.console import print_sequence_table

    spec = yaml.safe_load(yaml.safe_dump(SEQUENCE))
    if quick:
        spec["train"]["epochs"] = 2
        spec["continual"]["strategies"] = {"replay": spec["continual"]["strategies"]["replay"]}
        for task in spec["tasks"]:
            task["train"]["limit"] = 24
    out.mkdir(parents=True, exist_ok=True)
    path = out / SEQUENCE_CONFIG
    header = "# The demo's task sequence; rerun it with: forgetless compare sequence.yaml -o OUT --overwrite\n"
    path.write_text(header + yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    cfg = load_config(path, [f"output.dir={out / RUNS_DIR}", "output.overwrite=true"])
    console.rule("[bold]4. a sequence of tasks: capitals -> elements -> currencies")
    result = run_sequence(cfg, compare=True)
    print_sequence_table(result.results)
    return {"results": result.results, "files": {k: str(v) for k, v in result.files.items()}}
