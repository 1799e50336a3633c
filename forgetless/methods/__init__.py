"""Anti-forgetting methods.

Each method is one module (or package) here that calls ``register(...)`` once at import; every
module of this package is imported below, so adding a method is adding a file.
"""

import importlib
import pkgutil

from forgetless.methods.base import REGISTRY, Context, Method, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["REGISTRY", "Context", "Method", "register", "build_methods", "check_combination"]


def check_combination(configs: dict) -> None:
    """Raise a ConfigError for methods that cannot run together (declared at registration)."""
    from forgetless.errors import ConfigError

    for name in sorted(configs):
        for other, why in REGISTRY[name].incompatible.items():
            if other in configs:
                raise ConfigError(f"methods: {name} and {other} cannot be combined: {why}")


def build_methods(configs: dict) -> list[Method]:
    """Method objects for ``cfg.methods`` (name -> config dataclass), in wrapping order."""
    specs = sorted((REGISTRY[name] for name in configs), key=lambda s: (s.order, s.name))
    return [spec.build(configs[spec.name]) for spec in specs]
