"""The model card of a run's ``model/``: README.md with the hub's YAML metadata and what was kept.

The metadata (``base_model``, ``library_name``, ``datasets``, ``tags``, ``pipeline_tag``) is written
with ``huggingface_hub.ModelCardData``, so the hub shows the model's lineage; the body carries the
before/after table of every eval and keep set (the run's forgetting, which no other card has),
how the model was trained, how to load it, and what a serving engine cannot take.

A base or dataset given as a local path is named by its folder or file name only: a card is made
to be shared, and where files lay on the training machine says nothing to its readers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

CARD_FILE = "README.md"


def _hub_id(name: str) -> Optional[str]:
    """``name`` when it is a hub id ("org/name"), else None (a local path, 'tiny', demo: data)."""
    if not name or name == "tiny" or name.startswith(("demo:", ".", "/", "~")) or Path(name).expanduser().exists():
        return None
    return name if name.count("/") == 1 else None


def _shown(name: str) -> str:
    """How a card names a model or dataset: a hub id as it is, a local path by its last part."""
    return name if _hub_id(name) or name == "tiny" or name.startswith("demo:") else Path(name).name


def serving_notes(model) -> list[str]:
    """What vLLM / TGI cannot serve as a LoRA adapter of this model, one sentence each (empty: nothing)."""
    from forgetless.models.adapters import ADAPTER_KINDS, is_peft_model

    notes = []
    if is_peft_model(model):
        cfg = model.peft_config[model.active_adapter]
        if getattr(cfg, "use_dora", False):
            notes.append("DoRA adapters are not served as LoRA by vLLM or TGI; serve the merged model (forgetless merge)")
        if getattr(cfg, "modules_to_save", None):
            notes.append(f"modules_to_save ({', '.join(sorted(cfg.modules_to_save))}) are full copies of layers, which vLLM's and TGI's "
                         f"LoRA loaders do not take; serve the merged model (forgetless merge)")
    for kind in ADAPTER_KINDS.values():
        if kind.detect(model):
            notes.append(f"forgetless's {kind.name} adapters are no LoRA a serving engine knows; `forgetless merge` turns them into "
                         f"a standalone model ({'plain weights' if kind.fold else 'transformers with trust_remote_code'})")
    return notes


def model_card(cfg, before: dict, after: dict, roles: dict, train_info: dict, data_info: dict, *, peft: bool, adapter: bool,
               notes: list[str], base_beside: bool = False) -> str:
    """The README.md text of a run's model: ``before`` / ``after`` are the scores of every set, as in summary.json."""
    from huggingface_hub import ModelCard, ModelCardData

    import forgetless

    base = cfg.model.name_or_path
    datasets = [d for d in (_hub_id(s.path) for s in cfg.data.train) if d]
    methods = list(train_info.get("methods", {}))
    data = ModelCardData(
        base_model=_hub_id(base),
        library_name="peft" if peft else "transformers",
        datasets=datasets or None,
        tags=list(dict.fromkeys(["forgetless", "catastrophic-forgetting", *methods])),
        pipeline_tag="text-generation",
    )
    lines = [
        f"# {Path(cfg.output.dir).name}",
        "",
        f"Fine-tuned from `{_shown(base)}` with forgetless {forgetless.__version__}"
        + (f", methods: {', '.join(f'`{m}`' for m in methods)}." if methods else ", plain fine-tuning."),
        "",
        "## What it learned, and what it kept",
        "",
        "Every set was scored before training (the base model) and after. *learn* sets are the new task; "
        "*keep* sets are what the model must not forget.",
        "",
        "| set | role | score (metric) | before | after | change | loss before | loss after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, role in roles.items():
        b, a = before.get(name, {}), after.get(name, {})
        change = a["score"] - b["score"] if a.get("score") is not None and b.get("score") is not None else None
        metric = data_info.get(name, {}).get("metric") or "score"
        lines.append(
            f"| {name} | {'learn' if role == 'new' else 'keep'} | {metric} | {_num(b.get('score'))} | {_num(a.get('score'))} | "
            f"{_change(change)} | {_num(b.get('loss'))} | {_num(a.get('loss'))} |"
        )
    t = train_info
    lines += [
        "",
        "## Training",
        "",
        f"- data: {', '.join(f'`{_shown(s.path)}`' for s in cfg.data.train)}",
        f"- {t.get('steps')} optimiser steps, {t.get('tokens', 0):,} tokens, global batch {t.get('global_batch')}, "
        f"learning rate {cfg.train.lr:g} ({cfg.train.scheduler}), seed {cfg.train.seed}",
        f"- trainable parameters: {t.get('trainable_params', 0):,} of {t.get('total_params', 0):,}",
        f"- precision: weights {cfg.model.dtype}, mixed precision {cfg.train.mixed_precision}",
        "",
        "## Use",
        "",
        "```python",
        *_load_snippet(peft, adapter, base_beside),
        "```",
    ]
    if notes:
        lines += ["", "## Serving", ""] + [f"- {n}." for n in notes]
    lines.append("")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _load_snippet(peft: bool, adapter: bool, base_beside: bool) -> list[str]:
    if not adapter:
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")', 'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")']
    if peft and base_beside:  # the base is in the base_model/ folder beside the adapter
        return ["from huggingface_hub import snapshot_download", "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM", "",
                'path = snapshot_download("REPO")  # or a run\'s model/ folder',
                'base = AutoModelForCausalLM.from_pretrained(f"{path}/base_model")',
                "model = PeftModel.from_pretrained(base, path)",
                "merged = model.merge_and_unload()  # or: forgetless merge RUN_DIR -o merged/"]
    if peft:
        return ["from peft import AutoPeftModelForCausalLM", "", 'model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO")',
                "merged = model.merge_and_unload()  # or: forgetless merge RUN_DIR -o merged/"]
    return ["# forgetless's own adapters: load them with forgetless, or merge them into a standalone model",
            "#   forgetless merge RUN_DIR -o merged/", "import forgetless", "from forgetless.config import ModelConfig",
            "from forgetless.models import load_model, load_tokenizer", "",
            'cfg = ModelConfig(name_or_path="PATH")', "model = load_model(cfg, load_tokenizer(cfg))"]


def _num(v: Any) -> str:
    return "" if v is None else f"{v:.4f}"


def _change(v: Any) -> str:
    return "" if v is None else f"{v:+.4f}"


def write_model_card(model_dir: Path, cfg, before: dict, after: dict, roles: dict, train_info: dict, data_info: dict,
                     notes: list[str]) -> Path:
    """``model_dir``/README.md for the run described by the arguments (those of summary.json)."""
    from forgetless.models.adapters import ADAPTER_FILE

    model_dir = Path(model_dir)
    peft = (model_dir / "adapter_config.json").is_file()
    adapter = peft or (model_dir / ADAPTER_FILE).is_file()
    path = model_dir / CARD_FILE
    from forgetless.models.saving import BASE_DIR

    text = model_card(cfg, before, after, roles, train_info, data_info, peft=peft, adapter=adapter, notes=notes,
                      base_beside=(model_dir / BASE_DIR).is_dir())
    path.write_text(text, encoding="utf-8")
    return path
