"""The method registry: what each anti-forgetting method declares about itself.

A method registers once, at the bottom of its own file::

    register("kl", KLConfig, KL, "Distillation to the base model ...", phase=REGULARIZE,
             provides={STARTS_AT_BASE: ""})

Everything the rest of forgetless needs to know about a method comes from that declaration, never
from its name: the order in which methods wrap the model (``phase``), which methods cannot run
together (derived from ``provides``, see :func:`check_combination`), the data stream names taken
in every batch, and the prefix that the parameters it adds carry.

This module sits at the bottom of the package's layers (it imports only ``errors``), so the
config loader can resolve ``methods.NAME`` without importing the methods themselves. The
package root registers the built-in methods lazily (:func:`add_source`), and a method defined
anywhere else (a user's file, a test) calls :func:`register` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

from forgetless.errors import ConfigError

# Phases, in the order methods wrap the model and run their setup hooks; within a phase, by name.
SELECT = "select"  # chooses which base weights train (freeze)
ADAPT = "adapt"  # puts adapters / experts on the model
REGULARIZE = "regularize"  # looks at the model as it will train: anchors, teachers, Fisher
DATA = "data"  # adds data streams to every batch
PHASES = (SELECT, ADAPT, REGULARIZE, DATA)

# Capabilities a method declares (``provides``: capability -> why, in the user's words, or "").
ADAPTER = "adapter"  # puts its own adapters on the model; a run saves one kind of adapter
FREEZES_BASE = "freezes_base"  # freezes every base weight itself
SELECTS_WEIGHTS = "selects_weights"  # chooses which base weights train
DATA_STREAM = "data_stream"  # adds a stream named after the method to every batch
STARTS_AT_BASE = "starts_at_base"  # at step 0 the wrapped model gives the outputs of the model the run
#                                    starts from, and the method's loss terms are zero
KEEPS_BASE = "keeps_base"  # in a task sequence, every task starts from the base model, with the
#                            method's earlier state (experts, LoRAs) loaded onto it by the method
STRENGTH = "strength"  # its loss terms are a protection whose weight a forgetting budget may scale
#                        (the recipe multiplies them by the method's ``strength``, forgetless/recipes/budget.py)
CAPABILITIES = (ADAPTER, FREEZES_BASE, SELECTS_WEIGHTS, DATA_STREAM, STARTS_AT_BASE, KEEPS_BASE, STRENGTH)

TASK_STREAM = "task"  # the training data's own stream in every batch

# Where a method may run (forgetless/support.py: the support table and the refusals made from it).
BACKENDS = ("single", "ddp", "fsdp2", "fsdp1", "zero2", "zero3", "qlora")


@dataclass
class MethodSpec:
    name: str
    config: type  # a documented dataclass
    build: Callable[[Any], Any]  # config -> method object (forgetless.methods.base.Method)
    summary: str
    phase: str
    provides: dict[str, str] = field(default_factory=dict)
    prefix: tuple[str, ...] = ()  # every parameter the method adds has a name part starting with one of them
    backends: tuple[str, ...] = ("single", "ddp")  # where it is known to be right (forgetless/support.py); elsewhere refused

    def has(self, capability: str) -> bool:
        return capability in self.provides

    def owns(self, parameter_name: str) -> bool:
        """Whether a parameter of this name is one the method adds (a dotted part starts with its prefix)."""
        return any(part.startswith(p) for part in parameter_name.split(".") for p in self.prefix)


class Registry(Mapping[str, MethodSpec]):
    """name -> MethodSpec; read like a dict. Sources of built-in methods are imported on first read."""

    def __init__(self) -> None:
        self._specs: dict[str, MethodSpec] = {}
        self._sources: list[Callable[[], None]] = []

    def _load(self) -> None:
        while self._sources:
            load = self._sources.pop(0)  # popped first: a source that registers methods reads the registry
            try:
                load()
            except BaseException:
                self._sources.insert(0, load)  # not half-loaded for good: the next read tries again
                raise

    def __getitem__(self, name: str) -> MethodSpec:
        self._load()
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(dict(self._specs))

    def __len__(self) -> int:
        self._load()
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._specs


REGISTRY = Registry()


def add_source(load: Callable[[], None]) -> None:
    """Call ``load`` (which registers methods, e.g. by importing their modules) before the registry is first read."""
    REGISTRY._sources.append(load)


def load_sources() -> None:
    """Register the methods of every source now (their modules also register adapter kinds for loading)."""
    REGISTRY._load()


def register(
    name: str,
    config: type,
    build: Callable[[Any], Any],
    summary: str,
    phase: str = REGULARIZE,
    provides: Optional[Mapping[str, str]] = None,
    prefix: str | tuple[str, ...] = (),
    backends: tuple[str, ...] = ("single", "ddp"),
) -> MethodSpec:
    """Make a method available as ``methods.NAME``. A name already taken is refused, and so is a parameter
    prefix that another method could add in the same run (two adapter methods never share a run)."""
    REGISTRY._load()  # the built-in methods first, so that a taken name or prefix is refused whoever comes first
    if not name.isidentifier():
        raise ValueError(f"method name {name!r} must be a Python identifier (it is a config key)")
    if name in REGISTRY._specs:
        raise ValueError(f"a method named {name!r} is already registered ({REGISTRY._specs[name].build!r}); pick another name")
    if phase not in PHASES:
        raise ValueError(f"method {name!r}: phase must be one of {', '.join(PHASES)}, got {phase!r}")
    provides = dict(provides or {})
    unknown = sorted(set(provides) - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"method {name!r}: unknown capabilities {', '.join(unknown)}; known: {', '.join(CAPABILITIES)}")
    prefix = (prefix,) if isinstance(prefix, str) else tuple(prefix)
    for other in REGISTRY._specs.values():
        if ADAPTER in provides and other.has(ADAPTER):
            continue
        for mine in prefix:
            for theirs in other.prefix:
                if mine.startswith(theirs) or theirs.startswith(mine):
                    raise ValueError(f"method {name!r}: parameter prefix {mine!r} clashes with {other.name!r}'s {theirs!r}")
    if getattr(build, "name", name) != name:
        raise ValueError(f"method {name!r}: its class says name = {build.name!r}; use the same name in both")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f"method {name!r}: unknown backends {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    spec = MethodSpec(name, config, build, summary, phase, provides, prefix, tuple(backends))
    REGISTRY._specs[name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method (for tests that register one of their own)."""
    REGISTRY._specs.pop(name, None)


