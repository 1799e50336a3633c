"""Loading models and tokenizers: the built-in tiny model, a local directory, a hub id, or a GGUF file.

All loading goes through ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` (and PEFT for
adapter directories; GGUF files through transformers' GGUF support, forgetless.models.gguf); this
module only decides *what* to load and turns failures into one-line :class:`UserError` messages.
"""

from __future__ import annotations

from pathlib import Path
from pickle import UnpicklingError  # only to name the error: weights are never unpickled beyond tensors
from typing import Optional

import torch

from forgetless.config import ModelConfig
from forgetless.errors import UserError
from forgetless.files import CONFIG_FILE, MODEL_DIR
from forgetless.models.adapters import ADAPTER_FILE
from forgetless.models.gguf import GgufSource, gguf_source, load_gguf_model, load_gguf_tokenizer

_REFUSED_PICKLE = (
    "model {name!r}: a .bin weights file holds more than tensors (pickled code), so it was not loaded; "
    "use safetensors weights, or convert the file yourself if you trust its source"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_dir(name_or_path: str) -> str:
    """A run directory points at its ``model/`` folder; anything else is returned unchanged."""
    p = Path(name_or_path)
    if (p / MODEL_DIR).is_dir() and (p / CONFIG_FILE).is_file():
        return str(p / MODEL_DIR)
    return name_or_path


def model_gguf(name_or_path: str, gguf_file: Optional[str] = None) -> Optional[GgufSource]:
    """The GGUF file a model config names (``name_or_path`` a .gguf file, or a folder / hub repo with
    ``gguf_file``), or None. A run directory names its saved ``model/``, never a GGUF."""
    if name_or_path == "tiny" or resolve_model_dir(name_or_path) != name_or_path:
        return None
    return gguf_source(name_or_path, gguf_file)


def _check_local(name: str) -> Optional[Path]:
    """The local directory ``name`` names, None for a hub id, or a UserError if it is missing."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise UserError(f"model {name!r}: is a file, not a model directory; give the folder holding config.json")
    # "org/name" is a hub id; anything more path-like that does not exist is a typo.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model {name!r}: directory not found; check the path, or give a hub id like 'org/name'")
    return None


def _check_weights(local: Path, name: str) -> None:
    """A local model directory must hold config.json and weights transformers can load safely.

    safetensors are preferred; a ``pytorch_model.bin`` is a pickle, which transformers reads
    with ``torch.load(weights_only=True)`` (tensors only, no code), so it is accepted too.
    """
    if not (local / "config.json").is_file():
        raise UserError(f"model {name!r}: no config.json in the directory; give the folder a model was saved to (save_pretrained)")
    if not any(local.glob("*.safetensors")) and not any(local.glob("pytorch_model*.bin")):
        raise UserError(
            f"model {name!r}: no weights in the directory (model.safetensors or pytorch_model.bin); "
            f"copy the weights there, or point model.name_or_path at the folder that holds them"
        )


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of ``cfg``, with a pad token."""
    from transformers import AutoTokenizer

    if cfg.name_or_path == "tiny":
        from forgetless.models.tiny import load_tiny_tokenizer

        tok = load_tiny_tokenizer()
    elif (src := model_gguf(cfg.name_or_path, cfg.gguf_file)) is not None:
        tok = load_gguf_tokenizer(src, cfg.revision, cfg.trust_remote_code)
    else:
        name = resolve_model_dir(cfg.name_or_path)
        local = _check_local(name)
        try:
            tok = AutoTokenizer.from_pretrained(
                str(local or name),
                revision=cfg.revision,
                trust_remote_code=cfg.trust_remote_code,
                local_files_only=local is not None,
            )
        except (OSError, ValueError) as e:
            raise UserError(f"model {name!r}: could not load its tokenizer ({_first_line(e)}); check the id or path, and the network for hub ids") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, tokenizer, seed: int = 0):
    """The causal LM of ``cfg``. A PEFT adapter directory loads onto its base model."""
    from transformers import AutoModelForCausalLM

    if cfg.load_in_4bit and (cfg.name_or_path == "tiny" or model_gguf(cfg.name_or_path, cfg.gguf_file) is not None):
        raise UserError("model.load_in_4bit quantises a pretrained safetensors checkpoint while loading; the tiny model and "
                        ".gguf files cannot be loaded that way (use a hub id or a model folder)")
    if cfg.name_or_path == "tiny":
        from forgetless.models.tiny import build_tiny_model

        model = build_tiny_model(cfg.tiny, tokenizer, seed, cfg.attn_implementation)
        model = model.to(_DTYPES[cfg.dtype]) if cfg.dtype != "auto" else model
        return model.to(cfg.device_map) if cfg.device_map not in (None, "auto") else model
    src = model_gguf(cfg.name_or_path, cfg.gguf_file)
    if src is not None:
        model = load_gguf_model(src, _DTYPES[cfg.dtype], cfg.revision, cfg.trust_remote_code, **_placement(cfg))
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model
    name = resolve_model_dir(cfg.name_or_path)
    local = _check_local(name)
    if local is not None and (local / "adapter_config.json").is_file():
        return _load_adapter(local, cfg)
    if local is not None and (local / ADAPTER_FILE).is_file():
        return _load_forgetless_adapter(local, cfg)
    if local is not None:
        _check_weights(local, name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(local or name),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=_DTYPES[cfg.dtype],
            local_files_only=local is not None,
            weights_only=True,  # a .bin checkpoint is read as tensors only, never as arbitrary pickle
            **{**_placement(cfg), **_quantization(cfg)},
        )
    except UnpicklingError:
        raise UserError(_REFUSED_PICKLE.format(name=name)) from None
    except (OSError, ValueError) as e:
        raise UserError(f"model {name!r}: could not load it ({_first_line(e)}); check the id or path, and the network for hub ids") from None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _quantization(cfg: ModelConfig) -> dict:
    """QLoRA's 4-bit base (Dettmers et al. 2023): NF4 weights, double quantisation, bfloat16 compute."""
    if not cfg.load_in_4bit:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("model.load_in_4bit needs bitsandbytes: pip install bitsandbytes (on a machine with a CUDA GPU)") from None
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                      bnb_4bit_compute_dtype=torch.bfloat16),
            "device_map": cfg.device_map or {"": torch.cuda.current_device()}}


