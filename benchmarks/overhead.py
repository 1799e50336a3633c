"""Cost of each anti-forgetting method: step time and peak memory, as ratios, in one run.

Every configuration trains the same model on the same data for the same steps, each in a fresh
subprocess (so peak memory is its own). Step time is the median wall time of the optimiser steps
after a warm-up (from metrics.jsonl); memory is the peak resident memory of the process above
what it held after its imports (on a GPU: torch.cuda.max_memory_allocated). Ratios are to plain
full fine-tuning, and for adapter-based methods also to plain LoRA.

    python benchmarks/overhead.py                     # prints a markdown table, writes benchmarks/overhead.json
    python benchmarks/overhead.py --steps 30 --hidden 512 --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> (method overrides, reference for the second ratio, targets: (max time ratio, to what))
CONFIGS: dict[str, tuple[list[str], str]] = {
    "full fine-tuning": ([], "full fine-tuning"),
    "freeze (last half)": (["methods.freeze.train_last_n={half}"], "full fine-tuning"),
    "l2sp": (["methods.l2sp.weight=0.01"], "full fine-tuning"),
    "ewc": (["methods.ewc.weight=10000", "methods.ewc.data=demo:capitals", "methods.ewc.samples=32"], "full fine-tuning"),
    "kl (frozen copy)": (["methods.kl.weight=1"], "full fine-tuning"),
    "mix 25%": (["methods.mix.sources.general={old}", "methods.mix.ratio=0.25"], "full fine-tuning"),
    "replay 25%": (["methods.replay.memory=[{old}]", "methods.replay.size_examples=64", "methods.replay.ratio=0.25"], "full fine-tuning"),
    "lora": (["methods.lora.r=8"], "lora"),
    "lora + ewc": (["methods.lora.r=8", "methods.ewc.weight=10000", "methods.ewc.data=demo:capitals", "methods.ewc.samples=32"], "lora"),
    "lora + l2sp": (["methods.lora.r=8", "methods.l2sp.weight=0.01"], "lora"),
    "lora + kl (adapters off)": (["methods.lora.r=8", "methods.kl.weight=1"], "lora"),
    "bottleneck": (["methods.bottleneck=true"], "lora"),
    "moe_lora (4 experts)": (["methods.moe_lora.num_experts=4", "methods.moe_lora.top_k=2", "methods.moe_lora.r=8"], "lora"),
    "olora": (["methods.olora=true"], "lora"),
    # the methods of 2024-2026 (issue 12)
    "dft": (["methods.dft=true"], "full fine-tuning"),
    "eaft (top 20)": (["methods.eaft=true"], "full fine-tuning"),
    "flow": (["methods.flow=true"], "full fine-tuning"),
    "mofo 10%": (["methods.mofo.fraction=0.1"], "full fine-tuning"),
    "a-gem": (["methods.agem.memory=[{old}]", "methods.agem.size_examples=64"], "full fine-tuning"),
    "gem (1 group)": (["methods.agem.memory=[{old}]", "methods.agem.size_examples=64", "methods.agem.mode=gem"], "full fine-tuning"),
    "osf (30% protected)": (["methods.osf=true"], "full fine-tuning"),
    "lora (pissa init)": (["methods.lora.r=8", "methods.lora.init=pissa", "methods.lora.init_niter=4"], "lora"),
}

TARGETS = {  # from the issue: (config, reference, max ratio)
    "l2sp": 1.10, "ewc": 1.10, "lora + ewc": 1.10, "lora + l2sp": 1.10,
    "kl (frozen copy)": 1.6, "lora + kl (adapters off)": 1.6,
    "mix 25%": 1.05, "replay 25%": 1.05, "moe_lora (4 experts)": 1.5,
}


def child(args: argparse.Namespace) -> None:
    """Run one configuration and print its measurements as JSON."""
    import torch

    import forgetless

    base_rss = _rss_bytes()
    overrides = json.loads(args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = forgetless.load_config(None, [
            "model.name_or_path=tiny",
            f"model.tiny.hidden_size={args.hidden}", f"model.tiny.intermediate_size={args.hidden * 8 // 3}",
            f"model.tiny.num_layers={args.layers}", "model.tiny.num_heads=8", "model.tiny.num_kv_heads=4",
            f"data.train={args.data}", f"output.dir={tmp}/run", "output.progress=false", "output.log_every=1",
            "output.save_model=false", "eval.before=false", "eval.generation=false", "eval.max_examples=8",
            f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}", "train.lr=1e-4", f"data.max_length={args.max_length}",
            *json.loads(args.extra or "[]"), *overrides,
        ])
        result = forgetless.train(cfg)
        recs = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in recs if "loss" in r]
    step_times = [b - a for a, b in zip(elapsed, elapsed[1:])][args.warmup:]
    tokens = result.train["tokens"] / result.train["steps"]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _peak_rss_bytes() - base_rss
    print(json.dumps({
        "step_s": statistics.median(step_times),
        "tokens_per_step": tokens,
        "peak_bytes": peak,
        "trainable_params": result.train["trainable_params"],
        "total_params": result.train["total_params"],
    }))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--data", default="demo:elements", help="training data (default demo:elements: short prompts)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--extra", nargs="*", default=None,
                   help="overrides for every configuration, e.g. train.mixed_precision=bf16 (the GPU check)")
    p.add_argument("--old-data", default="demo:capitals",
                   help="old / general data that mix and replay draw from (default demo:capitals)")
    p.add_argument("--only", nargs="*", help="names of configurations to run")
    p.add_argument("--repeats", type=int, default=1, help="runs of each configuration (round-robin); the fastest is kept")
    p.add_argument("--json", help="where to write the results (default benchmarks/overhead.json)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    p.add_argument("--extra-json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.extra = args.extra_json
        child(args)
        return
    names = [n for n in CONFIGS if not args.only or n in args.only]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    # Configurations are run round-robin, `--repeats` times each, and the fastest run of each is
    # kept: a background load then slows every configuration alike instead of whichever ran during it.
    for _ in range(args.repeats):
        for name in names:
            overrides = [o.replace("{half}", str(args.layers // 2)).replace("{old}", args.old_data) for o in CONFIGS[name][0]]
            cmd = [sys.executable, __file__, "--child", "--overrides", json.dumps(overrides), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--hidden", str(args.hidden), "--layers", str(args.layers), "--batch", str(args.batch),
                   "--data", args.data, "--max-length", str(args.max_length), "--extra-json", json.dumps(args.extra or [])]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{name}: {runs[name][-1]['step_s'] * 1000:.1f} ms/step", file=sys.stderr)
    results = {n: min(r, key=lambda x: x["step_s"]) for n, r in runs.items() if r}
    Path(args.json or Path(__file__).with_name("overhead.json")).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(markdown(results, args))


def markdown(results: dict, args) -> str:
    full = results.get("full fine-tuning")
    lines = [
        f"Model: tiny Llama, hidden {args.hidden}, {args.layers} layers; data {args.data} (old data {getattr(args, 'old_data', 'demo:capitals')}), max length {args.max_length}, "
        f"batch {args.batch}; {args.steps} steps "
        f"(median step time after {args.warmup} warm-up steps; fastest of {getattr(args, 'repeats', 1)} round-robin runs).",
        "",
        "| method | step time vs full FT | vs its base (plain LoRA for adapters) | target | per token vs base | peak memory vs full FT | trainable params |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        ref = results.get(CONFIGS[name][1])
        vs_full = r["step_s"] / full["step_s"] if full else float("nan")
        vs_ref = r["step_s"] / ref["step_s"] if ref else float("nan")
        per_token = (r["step_s"] / r["tokens_per_step"]) / (ref["step_s"] / ref["tokens_per_step"]) if ref else float("nan")
        mem = r["peak_bytes"] / full["peak_bytes"] if full else float("nan")
        target = f"<= {TARGETS[name]:.2f}x" if name in TARGETS else ""
        lines.append(f"| {name} | {vs_full:.2f}x | {vs_ref:.2f}x | {target} | {per_token:.2f}x | {mem:.2f}x | {r['trainable_params']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
