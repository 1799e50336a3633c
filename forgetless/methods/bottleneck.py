"""Bottleneck adapters (Houlsby / Pfeiffer): small residual MLPs after attention and/or MLP blocks.

Each adapted sub-layer output ``h`` (d wide) becomes ``h + W_up · f(W_down · h + b_down) + b_up``
with ``W_down ∈ R^{b×d}``, ``W_up ∈ R^{d×b}``, ``b = d / reduction_factor`` and ``f`` a
non-linearity; only the adapters train. ``W_up`` and ``b_up`` start at zero, so the adapted model
starts *exactly* equal to the base. Houlsby et al. (2019, "Parameter-Efficient Transfer Learning
for NLP", arXiv 1902.00751) place an adapter after both the attention and the MLP of every block
(``placement: both``); Pfeiffer et al. (2021, "AdapterFusion", arXiv 2005.00247) after the MLP
only (``placement: mlp``).

PEFT has no bottleneck adapters (huggingface/peft#244), so they are written here by hand: an
adapter is a child module ``bottleneck_adapter`` of the attention / MLP module it follows, applied
by a forward hook. The base model's own modules and parameter names stay untouched (its weights
save and load as usual), and every parameter added carries the ``bottleneck_`` prefix. The
adapter kind registered at the bottom saves, loads and disables them
(forgetless/models/adapters.py). The adapter is non-linear, so it cannot be folded into the base
weights: ``forgetless merge`` writes a model that transformers loads with ``trust_remote_code``,
this module's adapter code beside the weights (forgetless/models/export.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from forgetless.config import option
from forgetless.errors import ConfigError, UserError
from forgetless.methods.base import Context, Method
from forgetless.registry import register, ADAPT, ADAPTER, FREEZES_BASE, STARTS_AT_BASE
from forgetless.models.adapters import ADAPTER_FILE, AdapterKind, is_peft_model, register_adapter_kind, switched_off

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
ADAPTER_NAME = "bottleneck_adapter"  # the prefix of every parameter the method adds
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
CONFIG_FILE = "bottleneck_config.json"


@dataclass
class BottleneckConfig:
    """Residual bottleneck adapters after each block's attention and/or MLP."""

    placement: Literal["attention", "mlp", "both"] = option(
        "mlp", "Where adapters go: 'mlp' (Pfeiffer), 'both' (Houlsby), or 'attention' only."
    )
    reduction_factor: int = option(16, "Bottleneck width = hidden size / reduction_factor (ignored when size is set).")
    size: Optional[int] = option(None, "Bottleneck width; overrides reduction_factor.")
    activation: Literal["relu", "gelu", "silu"] = option("relu", "Non-linearity between the down and up projections.")
    layers: list[int] = option(factory=list, help="Add adapters only to these transformer blocks (indices); empty = all blocks.")

    def validate(self, where: str) -> None:
        if self.reduction_factor < 1:
            raise ConfigError(f"{where}.reduction_factor must be at least 1, got {self.reduction_factor}")
        if self.size is not None and self.size < 1:
            raise ConfigError(f"{where}.size must be at least 1, got {self.size}")
        if any(i < 0 for i in self.layers):
            raise ConfigError(f"{where}.layers: block indices must be >= 0, got {self.layers}")


