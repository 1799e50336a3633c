"""`forgetless tune` on the real model (issue 13, item 5c): SmolLM2-135M-Instruct, Esperanto numbers.

The task, probes and budget are those of benchmarks/real_model_budget.py (the capitals may fall by
at most ``--max-drop``, contains; test split, no lm-eval task). ``forgetless tune`` searches L2-SP
(``tune.strategies: [l2sp]``: its strength, where each trial's controller starts, and the learning
rate) as a user would run it, each trial a process of its own. Compared with the fixed-strength
L2-SP grid of real_model_budget.py (``--grid-json``): after how many trials does tune have a run
inside the budget that learns at least as much as the grid's best run inside it?

    forgetless fetch smollm2
    python benchmarks/real_model_tune.py --grid-json benchmarks/real_model_budget_l2sp.json \\
        --json benchmarks/real_model_tune.json        # about 8 min per trial on 2 cores
    # interrupted? the same command again resumes the search (finished trials are kept)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_model  # noqa: E402  (the benchmark next to this file: its probes_for)
from real_model_budget import config  # noqa: E402  (benchmarks/real_model_budget.py)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the .gguf file or model folder (default: forgetless fetch smollm2's file)")
    ap.add_argument("--out", type=Path, default=Path("runs/real_model_tune"))
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--every", type=int, default=3, help="budget.every_steps of every trial")
    ap.add_argument("--keep-sample", type=int, default=0, help="budget.keep_sample of every trial (0: the whole set)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--grid-json", type=Path, required=True, help="real_model_budget.py --lever l2sp's --json: the grid to compare with")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    probes = real_model.probes_for(args)
    budget = {"every_steps": args.every, "keep_sample": args.keep_sample or None}
    cfg = config(probes, "tune", {}, budget, args.max_drop, args.out)
    cfg["tune"] = {"trials": args.trials, "strategies": ["l2sp"]}
    import yaml

    path = args.out / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    tune_dir = Path(cfg["output"]["dir"])
    command = [sys.executable, "-m", "forgetless", "tune", str(path)]
    if (tune_dir / "tune.journal").is_file():
        command.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(command, env=env)
    if proc.returncode != 0:
        sys.exit(f"forgetless tune failed (exit {proc.returncode}); run this command again to resume")
    result = json.loads((tune_dir / "tune.json").read_text())

    grid = [r for r in json.loads(args.grid_json.read_text())["rows"] if r["name"].startswith("l2sp ")]
    inside = [r for r in grid if r["drop"] <= args.max_drop]
    best = max(inside, key=lambda r: r["learned"], default=None)
    trials = [{k: t.get(k) for k in ("number", "label", "learned", "kept", "feasible", "budget_excess", "steps")} for t in result["trials"]]
    drop = {}
    for t in result["trials"]:  # the capitals' own drop, from each trial's summary
        summary = Path(t.get("run_dir", "")) / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            drop[t["number"]] = s["before"]["capitals"]["score"] - s["after"]["capitals"]["score"]
    for t in trials:
        t["capitals_drop"] = drop.get(t["number"])
    target = best["learned"] if best else None
    found = next((t["number"] + 1 for t in trials if t.get("learned") is not None and t["feasible"]
                  and (target is None or t["learned"] >= target)), None)
    for t in trials:
        d = "" if t["capitals_drop"] is None else f", capitals drop {t['capitals_drop']:+.2f}"
        print(f"trial {t['number']} ({t['label']}): learned {t.get('learned')}, kept {t.get('kept')}{d}, "
              f"{'inside' if t['feasible'] else 'over'}")
    print(f"grid's best inside the budget: {best['name'] + ' learned ' + format(best['learned'], '.2f') if best else 'none'}; "
          f"tune: a run inside learning at least as much after {found} trial(s) (grid: {len(grid)} runs)")
    if args.json:
        args.json.write_text(json.dumps({"max_drop": args.max_drop, "every_steps": args.every, "keep_sample": args.keep_sample or None,
                                         "trials": trials, "chosen": result.get("chosen"), "front": result.get("front"),
                                         "grid_best_inside": best["name"] if best else None, "grid_size": len(grid),
                                         "trials_to_match_the_grid": found, "tune_steps": result.get("training_steps"),
                                         "grid_steps": sum(r.get("steps", 30) for r in grid) if grid else None,
                                         "total_s": round(time.perf_counter() - t0)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