def _placement(cfg: ModelConfig) -> dict:
    """The loading options transformers takes as given (attention kernel, device map), where set."""
    out = {}
    if cfg.attn_implementation is not None:
        out["attn_implementation"] = cfg.attn_implementation
    if cfg.device_map is not None:
        out["device_map"] = cfg.device_map
    return out


def _base_config(cfg: ModelConfig, name: str, revision: Optional[str]) -> ModelConfig:
    """The config of an adapter's base: its name, and the user's loading options."""
    import dataclasses

    return dataclasses.replace(cfg, name_or_path=name, revision=revision, gguf_file=None)


def _load_adapter(path: Path, cfg: ModelConfig):
    """Load a PEFT adapter saved by forgetless (or PEFT) together with its base model."""
    from peft import PeftConfig, PeftModel

    peft_cfg = PeftConfig.from_pretrained(str(path))
    base_name = peft_cfg.base_model_name_or_path
    if not base_name:
        raise UserError(f"{path}: adapter_config.json names no base model (base_model_name_or_path); set it to the base's hub id or directory")
    # A relative base (e.g. "base_model", saved beside the adapter) is relative to the adapter
    # directory, so a run directory can be moved.
    beside = path / base_name
    if not Path(base_name).is_absolute() and beside.is_dir():
        base_name = str(beside)
    base_cfg = _base_config(cfg, base_name, peft_cfg.revision or cfg.revision)
    base = load_model(base_cfg, load_tokenizer(base_cfg))
    try:
        return PeftModel.from_pretrained(base, str(path))
    except UnpicklingError:
        raise UserError(_REFUSED_PICKLE.format(name=str(path))) from None


def _load_forgetless_adapter(path: Path, cfg: ModelConfig):
    """Load an adapter kind of forgetless's own (see forgetless.models.adapters) onto its base."""
    import json

    from forgetless.models.adapters import ADAPTER_KINDS
    from forgetless.registry import load_sources

    load_sources()  # the methods' modules register their adapter kinds

    meta = json.loads((path / ADAPTER_FILE).read_text(encoding="utf-8"))
    kind = ADAPTER_KINDS.get(meta.get("kind"))
    if kind is None:
        raise UserError(f"{path}: unknown adapter kind {meta.get('kind')!r} in {ADAPTER_FILE}")
    base_ref = meta["base_model"]
    base_path = Path(base_ref) if Path(base_ref).is_absolute() else path / base_ref
    base_cfg = _base_config(cfg, str(base_path) if base_path.exists() else base_ref, cfg.revision)
    base = load_model(base_cfg, load_tokenizer(base_cfg))
    return kind.load(base, path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
