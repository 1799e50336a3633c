"""The forgetting budget, measured (issue 13) on the tiny forgetting scenario of tests/methods/conftest.py.

A 3-block tiny Llama memorises 40 capitals; every run then fine-tunes it on 30 element symbols for
24 steps (lr 1e-3, seed 0). The keep set is the capitals (token accuracy), budget max_drop 0.05.

(a) Is the online signal a signal? For several strategies, the online KL of the last check and
    the keep sample's drop there, against the final drop of the whole keep set: Spearman's rank
    correlation across strategies.
(b) A budgeted run (L2-SP at 0.1, the controller on) against a 5-point grid of fixed L2-SP
    strengths: does it land inside the budget (at most 2 points over), and learn at least as much
    as the best grid run inside it, with fewer training steps than the grid?
(c) `forgetless tune` (L2-SP strength and learning rate, 10 trials) against the same grid: after
    how many trials does it have a run inside the budget that learns at least as much as the
    grid's best?

    python benchmarks/budget.py --json benchmarks/budget.json      # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import forgetless

BASE_SHAPE = ["model.tiny.hidden_size=96", "model.tiny.intermediate_size=256", "model.tiny.num_layers=3",
              "model.tiny.num_heads=4", "model.tiny.num_kv_heads=2"]
COMMON = ["output.progress=false", "output.log_every=1", "train.seed=0", "train.micro_batch_size=16", "train.warmup_ratio=0.0",
          "data.max_length=48", "eval.generation=false", "eval.batch_size=64"]
MAX_DROP = 0.05
KEEP = f"data.keep.capitals={{path: demo:capitals, limit: 40, metric: token_accuracy, max_drop: {MAX_DROP}}}"
TASK = ["data.train={path: demo:elements, limit: 30}", "data.eval.elements={path: demo:elements, limit: 30}"]
STEPS, LR = 24, 1e-3

SIGNAL_STRATEGIES = {
    "plain": [],
    "l2sp 0.01": ["methods.l2sp.weight=0.01"],
    "l2sp 0.1": ["methods.l2sp.weight=0.1"],
    "l2sp 1": ["methods.l2sp.weight=1"],
    "kl 0.1": ["methods.kl.weight=0.1"],
    "kl 1": ["methods.kl.weight=1"],
    "mix general 25%": ["methods.mix.sources.general=demo:general", "methods.mix.ratio=0.25"],
    "lora r8 (lr 1e-2)": ["methods.lora.r=8", "train.lr=1e-2"],
    "lr 3e-3": ["train.lr=3e-3"],
}
GRID = [0.01, 0.03, 0.1, 0.3, 1.0]


def base_model(root: Path) -> Path:
    cfg = forgetless.load_config(None, ["model.name_or_path=tiny", *BASE_SHAPE, *COMMON, f"output.dir={root / 'base'}",
                                        "data.train={path: demo:capitals, limit: 40}", "data.eval.capitals={path: demo:capitals, limit: 40}",
                                        "train.epochs=60", "train.lr=3e-3", "eval.before=false"])
    forgetless.train(cfg)
    return root / "base" / "model"


def run(base: Path, root: Path, name: str, *extra: str):
    cfg = forgetless.load_config(None, [f"model.name_or_path={base}", *COMMON, *TASK, KEEP, f"output.dir={root / name}",
                                        "output.overwrite=true", f"train.max_steps={STEPS}", f"train.lr={LR}", *extra])
    return forgetless.train(cfg)


def checks(result) -> list[dict]:
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    return [{"step": r["step"], **r["budget"]} for r in map(json.loads, lines) if "budget" in r and r["budget"].get("action") != "end"]


def drop(result) -> float:
    return result.before["capitals"]["score"] - result.after["capitals"]["score"]


def learned(result) -> float:
    return result.after["elements"]["score"]


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):  # ties share their mean rank
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--trials", type=int, default=10, help="tune's trials (c)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="forgetless-budget-"))
    base = base_model(root)
    out: dict = {"max_drop": MAX_DROP, "steps": STEPS, "lr": LR}

    # (a) the signal
    rows = []
    for name, extra in SIGNAL_STRATEGIES.items():
        r = run(base, root, "signal-" + name.replace(" ", "-"), *extra, "budget.every_steps=4", "budget.control=false",
                "budget.restore=false", "budget.patience=0", "budget.keep_sample=16")
        c = checks(r)
        rows.append({"strategy": name, "kl_last": c[-1]["kl"], "kl_mean": sum(x["kl"] for x in c) / len(c),
                     "sample_drop_last": c[-1]["drop"]["capitals"], "final_drop": drop(r), "learned": learned(r)})
        print(f"(a) {name:22s} KL last {rows[-1]['kl_last']:.3f} mean {rows[-1]['kl_mean']:.3f}  sample drop {rows[-1]['sample_drop_last']:+.3f}"
              f"  final drop {rows[-1]['final_drop']:+.3f}  learned {rows[-1]['learned']:.3f}", flush=True)
    final = [r["final_drop"] for r in rows]
    out["signal"] = {"rows": rows, "spearman_kl_last": spearman([r["kl_last"] for r in rows], final),
                     "spearman_kl_mean": spearman([r["kl_mean"] for r in rows], final),
                     "spearman_sample_drop": spearman([r["sample_drop_last"] for r in rows], final)}
    print(f"(a) Spearman with the final drop: KL (last check) {out['signal']['spearman_kl_last']:.2f}, KL (mean) "
          f"{out['signal']['spearman_kl_mean']:.2f}, keep sample's drop {out['signal']['spearman_sample_drop']:.2f}", flush=True)

    # (b) the controller against a grid of fixed strengths
    grid = []
    for w in GRID:
        r = run(base, root, f"grid-{w}", f"methods.l2sp.weight={w}", "budget.control=false", "budget.patience=0", "budget.restore=false")
        grid.append({"weight": w, "drop": drop(r), "learned": learned(r), "inside": drop(r) <= MAX_DROP, "steps": r.train["steps"]})
        print(f"(b) grid l2sp {w:<5} drop {grid[-1]['drop']:+.3f} learned {grid[-1]['learned']:.3f}", flush=True)
    budgeted = run(base, root, "budgeted", "methods.l2sp.weight=0.1", "budget.every_steps=2", "budget.keep_sample=null", "budget.restore=false")
    b = budgeted.train["budget"]
    best_grid = max((g for g in grid if g["inside"]), key=lambda g: g["learned"], default=None)
    out["controller"] = {"grid": grid, "best_grid_inside": best_grid,
                         "budgeted": {"drop": drop(budgeted), "learned": learned(budgeted), "steps": budgeted.train["steps"],
                                      "strength_end": b["strength"], "changes": b["changes"], "within_2_points": drop(budgeted) <= MAX_DROP + 0.02},
                         "grid_steps": sum(g["steps"] for g in grid)}
    print(f"(b) budgeted: drop {drop(budgeted):+.3f} learned {learned(budgeted):.3f} ({budgeted.train['steps']} steps, strength x{b['strength']:.3g} "
          f"at the end, {b['changes']} changes); best grid run inside: {best_grid}", flush=True)

    # (c) tune against the grid
    tune_dir = root / "tune"
    from forgetless.cli import main as cli

    cli(["tune", f"model.name_or_path={base}", *COMMON, *TASK, KEEP, f"output.dir={tune_dir}", f"train.max_steps={STEPS}",
         f"train.lr={LR}", f"tune.trials={args.trials}", "tune.strategies=[l2sp]"])
    result = json.loads((tune_dir / "tune.json").read_text())
    target = best_grid["learned"] if best_grid else None
    found = next((t["number"] + 1 for t in result["trials"] if "learned" in t and t["feasible"] and target is not None and t["learned"] >= target), None)
    out["tune"] = {"trials": [{k: t.get(k) for k in ("number", "label", "learned", "kept", "feasible", "budget_excess", "steps")}
                              for t in result["trials"]],
                   "trials_to_match_the_grid": found, "grid_size": len(GRID), "tune_steps": result["training_steps"]}
    print(f"(c) tune: a run inside the budget learning >= the grid's best after {found} trial(s) (grid: {len(GRID)} runs)", flush=True)
    out["total_s"] = round(time.perf_counter() - t0)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
