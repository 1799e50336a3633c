"""The forgetting budget on the real model (issue 13): SmolLM2-135M-Instruct learns Esperanto numbers.

The task, probes and runs are those of benchmarks/real_model.py (forgetless/demo/real.py), on the
test split, without the lm-eval task (for time). The budget: the capitals the base knew may fall
by at most ``--max-drop`` (contains, absolute). The protection (``--lever``) is synthetic replay,
whose batch share the controller moves, or L2-SP, whose weight it moves.

(a) For plain full fine-tuning and a 5-point grid of fixed strengths: the online KL and the
    capitals sample's drop at the checks, against the final capitals drop (Spearman).
(b) A budgeted run (the grid's ``--start`` to start, the controller on) against the grid: inside
    the budget (at most 2 points over)? Does it learn at least as much as the best grid run inside?

    forgetless fetch smollm2
    python benchmarks/real_model_budget.py --json benchmarks/real_model_budget.json   # about 60 min on 2 cores
    python benchmarks/real_model_budget.py --lever l2sp --every 3 --keep-sample 0 --restore \
        --reuse-json benchmarks/real_model_budget.json --json benchmarks/real_model_budget_l2sp.json
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
from budget import spearman  # noqa: E402  (benchmarks/budget.py)

import forgetless.demo.real as real  # noqa: E402

REPLAY = {"prompts": "@replay_prompts", "num_samples": 48, "temperature": 0.0, "max_new_tokens": 48}
LEVERS = {  # the grid of fixed strengths, the budgeted run's start, and the method at a strength
    "replay": ([0.1, 0.25, 0.4, 0.5, 0.6], 0.25, lambda v: {"synthetic_replay": {**REPLAY, "ratio": v}}),
    "l2sp": ([0.3, 1.0, 3.0, 10.0, 30.0], 1.0, lambda v: {"l2sp": {"weight": v}}),
}


def config(probes, name: str, methods: dict, budget: dict, max_drop: float, out: Path) -> dict:
    cfg = real.run_config(probes, methods, {}, split="test", before=True, run_dir=out / name, harness=False)
    cfg["data"]["keep"]["capitals"]["max_drop"] = max_drop
    cfg["budget"] = budget
    return cfg


def checks(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{"step": r["step"], **r["budget"]} for r in map(json.loads, lines) if "budget" in r and "kl" in r["budget"]]  # not the end's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the .gguf file or model folder (default: forgetless fetch smollm2's file)")
    ap.add_argument("--out", type=Path, default=Path("runs/real_model_budget"))
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--every", type=int, default=5, help="budget.every_steps of the budgeted run")
    ap.add_argument("--lever", choices=sorted(LEVERS), default="replay", help="the protection whose strength the grid fixes and the controller moves")
    ap.add_argument("--start", type=float, help="the budgeted run's starting strength (default: replay 0.25, l2sp 1)")
    ap.add_argument("--keep-sample", type=int, default=16, help="the budgeted run's budget.keep_sample (0: the whole set)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--aim", type=float, default=1.0, help="budget.aim of the budgeted run")
    ap.add_argument("--restore", action="store_true", help="the budgeted run restores the last weights inside the budget at the end")
    ap.add_argument("--budgeted-only", action="store_true", help="run the budgeted run alone (the grid's rows come from --grid-json)")
    ap.add_argument("--grid-json", type=Path, help="with --budgeted-only: an earlier --json whose fixed rows to compare with")
    ap.add_argument("--reuse-json", type=Path, help="an earlier --json: its rows of the same name (same config) are taken, not rerun")
    args = ap.parse_args()
    t0 = time.perf_counter()
    probes = real_model.probes_for(args)
    grid, start, method = LEVERS[args.lever]
    start = args.start if args.start is not None else start
    fixed = {"every_steps": 5, "keep_sample": 16, "control": False, "patience": 0, "restore": False}
    runs = {"full fine-tuning": ({}, fixed)}
    for value in grid:
        runs[f"{args.lever} {value:g}"] = (method(value), fixed)
    sample = args.keep_sample or None
    label = (f"budgeted ({args.lever} {start:g} to start, checks every {args.every} on {sample or 'all'} of the keep set, "
             f"aim {args.aim}{', restore' if args.restore else ''})")
    runs[label] = (method(start), {"every_steps": args.every, "keep_sample": sample, "restore": args.restore, "aim": args.aim})
    rows = []
    if args.budgeted_only:
        rows = [r for r in json.loads(args.grid_json.read_text())["rows"] if not r["name"].startswith("budgeted")]
        runs = {label: runs[label]}
    earlier = {r["name"]: r for r in json.loads(args.reuse_json.read_text())["rows"]} if args.reuse_json else {}
    for name, (methods, budget) in runs.items():
        if name in earlier:
            rows.append(earlier[name])
            print(f"{name:34s} (from {args.reuse_json})", flush=True)
            continue
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        cfg = config(probes, slug, methods, budget, args.max_drop, args.out)
        row = real_model.run_row(args.out, name, cfg, args.threads)
        s = row["summary"]
        c = checks(Path(cfg["output"]["dir"]))
        b = s["train"].get("budget", {})
        rows.append({"name": name, "learned": s["after"]["esperanto"]["exact_match"],
                     "capitals_before": s["before"]["capitals"]["score"], "capitals_after": s["after"]["capitals"]["score"],
                     "drop": s["before"]["capitals"]["score"] - s["after"]["capitals"]["score"],
                     "kl_mean": sum(x["kl"] for x in c) / len(c) if c else None, "sample_drop_last": c[-1]["drop"].get("capitals") if c else None,
                     "train_s": s["train"]["train_time_s"], "wall_s": row["wall_s"], "strength_end": b.get("strength"),
                     "shares_end": b.get("shares"), "changes": b.get("changes"), "restored_step": b.get("restored_step")})
        r = rows[-1]
        print(f"{name:34s} learned {r['learned']:.2f}  capitals {r['capitals_before']:.2f} -> {r['capitals_after']:.2f} (drop {r['drop']:+.2f})"
              f"  KL mean {r['kl_mean']:.3f}  ({r['wall_s']:.0f} s)", flush=True)
    fixed_rows = [r for r in rows if not r["name"].startswith("budgeted")]
    final = [r["drop"] for r in fixed_rows]
    signal = {"spearman_kl_mean": spearman([r["kl_mean"] for r in fixed_rows], final),
              "spearman_sample_drop": spearman([r["sample_drop_last"] for r in fixed_rows], final)}
    inside = [r for r in fixed_rows if r["drop"] <= args.max_drop]
    best = max(inside, key=lambda r: r["learned"], default=None)
    budgeted = rows[-1]
    verdict = {"budgeted_within_2_points": budgeted["drop"] <= args.max_drop + 0.02,
               "best_grid_inside": best["name"] if best else None,
               "budgeted_learns_at_least_as_much": best is None or budgeted["learned"] >= best["learned"]}
    print(f"Spearman with the final capitals drop: KL (mean of checks) {signal['spearman_kl_mean']:.2f}, "
          f"capitals sample's drop {signal['spearman_sample_drop']:.2f}; {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"max_drop": args.max_drop, "every_steps": args.every, "lever": args.lever, "start": start, "rows": rows, "signal": signal,
                                         "verdict": verdict, "total_s": round(time.perf_counter() - t0)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
