"""A real pretrained chat model forgets, and what keeps it (``forgetless demo --real``).

SmolLM2-135M-Instruct (``forgetless fetch smollm2``) learns a task it cannot do, writing numbers
in Esperanto words (``demo:esperanto_numbers``: 300 numbers to train on, scored by exact match
on 100 it never saw), and is scored before and after on what it must keep, in its chat template
and the way it is used:

- ``capitals``: "What is the capital of X?" for the capitals the *base* answers right (its
  answers are sentences, so an answer counts when it contains the capital: metric ``contains``);
- ``own_answers``: the base's own one-line answers to everyday instructions (``demo:instructions``),
  generated and saved before training: a keep set that needs no data (exact match: the share of
  answers the model still gives word for word);
- ``general``: perplexity of public-domain prose (a third of ``demo:general``; another third is
  the mix method's general data, the last third the sweep's);
- ``mcq`` (the benchmark; optional here): a local lm-evaluation-harness multiple-choice task.

:func:`prepare` writes the base model as safetensors and the probes into a work folder, once;
:func:`run_config` is the config of one training run on them. The real-model benchmark
(``benchmarks/real_model.py``) runs every method family with these; the demo runs plain full
fine-tuning and the strategy with the benchmark's best trade-off, with the strength its sweep
picked (:data:`DEMO_STRATEGY`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from forgetless.data.builtin import builtin_path, write_lm_eval_tasks

STEPS = 30  # optimiser steps of every run
BATCH = 8
FULL_LR = 2e-4  # full fine-tuning and the methods on it
ADAPTER_LR = 1e-3  # LoRA, adapters, experts
PROMPT_CAPITAL = "What is the capital of {country}? Answer with the name of the city only."
OWN_ANSWER_TOKENS = 64  # the base's answers are generated up to this; those that did not end well within it are dropped


@dataclass
class Probes:
    """The prepared work folder: the base model and the probe files (``split``: validation or test)."""

    root: Path
    manifest: dict

    @property
    def base(self) -> Path:
        return self.root / "base"

    def file(self, name: str) -> Path:
        return self.root / "probes" / name


def prepare(root: Path, model_path: str, say=print) -> Probes:
    """The base model as safetensors (``root/base``) and the probes scored on it (``root/probes``), once."""
    root = root.resolve()
    manifest_file = root / "probes" / "manifest.json"
    if manifest_file.exists():
        return Probes(root, json.loads(manifest_file.read_text(encoding="utf-8")))
    import torch

    from forgetless.config import DataConfig, ModelConfig
    from forgetless.data.formats import Encoder
    from forgetless.data.loading import Record
    from forgetless.eval.scoring import answer_contains, generate
    from forgetless.models.loading import load_model, load_tokenizer

    t0 = time.perf_counter()
    cfg = ModelConfig(name_or_path=model_path)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok).eval()
    base = root / "base"
    if not (base / "config.json").exists():
        model.save_pretrained(base)
        tok.save_pretrained(base)
    probes = root / "probes"
    probes.mkdir(parents=True, exist_ok=True)
    enc = Encoder(tok, DataConfig(max_length=256))

    def answers(conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
        # the prompt is the conversation up to the model's turn (a placeholder answer is cut off)
        prompts = [enc.encode(Record({"messages": c + [{"role": "assistant", "content": "-"}]}, f"probe {i}"), "messages").prompt_ids
                   for i, c in enumerate(conversations)]
        with torch.no_grad():
            return generate(model, prompts, tok, batch_size=16, max_new_tokens=max_new_tokens, one_line=True)

    manifest: dict = {"model": Path(model_path).name}
    say("forgetless: scoring the base model's knowledge and answers (the keep probes) ...")
    facts = [json.loads(line) for line in builtin_path("demo:capitals").read_text(encoding="utf-8").splitlines()]
    asks = [[{"role": "user", "content": PROMPT_CAPITAL.format(country=f["prompt"].removeprefix("The capital of ").removesuffix(" is"))}]
            for f in facts]
    said = answers(asks, 24)
    known = [{"messages": a + [{"role": "assistant", "content": f["completion"].strip()}]}
             for a, f, answer in zip(asks, facts, said) if answer_contains(answer, f["completion"])]
    manifest["capitals"] = {"asked": len(facts), "base_right": len(known)}
    _write(probes / "capitals_test.jsonl", known[0::2])
    _write(probes / "capitals_validation.jsonl", known[1::2])

    instructions = [json.loads(line)["messages"] for line in builtin_path("demo:instructions").read_text(encoding="utf-8").splitlines()]
    said = answers(instructions, OWN_ANSWER_TOKENS)
    own = [{"messages": ask + [{"role": "assistant", "content": answer}]} for ask, answer in zip(instructions, said)
           # finished well within the limit, so that the base gives the same answer when scored again
           if answer.strip() and len(tok(answer)["input_ids"]) < OWN_ANSWER_TOKENS - 4]
    manifest["own_answers"] = {"instructions": len(instructions), "kept": len(own)}
    _write(probes / "own_test.jsonl", own[0::2])
    _write(probes / "own_validation.jsonl", own[1::2])

    paragraphs = [p.strip() for p in builtin_path("demo:general").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    for name, part in (("general_test", 0), ("general_validation", 1), ("general_mix", 2)):
        _write(probes / f"{name}.jsonl", [{"text": p} for p in paragraphs[part::3]])
    write_lm_eval_tasks(probes / "lm_eval_tasks")
    manifest["prepare_s"] = round(time.perf_counter() - t0, 1)
    manifest_file.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return Probes(root, manifest)


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def run_config(probes: Probes, methods: dict, train: dict, *, split: str, before: bool, run_dir: Path,
               harness: bool = True, progress: bool = False) -> dict:
    """The config (a dict for ``forgetless.config.config_from_dict``) of one run on the prepared probes.

    ``methods`` may name ``@general_mix`` (the mix method's third of the prose) and
    ``@replay_prompts`` (synthetic replay's prompts) as data.
    """
    text = json.dumps(methods).replace('"@general_mix"', json.dumps(str(probes.file("general_mix.jsonl"))))
    methods = json.loads(text.replace('"@replay_prompts"', json.dumps("demo:replay_prompts")))
    evaluation = {"before": before, "batch_size": 16, "max_examples": None,
                  # room for a chat answer ("The capital of Kenya is Nairobi."); each sequence stops at its end of turn or line
                  "max_new_tokens": 64}
    keep = {"capitals": {"path": str(probes.file(f"capitals_{split}.jsonl")), "metric": "contains"},
            "own_answers": {"path": str(probes.file(f"own_{split}.jsonl"))},
            "general": {"path": str(probes.file(f"general_{split}.jsonl"))}}
    # a model that knows none of the capitals, or whose answers never end, has no such probe
    keep = {k: v for k, v in keep.items() if Path(v["path"]).stat().st_size > 0}
    if harness:
        tasks = write_lm_eval_tasks(probes.file("lm_eval_tasks"))  # (again: the shipped files' paths are those of this install)
        evaluation["harness"] = {"tasks": [f"forgetless_mcq_{split}"], "include_path": str(tasks)}
    return {
        "model": {"name_or_path": str(probes.base)},
        "data": {
            "train": "demo:esperanto_numbers",
            "eval": {"esperanto": f"demo:esperanto_numbers_{split}"},
            "keep": keep,
            "max_length": 256,
        },
        "train": {"max_steps": STEPS, "micro_batch_size": BATCH, "lr": FULL_LR, "warmup_steps": 3, "seed": 0, **train},
        "eval": evaluation,
        "output": {"dir": str(run_dir), "progress": progress, "save_model": False, "overwrite": True},
        "methods": methods,
    }


# ------------------------------------------------------------------------------------------------
# scores of a run
# ------------------------------------------------------------------------------------------------

KEEPS = (("capitals", "capitals"), ("own answers", "own_answers"), ("general ppl", "general"), ("mcq acc", "mcq"))


def scores(summary: dict, when: str) -> dict:
    """The headline numbers of a run's summary.json (``when``: before / after)."""
    s = summary[when]
    out = {"esperanto": s["esperanto"]["exact_match"], "general": s["general"]["perplexity"]}
    if "capitals" in s:
        out["capitals"] = s["capitals"]["score"]
    if "own_answers" in s:
        out["own_answers"] = s["own_answers"]["exact_match"]
    mcq = [v for k, v in s.items() if k.startswith("harness/")]
    if mcq:
        out["mcq"] = mcq[0]["score"]
    return out


def retained(after: dict, before: dict) -> float:
    """Mean share of the base's keep scores retained, each capped at 1 (perplexity: base / after)."""
    shares = [min(1.0, after[k] / before[k]) if before[k] else 1.0 for k in ("capitals", "own_answers", "mcq") if k in before and k in after]
    shares.append(min(1.0, before["general"] / after["general"]))
    return sum(shares) / len(shares)


# ------------------------------------------------------------------------------------------------
# the demo
# ------------------------------------------------------------------------------------------------

# the real-model benchmark's best trade-off (BENCHMARKS.md, "Real model"): of the methods that still
# learn the task, it kept the most; its ratio is the one its sweep picked on the validation sets
DEMO_STRATEGY = ("synthetic replay 25%", {
    "synthetic_replay": {"prompts": "@replay_prompts", "num_samples": 48, "temperature": 0.0, "max_new_tokens": 48, "ratio": 0.25},
}, {})


def run_real_demo(out: Path, model: Optional[str] = None, overwrite: bool = False, say=print) -> dict:
    """Plain full fine-tuning vs :data:`DEMO_STRATEGY` on SmolLM2; returns the results and writes
    ``out/results.json`` and ``out/report.md``."""
    import forgetless
    from forgetless.config import config_from_dict
    from forgetless.errors import UserError
    from forgetless.models.fetch import fetch

    if out.exists() and (out / "results.json").exists() and not overwrite:
        raise UserError(f"{out}: holds an earlier real-model demo; pass --overwrite to replace it, or -o another folder")
    model = model or str(fetch("smollm2", say=say))
    t0 = time.perf_counter()
    probes = prepare(out / "work", model, say=say)
    name, methods, train = DEMO_STRATEGY
    rows, base = [], None
    for label, m, t in (("full fine-tuning", {}, {}), (name, methods, train)):
        say(f"forgetless: training {probes.manifest['model']} with {label} ({STEPS} steps) ...")
        cfg = config_from_dict(run_config(probes, m, t, split="test", before=base is None, run_dir=out / "runs" / _slug(label),
                                          harness=False, progress=True))
        result = forgetless.train(cfg)
        summary = json.loads((result.run_dir / "summary.json").read_text(encoding="utf-8"))
        if base is None:
            base = scores(summary, "before")
        after = scores(summary, "after")
        rows.append({"strategy": label, "after": after, "kept": retained(after, base), "train_s": summary["train"]["train_time_s"],
                     "trainable_params": summary["train"]["trainable_params"]})
    results = {"model": probes.manifest["model"], "steps": STEPS, "base": base, "rows": rows, "probes": probes.manifest,
               "total_s": round(time.perf_counter() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report_markdown(results) + "\n", encoding="utf-8")
    return results


def report_markdown(results: dict) -> str:
    base = results["base"]
    head = ("| strategy | new task: esperanto EM | capitals kept | own answers kept | general perplexity | kept (mean share) "
            "| train s | trainable params |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1),
             f"| base model (before) | {_cells(base)} | 100% | | |"]
    for r in results["rows"]:
        lines.append(f"| {r['strategy']} | {_cells(r['after'])} | {r['kept']:.0%} | {r['train_s']:.0f} | {r['trainable_params']:,} |")
    return "\n".join(lines)


def _cells(s: dict) -> str:
    pct = lambda k: f"{s[k]:.0%}" if k in s else "n/a"  # noqa: E731
    return f"{pct('esperanto')} | {pct('capitals')} | {pct('own_answers')} | {s['general']:.2f}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


__all__ = ["Probes", "prepare", "run_config", "scores", "retained", "run_real_demo", "report_markdown", "DEMO_STRATEGY"]
