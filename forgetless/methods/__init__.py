"""Anti-forgetting methods.

Each method is one module (or package) here that calls ``register(...)`` once at import; every
module of this package is imported below, so adding a method is adding a file.
"""

import importlib
import pkgutil

from forgetless.methods.base import Context, Method, Reference, TaskLink
from forgetless.registry import REGISTRY, check_combination, ordered, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["REGISTRY", "Context", "Method", "Reference", "TaskLink", "register", "build_methods", "check_combination"]


def build_methods(configs: dict) -> list[Method]:
    """Method objects for ``cfg.methods`` (name -> config dataclass), in wrapping order."""
    return [spec.build(configs[spec.name]) for spec in ordered(configs)]