def ordered(names) -> list[MethodSpec]:
    """The specs of ``names`` in wrapping order: by phase, then by name."""
    return sorted((REGISTRY[n] for n in names), key=lambda s: (PHASES.index(s.phase), s.name))


def _conflict(a: MethodSpec, b: MethodSpec) -> Optional[str]:
    """Why ``a`` cannot run with ``b`` (None when they can), derived from what each provides."""
    if a.has(ADAPTER) and b.has(ADAPTER):
        return a.provides[ADAPTER] or b.provides[ADAPTER] or "each puts its own adapters on the model, and a run saves one kind of adapter; use one of them"
    if a.has(FREEZES_BASE) and b.has(SELECTS_WEIGHTS):
        return a.provides[FREEZES_BASE] or f"{a.name} freezes every base weight itself, so {b.name}'s choice would be silently overridden"
    return None


def check_combination(names) -> None:
    """Raise a ConfigError naming the first pair of methods that cannot run together."""
    names = sorted(names)
    for a in names:
        for b in names:
            if a != b:
                why = _conflict(REGISTRY[a], REGISTRY[b])
                if why:
                    raise ConfigError(f"methods: {a} and {b} cannot be combined: {why}")


def stream_names() -> set[str]:
    """Names taken by streams in every batch: the task's own and each data-stream method's."""
    return {TASK_STREAM} | {s.name for s in REGISTRY.values() if s.has(DATA_STREAM)}
