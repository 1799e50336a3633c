"""``forgetless diagnose RUN_DIR``: was the forgetting spurious, or was knowledge lost?

Much of what a fine-tune "forgets" is lost alignment: the knowledge is still in the weights, and a
few steps on a handful of old examples bring it back (Zheng et al. 2025, "Spurious Forgetting in
Continual Learning of Language Models", arXiv 2501.13453). For every keep set of a finished run,
this module takes ``k`` of the set's examples (seeded), trains the run's final model on them for
``steps`` optimiser steps (a plain full fine-tune through the same recipe, no method), and scores
the *other* examples of the set three times: with the starting model, with the run's final model,
and after the few steps. The recovered share

    recovered = (after recovery - final) / (start - final)

is 1 when the few steps give back all that was lost and 0 when they give back nothing (below 0:
the few steps lost more). Where the final model lost less than ``min_drop`` (default 0.02, two
points, of the order of one example's verdict on a small set) it is not defined: a share of a
difference that small is noise (0.01 lost and 0.04 "recovered" downward would read -400%). A
share of 0.5 or more is reported as mostly spurious. The few-step runs live under ``RUN_DIR/diagnose/`` and the
result in ``RUN_DIR/diagnose.json``.

Written by hand: no training library measures spurious forgetting.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from forgetless.config import load_config
from forgetless.data.loading import load_records
from forgetless.errors import UserError
from forgetless.files import CONFIG_FILE, MODEL_DIR, SUMMARY_FILE

DIAGNOSE_FILE = "diagnose.json"
SPURIOUS = 0.5  # a recovered share from which the forgetting is called mostly spurious


def recovered_share(start: float, final: float, recovered: float, higher_is_better: bool, min_drop: float) -> Optional[float]:
    """The share of what was lost that the few steps gave back (None when less than ``min_drop`` was
    lost: absolute for higher-is-better scores, relative to ``start`` for loss and perplexity)."""
    lost = (start - final) if higher_is_better else (final - start)
    if (lost if higher_is_better else lost / max(abs(start), 1e-12)) < min_drop:
        return None
    back = (recovered - final) if higher_is_better else (final - recovered)
    return back / lost


MIN_DROP = 0.02  # below this loss of score (absolute; relative for loss/perplexity) no share is computed


def verdict(share: Optional[float]) -> str:
    if share is None:
        return "nothing lost"
    if share >= SPURIOUS:
        return "mostly spurious (recovered by a few examples)"
    # a slightly negative share is one example's noise; from -25% the few steps did harm
    return "knowledge lost (the few steps lost more)" if share <= -0.25 else "knowledge lost"


def diagnose(run_dir: str, *, k: int = 10, steps: int = 10, lr: Optional[float] = None, sets: Optional[list[str]] = None,
             seed: int = 0, max_examples: Optional[int] = None, min_drop: float = MIN_DROP, progress: bool = False) -> dict:
    """Measure, per keep set of the finished run in ``run_dir``, the share of its forgetting that
    ``k`` examples and ``steps`` steps recover; writes and returns ``diagnose.json``'s content."""
    import forgetless

    if not min_drop >= 0:
        raise UserError(f"--min-drop {min_drop}: give a loss of score >= 0 (default {MIN_DROP})")
    root = Path(run_dir)
    if not (root / SUMMARY_FILE).is_file() or not (root / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir}: not a finished run directory (no {SUMMARY_FILE}); give the directory of a finished forgetless train run")
    if not (root / MODEL_DIR).is_dir():
        raise UserError(f"{run_dir}: the run saved no model (output.save_model was off); diagnose needs its final weights")
    if k < 1 or steps < 1:
        raise UserError(f"--k {k} / --steps {steps}: give at least 1 example and 1 step")
    cfg = load_config(root / CONFIG_FILE)
    summary = json.loads((root / SUMMARY_FILE).read_text(encoding="utf-8"))
    metrics = {name: info.get("metric") for name, info in summary.get("data", {}).items() if isinstance(info, dict) and info.get("role")}
    keep = {name: spec for name, spec in cfg.data.keep.items() if sets is None or name in sets}
    if sets:
        unknown = sorted(set(sets) - set(cfg.data.keep))
        if unknown:
            raise UserError(f"--set {unknown[0]}: the run has no keep set of that name; its keep sets: {', '.join(cfg.data.keep) or 'none'}")
    if not keep:
        raise UserError(f"{run_dir}: the run has no data.keep sets to diagnose")
    model_dir = _trainable_model(root / MODEL_DIR, root)
    work = root / "diagnose"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = _base_model(cfg, Path(tmp))
        for name, spec in keep.items():
            records = [r.data for r in load_records(dataclasses.replace(spec, max_drop=None))]
            if len(records) <= k:
                raise UserError(f"data.keep.{name}: {len(records)} records; diagnose needs more than --k {k} (k to train on, the rest to score)")
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(records), generator=g).tolist()
            shots, rest = [records[i] for i in sorted(order[:k])], [records[i] for i in sorted(order[k:])]
            rest = rest[: max_examples or cfg.eval.max_examples or len(rest)]
            shot_file, rest_file = Path(tmp) / f"{name}-shots.jsonl", Path(tmp) / f"{name}-rest.jsonl"
            for path, rows in ((shot_file, shots), (rest_file, rest)):
                path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows), encoding="utf-8")
            metric = spec.metric or metrics.get(name)
            # the records were read with the set's columns already mapped: the files hold forgetless's own fields
            as_spec = lambda path: dataclasses.replace(spec, path=str(path), split="train", subset=None, limit=None,  # noqa: E731
                                                       max_drop=None, metric=metric, columns={})
            options = dict(batch_size=cfg.eval.batch_size, generation=cfg.eval.generation, max_new_tokens=cfg.eval.max_new_tokens,
                           max_length=cfg.data.max_length, chat_template=cfg.data.chat_template, progress=progress,
                           dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
            start = forgetless.evaluate(base, {name: as_spec(rest_file)}, **options)[name]
            out = work / name
            few = load_config(None, [
                f"model.name_or_path={model_dir}", f"data.train={shot_file}", f"model.dtype={cfg.model.dtype}", f"data.max_length={cfg.data.max_length}",
                f"output.dir={out}", "output.overwrite=true", f"output.progress={'true' if progress else 'false'}",
                "output.checkpoint_every=0", "output.save_model=false", f"train.max_steps={steps}", f"train.lr={lr if lr is not None else cfg.train.lr}",
                f"train.micro_batch_size={k}", "train.warmup_steps=0", "train.scheduler=constant", f"train.seed={seed}",
                f"eval.generation={'true' if cfg.eval.generation else 'false'}", f"eval.batch_size={cfg.eval.batch_size}",
                f"data.completion_only_loss={'true' if cfg.data.completion_only_loss else 'false'}",
            ])
            few.data.train, few.data.keep = [as_spec(shot_file)], {name: as_spec(rest_file)}  # the keep set's own format and columns
            few.data.chat_template, few.data.chat_template_kwargs = cfg.data.chat_template, dict(cfg.data.chat_template_kwargs)
            few.eval.max_new_tokens = cfg.eval.max_new_tokens
            run = forgetless.train(few)
            final, recovered = run.before[name], run.after[name]
            higher = run.data[name]["higher_is_better"]
            share = recovered_share(start["score"], final["score"], recovered["score"], higher, min_drop)
            results[name] = {"metric": run.data[name]["metric"], "higher_is_better": run.data[name]["higher_is_better"],
                             "scored_examples": start["examples"], "start": start["score"], "final": final["score"],
                             "recovered": recovered["score"], "recovered_share": share, "verdict": verdict(share)}
    report = {"run": str(root), "k": k, "steps": steps, "lr": lr if lr is not None else cfg.train.lr, "seed": seed, "min_drop": min_drop,
              "formula": "(after recovery - final) / (start - final), on the keep set's examples not trained on",
              "sets": results}
    (root / DIAGNOSE_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _trainable_model(model_dir: Path, root: Path) -> str:
    """The run's final model as plain weights: a PEFT adapter is merged into a folder under the run."""
    if (model_dir / "adapter_config.json").is_file():
        from forgetless.models.merge import merge_model

        merged = root / "diagnose" / "merged-model"
        if not (merged / "config.json").is_file():
            if merged.exists():
                shutil.rmtree(merged)
            merged.parent.mkdir(parents=True, exist_ok=True)
            merge_model(model_dir, merged)
        return str(merged)
    from forgetless.models.adapters import ADAPTER_FILE

    if (model_dir / ADAPTER_FILE).is_file():
        raise UserError(f"{model_dir}: forgetless adapters (bottleneck, experts) cannot be trained further as plain weights; "
                        f"diagnose a full fine-tune or LoRA run")
    return str(model_dir)


def _base_model(cfg, tmp: Path) -> str:
    """What the run started from, as something forgetless.evaluate loads: 'tiny' is built from the
    run's shape and seed and saved to ``tmp``."""
    if cfg.model.name_or_path != "tiny":
        return cfg.model.name_or_path if not cfg.model.gguf_file else str(Path(cfg.model.name_or_path) / cfg.model.gguf_file)
    from forgetless.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(dataclasses.replace(cfg.model, dtype="float32"), tokenizer, seed=cfg.train.seed)
    model.save_pretrained(str(tmp / "base"), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp / "base"))
    return str(tmp / "base")


__all__ = ["DIAGNOSE_FILE", "MIN_DROP", "diagnose", "recovered_share", "verdict"]
