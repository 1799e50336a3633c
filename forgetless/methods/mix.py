"""Data mixing: general or pre-training data mixed into every batch of the task.

The most common remedy for forgetting in practice (e.g. the "pre-training data mixing" of
InstructGPT's PPO-ptx, Ouyang et al. 2022, arXiv 2203.02155): each global batch holds a fixed
share of each general corpus, and the task gets the rest. Shares are given either per source
(``weights: {name: share}``) or as a total (``ratio``) split over the sources by temperature
sampling over their sizes, as in multilingual pre-training (Conneau & Lample 2019, arXiv
1901.07291; Arivazhagan et al. 2019, arXiv 1907.05019)::

    share_j = ratio · p_j,   p_j = n_j^(1/T) / Σ_k n_k^(1/T)

with ``n_j`` the number of examples of source ``j``: ``T = 1`` is proportional to size, larger
``T`` flattens towards uniform (``T → ∞``: equal shares), ``T < 1`` favours large sources.

The batches themselves come from the recipe's ``MixedBatches`` (forgetless/data/batching.py):
every source has its own seeded stream and the per-batch counts follow the shares to within one
example, so the run is deterministic per seed; the requested and observed shares are reported
in the run summary under ``data.mix``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from forgetless.config import DatasetSpec, option
from forgetless.data.batching import Source
from forgetless.errors import ConfigError
from forgetless.methods.base import Context, Method
from forgetless.registry import register, DATA, STARTS_AT_BASE, STRENGTH, stream_names


@dataclass
class MixConfig:
    """General data mixed into every batch."""

    sources: dict[str, DatasetSpec] = option(
        factory=dict, help="The corpora to mix in, by name: a path / demo:NAME / hub id, or a dataset mapping."
    )
    weights: dict[str, float] = option(
        factory=dict, help="Share of every batch for each source, by name (e.g. {general: 0.2}); the task gets the rest."
    )
    ratio: Optional[float] = option(
        None, "Instead of weights: the total share of general data, split over the sources by temperature sampling on their sizes."
    )
    temperature: float = option(1.0, "With ratio: p_j ∝ n_j^(1/T) over source sizes n_j (1 = by size, large = uniform).")

    def validate(self, where: str) -> None:
        if not self.sources:
            raise ConfigError(f"{where}.sources is empty; name the data to mix in, e.g. {where}.sources.general=demo:general")
        for name, spec in self.sources.items():
            if name in stream_names():  # the other streams' names in the summary's data.mix
                raise ConfigError(f"{where}.sources.{name}: the name {name!r} is taken by another stream of the batch; rename the source")
            spec.validate(f"{where}.sources.{name}")
        if bool(self.weights) == (self.ratio is not None):
            both = "both" if self.weights else "neither"
            raise ConfigError(f"{where}: give either weights (a share per source) or ratio (the total share), not {both}")
        if self.ratio is not None:
            if not 0 < self.ratio < 1:
                raise ConfigError(f"{where}.ratio must be in (0, 1) (the general share of every batch), got {self.ratio}")
            if not self.temperature > 0:
                raise ConfigError(f"{where}.temperature must be positive, got {self.temperature}")
            return
        unknown = sorted(set(self.weights) - set(self.sources))
        if unknown:
            raise ConfigError(f"{where}.weights names {', '.join(unknown)}, which is not in {where}.sources ({', '.join(self.sources)})")
        missing = sorted(set(self.sources) - set(self.weights))
        if missing:
            raise ConfigError(f"{where}.weights has no share for {', '.join(missing)}; give every source a share")
        for name, w in self.weights.items():
            if w < 0:
                raise ConfigError(f"{where}.weights.{name} is negative ({w}); shares must be >= 0")
        total = sum(self.weights.values())
        if total <= 0:
            raise ConfigError(f"{where}.weights are all zero; give at least one source a positive share")
        if total >= 1:
            raise ConfigError(f"{where}.weights add up to {total:g}, leaving nothing for the task; keep their sum below 1")


def temperature_shares(sizes: dict[str, int], ratio: float, temperature: float) -> dict[str, float]:
    """``ratio · n_j^(1/T) / Σ_k n_k^(1/T)`` for every source."""
    powered = {name: n ** (1.0 / temperature) for name, n in sizes.items()}
    total = sum(powered.values())
    return {name: ratio * v / total for name, v in powered.items()}


class Mix(Method):
    name = "mix"

    def __init__(self, cfg: MixConfig):
        self.cfg = cfg
        self.shares: dict[str, float] = {}
        self.sizes: dict[str, int] = {}

    def extra_sources(self, ctx: Context) -> list:
        examples = {name: ctx.load_dataset(spec) for name, spec in self.cfg.sources.items()}
        self.sizes = {name: len(exs) for name, exs in examples.items()}
        if self.cfg.ratio is not None:
            self.shares = temperature_shares(self.sizes, self.cfg.ratio, self.cfg.temperature)
        else:
            self.shares = dict(self.cfg.weights)
        # A zero-share source would never be drawn; leaving it out keeps the summary honest.
        return [Source(name, examples[name], share) for name, share in self.shares.items() if share > 0]

    def describe(self) -> dict:
        return {"shares": {k: round(v, 4) for k, v in self.shares.items()}, "examples": self.sizes}


register(
    "mix",
    MixConfig,
    Mix,
    "Mix general / pre-training data into every batch at fixed shares (per source, or a total split by temperature sampling).",
    phase=DATA,
    provides={STARTS_AT_BASE: "", STRENGTH: ""},
    backends=("single", "ddp", "fsdp2", "zero2", "zero3", "qlora"),
)
