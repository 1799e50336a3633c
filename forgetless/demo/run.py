"""``forgetless demo``: watch catastrophic forgetting happen, and each remedy against it, offline.

1. *Old knowledge.* A tiny Llama (random init, its own tokenizer) learns the capitals of 178
   countries from ``demo:capitals`` until it recalls nearly all of them.
2. *New task.* That model is fine-tuned on the chemical symbols of 86 elements
   (``demo:elements``), while ``demo:capitals`` is scored as a keep set: with plain full
   fine-tuning, and then with each anti-forgetting method, on the same base, data and seed.
   Methods that need old data (EWC's Fisher, replay, mixing, self-synthesized replay's prompts)
   get the capitals, as a user would give them their old task's data.
3. *The evidence.* Exact match and loss on both tasks before and after, time and trainable
   parameters per strategy, in a table, ``report.md``, ``report.html`` and ``results.json``.
   Every number comes from this run; a method that learns less of the new task shows it.

Both stages are ordinary :func:`forgetless.train` calls; the demo is a short script over the API.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from forgetless.config import load_config
from forgetless.demo.continual import RUNS_DIR, run_continual_demo
from forgetless.errors import UserError
from forgetless.files import MODEL_DIR, REPORT_HTML, REPORT_MD, RESULTS_FILE
from forgetless.progress import console
from forgetless.report import plots
from forgetless.report.console import print_table
from forgetless.report.html import esc, figure, page, table
from forgetless.report.tables import markdown_table, percent

MODEL_SHAPE = ["model.tiny.hidden_size=256", "model.tiny.intermediate_size=682", "model.tiny.num_layers=2"]


# Found by a small sweep: the base model recalls ~99% of the capitals after 40 epochs.
BASE_TRAINING = ["train.epochs=40", "train.lr=2e-3"]
FINETUNING = ["train.epochs=20", "train.lr=1e-3"]

# Strategies compared on the same base model, data and seed: name -> config overrides.
# Adapter methods train fewer parameters and get the higher learning rate adapters usually use.
ADAPTER_LR = "train.lr=3e-3"
STRATEGIES: dict[str, list[str]] = {
    "full fine-tuning": [],
    "freeze (last block)": ["methods.freeze.train_last_n=1"],
    "freeze (by importance)": ["methods.freeze.by_importance=1", "methods.freeze.importance_samples=32"],
    "lora": ["methods.lora.r=8", ADAPTER_LR],
    "dora": ["methods.lora.r=8", "methods.lora.variant=dora", ADAPTER_LR],
    "bottleneck adapters": ["methods.bottleneck.size=32", ADAPTER_LR],
    "ewc": ["methods.ewc.weight=100000", "methods.ewc.samples=64"],
    "l2-sp": ["methods.l2sp.weight=1"],
    "kl distillation": ["methods.kl.weight=2"],
    "mix old data 25%": ["methods.mix.sources.capitals=demo:capitals", "methods.mix.ratio=0.25"],
    "replay (40 examples)": ["methods.replay.memory=[demo:capitals]", "methods.replay.size_examples=40", "methods.replay.ratio=0.25"],
    "self-synthesized replay": ["methods.synthetic_replay.prompts=demo:capitals", "methods.synthetic_replay.num_samples=64",
                                "methods.synthetic_replay.temperature=0", "methods.synthetic_replay.max_new_tokens=8", "methods.synthetic_replay.ratio=0.25"],
    "moe lora (4 experts)": ["methods.moe_lora.num_experts=4", "methods.moe_lora.top_k=2", ADAPTER_LR],
    "o-lora": ["methods.olora=true", ADAPTER_LR],
    "lora + replay + kl": ["methods.lora.r=8", ADAPTER_LR, "methods.replay.memory=[demo:capitals]", "methods.replay.size_examples=40",
                           "methods.replay.ratio=0.25", "methods.kl.weight=2"],
}


def _common(out: Path, name: str) -> list[str]:
    return [
        f"output.dir={out / name}",
        "output.overwrite=true",
        "output.log_every=5",
        "train.micro_batch_size=32",
        "train.warmup_ratio=0.05",
        "train.seed=0",
        "data.max_length=64",
        "eval.batch_size=64",
        "eval.max_new_tokens=8",
    ]


PARTS = ("all", "forgetting", "continual")
BASE_DIR, CONTINUAL_DIR = "base", "continual"  # OUT/base: the base model's run; OUT/continual: part 2


def run_demo(out: Path, overwrite: bool = False, strategies: Optional[list[str]] = None, part: str = "all",
             quick_continual: bool = False) -> dict:
    """Run the demo into ``out``; returns what results.json holds.

    ``part``: 'forgetting' (one new task, every strategy or the named ones), 'continual' (a task
    sequence, under ``out/continual``), or 'all'.
    """
    import forgetless

    if part not in PARTS:
        raise UserError(f"--part {part!r}: choose one of {', '.join(PARTS)}")

    chosen = list(STRATEGIES) if not strategies else strategies
    unknown = [s for s in chosen if s not in STRATEGIES and s != "wise-ft"]
    if unknown:
        raise UserError(f"--strategies: unknown {unknown[0]!r}; choose from {', '.join(list(STRATEGIES) + ['wise-ft'])}")
    if "full fine-tuning" not in chosen:
        chosen.insert(0, "full fine-tuning")  # the reference every method is compared with

    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: already holds files; pass --overwrite to replace the demo, or choose another --output-dir")
        if not any((out / marker).exists() for marker in (RESULTS_FILE, BASE_DIR, CONTINUAL_DIR)):
            raise UserError(f"{out}: holds files that are not a forgetless demo; refusing to empty it, choose another --output-dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if part == "continual":
        return _continual(out, quick_continual)

    console.rule("[bold]1. the base model learns world capitals (old knowledge)")
    base_cfg = load_config(None, [
        "model.name_or_path=tiny", *MODEL_SHAPE, *_common(out, BASE_DIR),
        "data.train=demo:capitals", "data.eval.capitals=demo:capitals", "data.keep.elements=demo:elements",
        *BASE_TRAINING, "eval.before=false",
    ])
    base = forgetless.train(base_cfg)
    console.print(f"base model: capitals exact match {base.after['capitals']['exact_match']:.1%}")

    results = {"base": {"train": base.train, "scores": base.after}, "strategies": {}}
    for name in (c for c in chosen if c != "wise-ft"):
        overrides = STRATEGIES[name]
        console.rule(f"[bold]2. fine-tuning on element symbols (new task): {name}")
        cfg = load_config(None, [
            f"model.name_or_path={out / BASE_DIR / MODEL_DIR}", *_common(out, _slug(name)),
            "data.train=demo:elements", "data.eval.elements=demo:elements", "data.keep.capitals=demo:capitals",
            *FINETUNING, *overrides,
        ])
        r = forgetless.train(cfg)
        results["strategies"][name] = {"before": r.before, "after": r.after, "train": r.train, "run_dir": str(r.run_dir)}
    if not strategies or "wise-ft" in strategies:
        console.rule("[bold]3. weight interpolation (WiSE-FT) of the full fine-tuning with its base")
        results["strategies"]["wise-ft (interpolated)"] = _wise_ft(out, results["strategies"]["full fine-tuning"])
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    results["schedule"] = {"base": BASE_TRAINING, "finetune": FINETUNING}
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    rows = table_rows(results)
    print_table([label for _, label, _ in COLUMNS], _cells(rows), title="old task = capitals, new task = element symbols; EM = exact match",
                caption="forgot = old-task EM points lost by the fine-tuning")
    (out / REPORT_MD).write_text(report_markdown(rows, results), encoding="utf-8")
    (out / REPORT_HTML).write_text(report_html(rows, results), encoding="utf-8")
    console.print(f"demo part 1 finished in {results['elapsed_s']:.0f}s; report: {out / REPORT_HTML} (also {REPORT_MD}, {RESULTS_FILE})")
    if part == "all":
        results["continual"] = _continual(out, quick_continual)["continual"]
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


def _continual(out: Path, quick: bool) -> dict:
    started = time.perf_counter()
    done = run_continual_demo(out / CONTINUAL_DIR, quick=quick)
    elapsed = time.perf_counter() - started
    runs = out / CONTINUAL_DIR / RUNS_DIR
    console.print(f"demo part 2 finished in {elapsed:.0f}s; report: {done['files'].get('html', runs)}")
    return {"continual": {"elapsed_s": round(elapsed, 1), "results": str(runs / RESULTS_FILE), "files": done["files"]}}


def _wise_ft(out: Path, full: dict) -> dict:
    """Interpolate the full fine-tuning with its base; the chosen alpha is scored like the others."""
    from forgetless.interpolate import run_interpolation

    started = time.perf_counter()
    result = run_interpolation(full["run_dir"], alphas=(0.0, 0.25, 0.5, 0.75, 1.0), output=str(out / "wise-ft"),
                               max_new_tokens=8, batch_size=64, overwrite=True)
    chosen = next(p for p in result["points"] if p["alpha"] == result["selection"]["alpha"])
    train = dict(full["train"], train_time_s=full["train"]["train_time_s"] + time.perf_counter() - started)
    return {"before": full["before"], "after": chosen["scores"], "train": train, "run_dir": result["output"],
            "alpha": result["selection"]["alpha"], "sweep": result["points"]}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def table_rows(results: dict) -> list[dict]:
    """One row per strategy: old and new task exact match before/after, forgetting, cost."""
    rows = []
    for name, r in results["strategies"].items():
        b, a = r["before"], r["after"]
        rows.append({
            "strategy": name,
            "old_before": b["capitals"]["exact_match"],
            "old_after": a["capitals"]["exact_match"],
            "new_before": b["elements"]["exact_match"],
            "new_after": a["elements"]["exact_match"],
            "forgetting": b["capitals"]["exact_match"] - a["capitals"]["exact_match"],
            "old_loss_before": b["capitals"]["loss"],
            "old_loss_after": a["capitals"]["loss"],
            "train_time_s": r["train"]["train_time_s"],
            "trainable_params": r["train"]["trainable_params"],
        })
    return rows


# (key of a table row, label, format)
COLUMNS = [
    ("strategy", "strategy", str),
    ("old_before", "old EM before", percent),
    ("old_after", "old EM after", percent),
    ("forgetting", "forgot", percent),
    ("new_before", "new EM before", percent),
    ("new_after", "new EM after", percent),
    ("old_loss_after", "old loss after", "{:.2f}".format),
    ("train_time_s", "time (s)", "{:.1f}".format),
    ("trainable_params", "trainable params", "{:,}".format),
]
TITLE = "forgetless demo: catastrophic forgetting, measured"
BARS = [("old_before", "capitals before", "#9ecae1"), ("old_after", "capitals after", "#3182bd"),
        ("new_before", "elements before", "#fdae6b"), ("new_after", "elements after", "#e6550d")]


def _cells(rows: list[dict]) -> list[list[str]]:
    return [[fmt(r[key]) for key, _, fmt in COLUMNS] for r in rows]


def report_markdown(rows: list[dict], results: dict) -> str:
    base = results["base"]
    lines = [
        f"# {TITLE}",
        "",
        "A tiny Llama learned the capitals of 178 countries (the old knowledge), then was fine-tuned on",
        "the chemical symbols of 86 elements (the new task). EM = exact match of greedy answers;",
        "old = capitals, new = element symbols; forgot = old-task EM points lost.",
        "",
        *markdown_table([label for _, label, _ in COLUMNS], _cells(rows)),
        "",
        f"Base model: capitals EM {percent(base['scores']['capitals']['exact_match'])} after "
        f"{base['train']['steps']} steps ({base['train']['train_time_s']:.0f}s).",
        f"Whole demo: {results['elapsed_s']:.0f}s. Schedule: {results['schedule']}.",
        "",
    ]
    return "\n".join(lines)


def report_html(rows: list[dict], results: dict) -> str:
    head = "".join(f"<th>{esc(label)}</th>" for _, label, _ in COLUMNS)
    body = ["<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in cells) + "</tr>" for cells in _cells(rows)]
    bars = plots.grouped_bars([r["strategy"] for r in rows], [(label, [100 * r[key] for r in rows], colour) for key, label, colour in BARS],
                              ylabel="exact match (%)", ylim=(0, 105), alt="exact match before and after fine-tuning")
    return page("forgetless demo", [
        f"<h1>{esc(TITLE)}</h1>",
        "<p>A tiny Llama learned the capitals of 178 countries (the old knowledge), then was fine-tuned on the chemical "
        "symbols of 86 elements (the new task). EM = exact match of greedy answers; old = capitals, new = element symbols; "
        f"forgot = old-task EM points lost. Every number comes from this run ({results['elapsed_s']:.0f}s).</p>",
        table(head, body),
        figure(bars, "Exact match on the old task (capitals, blue) and the new one (element symbols, orange), "
                     "before and after each strategy's fine-tuning."),
    ])
