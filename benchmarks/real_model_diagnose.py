"""Spurious or real forgetting on the real model (issue 13, item 6): SmolLM2-135M-Instruct.

Plain full fine-tuning on the real-model task (benchmarks/real_model.py: Esperanto numbers, the
base's capitals, own answers and general prose as keep sets, test split, no lm-eval task), its
final weights saved; then ``forgetless diagnose`` on the run: k examples of each keep set, a few
steps of plain fine-tuning on them, and the share of each set's loss that comes back on its
*other* examples (arXiv 2501.13453). Also the run's flipped answers per keep set.

    forgetless fetch smollm2
    python benchmarks/real_model_diagnose.py --json benchmarks/real_model_diagnose.json   # about 15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_model  # noqa: E402  (the benchmark next to this file: its probes_for, run_row)

import forgetless.demo.real as real  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the .gguf file or model folder (default: forgetless fetch smollm2's file)")
    ap.add_argument("--out", type=Path, default=Path("runs/real_model_diagnose"))
    ap.add_argument("--k", type=int, default=10, help="examples of each keep set the recovery trains on")
    ap.add_argument("--steps", type=int, default=10, help="the recovery's optimiser steps")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    probes = real_model.probes_for(args)
    cfg = real.run_config(probes, {}, {}, split="test", before=True, run_dir=args.out / "full-fine-tuning", harness=False)
    cfg["output"]["save_model"] = True
    row = real_model.run_row(args.out, "full fine-tuning", cfg, args.threads)
    run_dir = Path(cfg["output"]["dir"])
    s = row["summary"]
    print(f"trained in {row['wall_s']:.0f} s: esperanto {s['after']['esperanto']['exact_match']:.2f}; "
          + ", ".join(f"{n} {s['before'][n]['score']:.3g} -> {s['after'][n]['score']:.3g}" for n in cfg["data"]["keep"]), flush=True)

    import torch

    torch.set_num_threads(args.threads)
    from forgetless.recipes.diagnose import diagnose

    t1 = time.perf_counter()
    result = diagnose(str(run_dir), k=args.k, steps=args.steps)
    diag_s = time.perf_counter() - t1
    for name, r in result["sets"].items():
        print(f"{name:12s} {json.dumps(r)}", flush=True)
    flips = s.get("flips", {})
    if args.json:
        args.json.write_text(json.dumps({"k": args.k, "steps": args.steps, "train_wall_s": row["wall_s"], "diagnose_s": round(diag_s),
                                         "learned": s["after"]["esperanto"]["exact_match"],
                                         "keep": {n: {"before": s["before"][n]["score"], "after": s["after"][n]["score"]} for n in cfg["data"]["keep"]},
                                         "flips": flips, "diagnose": result, "total_s": round(time.perf_counter() - t0)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
