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

Two kinds of PEFT model are saved otherwise:

- a LoRA whose init moved part of the base into the adapter (PiSSA, CorDA, OLoRA:
  ``W = W_res + s·B₀A₀``, see forgetless/methods/lora.py) carries its initial adapter under
  :data:`INITIAL_ADAPTER`; it is saved converted to a plain LoRA of rank ``2r`` on the original base
  (PEFT's ``path_initial_model_for_weight_conversion``: ``A' = [A; A₀]``, ``B' = [B, −B₀]``), and a base
  saved beside is the original ``W_res + s·B₀A₀``, not the residual;
- a tuner that reparametrises whole weight matrices (:data:`FOLDED_PEFT_TYPES`, PEFT's OSF: its
  trainable factors are as large as the weights) is folded into dense weights and saved as a plain
  model, which any loader reads.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from forgetless.models.adapters import ADAPTER_FILE, ADAPTER_KINDS, is_peft_model
from forgetless.models.gguf import GGUF_SUFFIX

BASE_DIR = "base_model"
# Attribute of a PEFT LoRA model: its adapter's state dict at init (PEFT's keys, on the CPU), set where the
# init moved part of the base weights into the adapter.
INITIAL_ADAPTER = "forgetless_initial_adapter"
FOLDED_PEFT_TYPES = ("OSF",)  # PEFT tuners saved folded into dense weights


def peft_type(model) -> str:
    """PEFT's name of the model's tuner ('LORA', 'OSF', ...); '' for a model without PEFT."""
    if not is_peft_model(model):
        return ""
    return str(getattr(model.peft_config[model.active_adapter], "peft_type", "")).rsplit(".", 1)[-1].upper()


def save_model(model, tokenizer, out_dir: Path, cfg) -> None:
    """Write ``model`` and ``tokenizer`` to ``out_dir``; ``cfg`` (a RunConfig) says where the base came from."""
    out_dir = Path(out_dir)
    kinds = [k for k in ADAPTER_KINDS.values() if k.detect(model)]
    if not is_peft_model(model) and not kinds:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    elif peft_type(model) in FOLDED_PEFT_TYPES:
        save_folded_model(model, out_dir)
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
        embeddings = False if beside or from_gguf else "auto"
        initial = getattr(model, INITIAL_ADAPTER, None)
        if initial is None:
            model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=embeddings)
        else:
            _save_converted(model, out_dir, initial, embeddings)
    finally:
        peft_cfg.base_model_name_or_path, peft_cfg.revision = before


def _save_converted(model, out_dir: Path, initial: dict, embeddings) -> None:
    """PEFT's conversion of a PiSSA / CorDA / OLoRA adapter into a plain LoRA: it reads the initial
    adapter from a folder (written here, for the duration of the save) and loads it as a second adapter,
    whose random init must not move the run's random streams."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT warns that the loaded initial adapter changes the base (what the conversion undoes), and that a
        # relative base reference is no hub id while it compares vocabularies (the model's own: nothing to compare).
        warnings.filterwarnings("ignore", message=r".*(changes the base weights|Could not find a config file|Unable to fetch remote file)")
        initial_dir = Path(tmp) / "initial"
        initial_dir.mkdir()
        save_file({k: v.contiguous() for k, v in initial.items()}, str(initial_dir / "adapter_model.safetensors"))
        peft_cfg = model.peft_config[model.active_adapter]
        corda, peft_cfg.corda_config = peft_cfg.corda_config, None  # the converted adapter is a plain LoRA
        try:
            model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=embeddings,
                                  path_initial_model_for_weight_conversion=str(initial_dir))
        finally:
            peft_cfg.corda_config = corda


def save_base_model(model, tokenizer, out_dir: Path) -> None:
    """The base weights of an adapter model (adapters stripped) as a standalone model directory."""
    if is_peft_model(model):
        initial = getattr(model, INITIAL_ADAPTER, None)
        base, state = model.get_base_model(), base_state_plus(model, None if initial is None else _initial_delta(initial))
    else:  # forgetless adapters add only parameters named after their kind's prefix, e.g. bottleneck_
        base = model
        prefixes = tuple(f"{k.name}_" for k in ADAPTER_KINDS.values())
        state = {k: v for k, v in model.state_dict().items() if not any(p in k for p in prefixes)}
    base.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def base_state_plus(model, delta: Optional[Callable]) -> dict[str, torch.Tensor]:
    """The base model's state dict (its own keys) of a PEFT model, with ``delta(name, layer)`` (a tensor, or
    None) added to the weight of each adapted layer; ``delta`` None: the base weights as they are."""
    from peft import get_base_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = get_base_model_state_dict(model)
    if delta is None:
        return state
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, BaseTunerLayer) and (d := delta(name, layer)) is not None:
            key = f"{name}.weight"
            state[key] = (state[key].float() + d.detach().float().to(state[key].device)).to(state[key].dtype)
    return state


def _initial_delta(initial: dict) -> Callable:
    """``s·B₀A₀`` of each layer: what the init took out of its base weight."""
    from peft.utils.other import transpose

    def delta(name, layer):
        a, b = initial.get(f"base_model.model.{name}.lora_A.weight"), initial.get(f"base_model.model.{name}.lora_B.weight")
        if a is None:
            return None
        return transpose(b.float() @ a.float(), layer.fan_in_fan_out) * layer.scaling[layer.active_adapters[0]]

    return delta


def save_folded_model(model, out_dir: Path) -> None:
    """A reparametrising PEFT tuner (OSF) folded into dense weights (``W + ΔW`` per layer, PEFT's own
    delta), saved as a plain model; the model in memory is left as it is."""
    adapter = model.active_adapter
    state = base_state_plus(model, lambda name, layer: layer.get_delta_weight(adapter))
    model.get_base_model().save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
