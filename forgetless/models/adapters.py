"""What forgetless needs to know about adapter models, whatever added the adapters.

- :func:`adapters_disabled`: a context in which the model computes its *base* outputs, without a
  second copy of the weights (PEFT's ``disable_adapter()``; forgetless's own adapters register a
  disabler here). Distillation to the base model uses it.
- :data:`ADAPTER_KINDS`: how to save and load adapters that PEFT does not know. A saved adapter
  directory holds ``forgetless_adapter.json`` (``{"kind": ..., "base_model": ...}``) and the kind's
  own files; :func:`forgetless.models.loading.load_model` dispatches on the kind.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional

ADAPTER_FILE = "forgetless_adapter.json"


@dataclass
class AdapterKind:
    name: str
    detect: Callable[[Any], bool]  # does this model carry adapters of this kind?
    disable: Callable[[Any], ContextManager]  # base outputs inside the context
    save: Callable[[Any, Any, Any], None]  # (model, out_dir, base_ref) -> None
    load: Callable[[Any, Any], Any]  # (base_model, adapter_dir) -> model with adapters
    # forgetless merge: a kind linear in the weights folds its update into them, (model) -> plain model;
    # a non-linear one exports itself as code, (model) -> (python source defining attach(model, settings), settings)
    fold: Optional[Callable[[Any], Any]] = None
    export: Optional[Callable[[Any], tuple[str, dict]]] = None


ADAPTER_KINDS: dict[str, AdapterKind] = {}


def register_adapter_kind(kind: AdapterKind) -> None:
    ADAPTER_KINDS[kind.name] = kind


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def has_adapters(model) -> bool:
    return is_peft_model(model) or any(k.detect(model) for k in ADAPTER_KINDS.values())


@contextmanager
def switched_off(modules) -> Iterator[None]:
    """Inside the context the given adapter modules (each with an ``enabled`` flag) add nothing."""
    modules = list(modules)
    states = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, state in zip(modules, states):
            m.enabled = state


@contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Run ``model`` as the model its training run started from: its base model, or, for adapter
    kinds that keep earlier tasks' frozen adapters next to a training one (olora, expansion), the
    base plus those. Inference-only models (nothing trains) run as their base."""
    with ExitStack() as stack:
        if is_peft_model(model):
            stack.enter_context(model.disable_adapter())
        for kind in ADAPTER_KINDS.values():
            if kind.detect(model):
                stack.enter_context(kind.disable(model))
        yield


# ------------------------------------------------------------------------------------------------
# PEFT's target_modules, as every PEFT-backed method (lora, osf) takes them
# ------------------------------------------------------------------------------------------------


def check_target_modules(targets: list[str], where: str) -> None:
    """One-line ConfigErrors for a ``target_modules`` list before the model is loaded."""
    from forgetless.errors import ConfigError

    if not targets:
        raise ConfigError(f"{where}.target_modules is empty; give layer names like [q_proj, v_proj] or 'all-linear'")
    if "all-linear" in targets and len(targets) > 1:
        raise ConfigError(f"{where}.target_modules: 'all-linear' cannot be combined with names; give one or the other")


def peft_targets(targets: list[str]):
    """The ``target_modules`` value for a PEFT config: PEFT's own 'all-linear' string, or the names."""
    return "all-linear" if list(targets) == ["all-linear"] else list(targets)


def wrap_peft(model, peft_cfg, where: str):
    """``get_peft_model``, with PEFT's error for targets that match nothing as one ConfigError
    naming ``where.target_modules``."""
    from peft import get_peft_model

    from forgetless.errors import ConfigError

    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise ConfigError(f"{where}.target_modules: {first}; check the names against the model's linear layers") from None


def wrapped_target_names(model) -> list[str]:
    """The distinct layer names a PEFT model's adapter wraps (PEFT expands 'all-linear' into
    qualified names; the short names read better in a summary)."""
    return sorted({t.rsplit(".", 1)[-1] for t in model.peft_config["default"].target_modules})
