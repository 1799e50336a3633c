"""Saving the trained model of a run: weights in safetensors, with the tokenizer.

A plain model is saved whole (``from_pretrained`` loads it back). A model with adapters is saved
as its adapter plus a reference to its base model:

- a PEFT model in PEFT's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``),
  so ``PeftModel.from_pretrained(base, run/model)`` loads it;
- forgetless's own adapters (forgetless/models/adapters.py) by their kind's ``save``, next to
  ``forgetless_adapter.json``.

The base reference is the hub id or the absolute directory the base was loaded from, or the
absolute path of the ``.gguf`` file it was dequantized from (dequantizing is deterministic, so
it loads to the same weights again; forgetless loads such a run directly, plain PEFT
after loading the base itself: ``PeftModel.from_pretrained(base, run/model)``; ``forgetless
merge`` writes a standalone safetensors model). A base that exists nowhere on disk (the built-in
random-init ``tiny`` model, a model that was itself loaded from an adapter directory and merged,
or a GGUF file in a hub repo, which one string cannot name) is saved beside the adapter in
``base_model/`` and referenced by that relative name, which forgetless resolves against the
adapter directory, so a run directory can be moved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from forgetless.models.adapters import ADAPTER_FILE, ADAPTER_KINDS, is_peft_model
from forgetless.models.gguf import GGUF_SUFFIX

BASE_DIR = "base_model"


def save_model(model, tokenizer, out_dir: Path, cfg) -> None:
    """Write ``model`` and ``tokenizer`` to ``out_dir``; ``cfg`` (a RunConfig) says where the base came from."""
    out_dir = Path(out_dir)
    kinds = [k for k in ADAPTER_KINDS.values() if k.detect(model)]
    if not is_peft_model(model) and not kinds:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    else:
        save_adapter_model(model, tokenizer, out_dir, base_reference(cfg.model.name_or_path, cfg.model.gguf_file), cfg.model.revision)
    tokenizer.save_pretrained(str(out_dir))


def base_reference(name_or_path: str, gguf_file: Optional[str] = None) -> Optional[str]:
    """How a saved adapter can find its base again: a hub id, an absolute directory or .gguf file,
    or None when the base must be saved beside the adapter."""
    from forgetless.models.loading import model_gguf, resolve_model_dir

    if name_or_path == "tiny":
        return None
    gguf = model_gguf(name_or_path, gguf_file)
    if gguf is not None:
        return str(gguf.path.expanduser().resolve()) if gguf.local else None
    path = Path(resolve_model_dir(name_or_path)).expanduser()
    if not path.is_dir():
        return name_or_path  # a hub id
    if (path / "adapter_config.json").is_file() or (path / ADAPTER_FILE).is_file():
        return None  # base + loaded adapter (merged or trained further) is nowhere on disk as such
    return str(path.resolve())


def save_adapter_model(model, tokenizer, out_dir: Path, base_ref: Optional[str], revision: Optional[str] = None) -> None:
    """The adapter of ``model`` in ``out_dir``; with ``base_ref=None`` the base weights go to ``out_dir/base_model``."""
    out_dir = Path(out_dir)
    kinds = [k for k in ADAPTER_KINDS.values() if k.detect(model)]
    if len(kinds) + is_peft_model(model) != 1:
        raise ValueError("save_adapter_model: the model must carry exactly one kind of adapter")
    beside = base_ref is None
    from_gguf = not beside and base_ref.lower().endswith(GGUF_SUFFIX)
    if beside:
        save_base_model(model, tokenizer, out_dir / BASE_DIR)
        base_ref, revision = BASE_DIR, None
    if kinds:
        kinds[0].save(model, out_dir, base_ref)
        return
    # PEFT writes base_model_name_or_path from its config: point it at the reference for the save.
    peft_cfg = model.peft_config[model.active_adapter]
    before = (peft_cfg.base_model_name_or_path, peft_cfg.revision)
    peft_cfg.base_model_name_or_path, peft_cfg.revision = base_ref, revision
    try:
        # The base saved beside (or the GGUF file) has this model's vocabulary, so PEFT need not
        # compare vocabularies ("auto" would look "base_model" or the file's path up on the hub).
        model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False if beside or from_gguf else "auto")
    finally:
        peft_cfg.base_model_name_or_path, peft_cfg.revision = before


def save_base_model(model, tokenizer, out_dir: Path) -> None:
    """The base weights of an adapter model (adapters stripped) as a standalone model directory."""
    if is_peft_model(model):
        from peft import get_base_model_state_dict

        base, state = model.get_base_model(), get_base_model_state_dict(model)
    else:  # forgetless adapters add only parameters named after their kind's prefix, e.g. bottleneck_
        base = model
        prefixes = tuple(f"{k.name}_" for k in ADAPTER_KINDS.values())
        state = {k: v for k, v in model.state_dict().items() if not any(p in k for p in prefixes)}
    base.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
