"""``forgetless merge``: turn an adapter run into a standalone model directory.

- LoRA (any variant: lora, rslora, dora): PEFT's ``merge_and_unload()`` folds the update into the
  base weights (``W + s·BA``, or DoRA's re-normalised weight); the result is a plain model that
  ``AutoModelForCausalLM.from_pretrained`` loads, with the same outputs as base + adapter.
- Bottleneck adapters: ``h + up(f(down(h)))`` is non-linear in ``h``, so it cannot be folded into
  the base's linear weights. The output is a self-contained directory instead: the base weights
  (``base_model/``) plus the adapter, which forgetless loads (``forgetless eval``, ``load_model``);
  it no longer depends on where the base came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from forgetless.config import ModelConfig
from forgetless.errors import UserError
from forgetless.models.adapters import ADAPTER_FILE
from forgetless.models.loading import load_model, load_tokenizer, resolve_model_dir


def merge_model(model_or_run_dir: Union[str, Path], out_dir: Union[str, Path]) -> str:
    """Write a standalone model for the adapter in ``model_or_run_dir`` (a run or its ``model/``
    folder) to ``out_dir``; returns a one-line description of what was written."""
    src = Path(resolve_model_dir(str(model_or_run_dir))).expanduser()
    out = Path(out_dir).expanduser()
    if not src.is_dir():
        raise UserError(f"merge: {model_or_run_dir} is not a directory; give a run directory or its model/ folder")
    is_peft, is_own = (src / "adapter_config.json").is_file(), (src / ADAPTER_FILE).is_file()
    if not (is_peft or is_own):
        raise UserError(f"merge: {src} holds no adapter (no adapter_config.json or {ADAPTER_FILE}); it is already a standalone model")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"merge: output {out} already exists and is not empty; choose another --output or remove it")
    if out.resolve() == src.resolve():
        raise UserError("merge: the output must differ from the adapter directory")
    # dtype "auto": a merged model keeps the checkpoint's dtype instead of growing to float32.
    cfg = ModelConfig(name_or_path=str(src), dtype="auto")
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    if is_peft:
        return _merge_peft(model, tokenizer, out, src)
    from forgetless.models.adapters import ADAPTER_KINDS
    from forgetless.registry import load_sources

    load_sources()  # the methods' modules register their adapter kinds
    name = _read_kind(src)
    kind = ADAPTER_KINDS[name]
    if kind.fold is not None:
        plain = kind.fold(model)
        plain.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        return f"folded the {name} adapters of {src} into the base weights; wrote the standalone model to {out}"
    if kind.export is None:  # pragma: no cover (every kind of forgetless's has one of the two)
        raise UserError(f"merge: {name} adapters can be neither folded nor exported")
    from forgetless.models.export import export_remote_code

    code, settings = kind.export(model)
    export_remote_code(model, tokenizer, out, name, code, settings)
    return (
        f"{name} adapters are non-linear and cannot be folded into the base's linear weights; wrote {out}, a standalone "
        f"model with its adapter code, which transformers loads with trust_remote_code=True (no forgetless needed)"
    )


def _merge_peft(model, tokenizer, out: Path, src: Path) -> str:
    peft_type = str(getattr(model.peft_config[model.active_adapter], "peft_type", "")).rsplit(".", 1)[-1]
    if not hasattr(model, "merge_and_unload") or peft_type.upper() != "LORA":
        raise UserError(f"merge: {src} holds a {peft_type or 'PEFT'} adapter; only LoRA adapters (lora, dora, rslora) can be merged")
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return f"merged the LoRA adapter of {src} into its base weights; wrote the standalone model to {out}"


def _read_kind(src: Path) -> str:
    import json

    return json.loads((src / ADAPTER_FILE).read_text(encoding="utf-8")).get("kind", "forgetless")
