"""Packing (``data.packing``) against padding on short-example data: tokens/s and peak memory, in one run.

Each configuration trains the same model on the same examples for the same steps, in a fresh
process, round-robin ``--repeats`` times (the fastest run of each is kept). Unpacked, forgetless
already groups each step's examples by length into micro-batches (forgetless/data/batching.py),
so the padding left is what similar lengths still leave; packed, each step's examples fill rows of
``data.max_length`` tokens and no padding is computed. tokens/s counts real tokens only; the
losses of both must agree (the same examples, loss and gradients).

    python benchmarks/packing.py --model "$(forgetless fetch smollm2)" --data demo:capitals --batch 32 --steps 8 --json benchmarks/packing.json
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


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import forgetless

    with tempfile.TemporaryDirectory() as tmp:
        cfg = forgetless.load_config(None, [
            f"model.name_or_path={args.model}", f"data.train={args.data}", f"data.max_length={args.max_length}",
            f"data.packing={'true' if args.packed else 'false'}", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}",
            "train.lr=1e-5", "train.warmup_steps=0", "eval.before=false", "eval.generation=false", "eval.max_examples=1",
            f"output.dir={tmp}/run", "output.progress=false", "output.log_every=1", "output.save_model=false", "output.checkpoint_every=0",
        ])
        forgetless.train(cfg)
        recs = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r][args.warmup:]
    print(json.dumps({"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps), "losses": [r["loss"] for r in steps],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data", default="demo:capitals")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="examples per step (= micro-batch: rows when packed)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    common = ["--model", args.model, "--data", args.data, "--max-length", str(args.max_length), "--batch", str(args.batch),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    runs: dict[str, list[dict]] = {"padded (grouped by length)": [], "packed": []}
    for _ in range(args.repeats):
        for name, flag in (("padded (grouped by length)", []), ("packed", ["--packed"])):
            out = subprocess.run([sys.executable, __file__, "--child", *flag, *common], capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{name:28s} {runs[name][-1]['tokens_per_s']:10,.0f} tok/s", file=sys.stderr, flush=True)
    best = {n: max(r, key=lambda x: x["tokens_per_s"]) for n, r in runs.items()}
    ref = best["padded (grouped by length)"]
    model = Path(args.model).name if Path(args.model).exists() else args.model
    print(f"Model {model}; data {args.data}; {args.batch} examples per step, max_length {args.max_length}; {args.steps} steps "
          f"(median after {args.warmup}), fastest of {args.repeats}; {args.threads} thread(s).\n")
    print("| configuration | tokens/s | vs padded | peak RSS | last loss |\n| --- | --- | --- | --- | --- |")
    for name, r in best.items():
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | {r['peak_rss_mb']:,.0f} MB | {r['losses'][-1]:.6f} |")
    drift = max(abs(a - b) for a, b in zip(best["packed"]["losses"], ref["losses"]))
    print(f"\nlosses of the two differ by at most {drift:.2e} over the timed steps")
    if args.json:
        args.json.write_text(json.dumps({"args": {**{k: str(v) for k, v in vars(args).items() if k not in ("child", "packed")}, "model": model},
                                         "results": best}, indent=1) + "\n")


if __name__ == "__main__":
    main()