class BottleneckAdapter(nn.Module):
    """``h + up(f(down(h)))``; ``up`` starts at zero, so the adapter starts as the identity."""

    def __init__(self, hidden: int, size: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation = activation
        self.enabled = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return h
        return h + self.up(getattr(nn.functional, self.activation)(self.down(h)))


def _apply_adapter(module: nn.Module, args, output):
    """Forward hook: attention modules return tuples; the adapter acts on the hidden states only."""
    adapter = getattr(module, ADAPTER_NAME)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def insert_adapters(model, modules: list[str], hidden: int, size: int, activation: str) -> None:
    """Attach an adapter after each named module (qualified names), on its parameters' device and dtype."""
    for name in modules:
        target = model.get_submodule(name)
        ref = next(target.parameters())
        target.add_module(ADAPTER_NAME, BottleneckAdapter(hidden, size, activation).to(device=ref.device, dtype=ref.dtype))
        target.register_forward_hook(_apply_adapter)


def adapted_modules(model, placement: str, layers: list[int]) -> list[str]:
    """Qualified names of the attention / MLP modules of the chosen blocks."""
    from forgetless.methods.freeze import find_blocks

    try:
        prefix, n_blocks = find_blocks(model)
    except ConfigError:
        raise ConfigError("methods.bottleneck: could not find the model's transformer blocks (a ModuleList of num_hidden_layers)") from None
    if layers and max(layers) >= n_blocks:
        raise ConfigError(f"methods.bottleneck.layers: block {max(layers)} does not exist; the model has blocks 0-{n_blocks - 1}")
    wanted = {"attention": [ATTENTION_NAMES], "mlp": [MLP_NAMES], "both": [ATTENTION_NAMES, MLP_NAMES]}[placement]
    out = []
    for i in sorted(set(layers)) if layers else range(n_blocks):
        block = model.get_submodule(f"{prefix}.{i}")
        children = dict(block.named_children())
        for names in wanted:
            found = next((n for n in names if n in children), None)
            if found is None:
                raise ConfigError(
                    f"methods.bottleneck: block {type(block).__name__} has no sub-module named {' / '.join(names)} "
                    f"(its children: {', '.join(children)}); choose another placement or model"
                )
            out.append(f"{prefix}.{i}.{found}")
    return out


def hidden_size(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ConfigError("methods.bottleneck: the model config gives no hidden size (hidden_size / n_embd / d_model)")


def has_bottleneck(model) -> bool:
    return any(isinstance(m, BottleneckAdapter) for m in model.modules())


class Bottleneck(Method):
    name = "bottleneck"

    def __init__(self, cfg: BottleneckConfig):
        self.cfg = cfg
        self.facts: dict = {}

    def wrap_model(self, model, ctx: Context):
        cfg = self.cfg
        if is_peft_model(model):
            raise ConfigError("methods.bottleneck: the model is a PEFT adapter model; merge it first (forgetless merge) or train it with methods.lora")
        # A model loaded from a bottleneck run keeps training its adapters (its saved options win).
        continued = has_bottleneck(model)
        if not continued:
            d = hidden_size(model)
            size = cfg.size or max(1, d // cfg.reduction_factor)
            insert_adapters(model, adapted_modules(model, cfg.placement, cfg.layers), d, size, cfg.activation)
        for name, p in model.named_parameters():
            p.requires_grad_(ADAPTER_NAME in name)
        settings = _settings(model)
        self.facts = {
            **({"continued": True} if continued else {"placement": cfg.placement}),
            "size": settings["size"],
            "activation": settings["activation"],
            "adapted_modules": len(settings["modules"]),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        return model

    def describe(self) -> dict:
        return dict(self.facts)


def _settings(model) -> dict:
    """Everything needed to rebuild the adapters on a fresh base model."""
    found = [(n.rsplit(".", 1)[0], m) for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]
    first = found[0][1]
    return {"hidden_size": first.down.in_features, "size": first.down.out_features, "activation": first.activation, "modules": [n for n, _ in found]}


def _disabled(model):
    return switched_off(m for m in model.modules() if isinstance(m, BottleneckAdapter))


def _save(model, out_dir, base_ref) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ADAPTER_NAME in k}
    save_file(weights, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(_settings(model), indent=2), encoding="utf-8")
    (out / ADAPTER_FILE).write_text(json.dumps({"kind": "bottleneck", "base_model": str(base_ref)}, indent=2), encoding="utf-8")


def _load(base, adapter_dir):
    from safetensors.torch import load_file

    path = Path(adapter_dir)
    try:
        s = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(path / WEIGHTS_FILE))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable bottleneck adapter ({e.__class__.__name__}: {str(e).splitlines()[0][:160]})") from None
    try:
        insert_adapters(base, s["modules"], s["hidden_size"], s["size"], s["activation"])
    except AttributeError:
        raise UserError(f"{path}: its adapters do not fit the base model (no module {s['modules'][0]!r}); check base_model in {ADAPTER_FILE}") from None
    missing, unexpected = base.load_state_dict(weights, strict=False)
    missing = [k for k in missing if ADAPTER_NAME in k]
    if missing or unexpected:
        raise UserError(f"{path}: {WEIGHTS_FILE} does not match {CONFIG_FILE} ({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    return base


def attach(model, settings: dict) -> None:
    """Rebuild the adapters of ``settings`` (:func:`_settings`) on ``model`` (the exported model's code)."""
    insert_adapters(model, settings["modules"], settings["hidden_size"], settings["size"], settings["activation"])


def _export(model) -> tuple[str, dict]:
    """forgetless merge: this module's adapter code, to run with transformers alone (forgetless/models/export.py)."""
    from forgetless.models.export import sources

    code = sources(f"ADAPTER_NAME = {ADAPTER_NAME!r}", BottleneckAdapter, _apply_adapter, insert_adapters, attach)
    return code, _settings(model)


register_adapter_kind(AdapterKind("bottleneck", detect=has_bottleneck, disable=_disabled, save=_save, load=_load, export=_export))
register(
    "bottleneck",
    BottleneckConfig,
    Bottleneck,
    "Bottleneck adapters (Houlsby / Pfeiffer): small residual MLPs after attention and/or MLP; the base stays frozen.",
    phase=ADAPT,
    provides={
        ADAPTER: "",
        FREEZES_BASE: "bottleneck adapters freeze every base weight themselves, so freeze's choice would be silently "
        "overridden; pick blocks with methods.bottleneck.layers",
        STARTS_AT_BASE: "",
    },
    prefix="bottleneck_adapter",
)
