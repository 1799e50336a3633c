"""Experience replay: a memory of earlier tasks' examples mixed into every batch.

A fixed share ``ratio`` of every global batch is drawn from a memory buffer of old data (the
simplest strong baseline of continual learning: Rolnick et al. 2019, "Experience Replay for
Continual Learning", arXiv 1811.11682; Chaudhry et al. 2019, "On Tiny Episodic Memories",
arXiv 1902.10486). The memory is chosen from the candidates: the records of ``memory`` datasets
(each one a task) and of ``previous``, the ``replay_memory.jsonl`` of an earlier run.

Policies (seeded by ``train.seed``):

- ``reservoir`` with ``size_examples = k``: Vitter's Algorithm R over the stream of candidates in
  order (previous memory first, then each dataset in file order): the first ``k`` fill the memory;
  candidate ``i`` (0-based) then replaces a uniformly chosen slot with probability ``k/(i+1)``.
  Every candidate ends in the memory with probability ``k/N``. A previous memory resumes the stream
  where it stopped (its ``seen`` count), so a chain of runs keeps one uniform sample of everything.
- ``reservoir`` with ``size_tokens = B``: each candidate gets a seeded uniform key; the memory is
  the candidates in key order up to the first that would overflow ``B`` tokens (keys are saved, so
  a previous memory merges exactly).
- ``per_task``: an equal quota per task (what a small task cannot fill is shared among the others),
  filled by a seeded random order within each task.

Tokens are those of the tokenized example (prompt included). The memory is saved to the run
directory as ``replay_memory.jsonl``: the original records (so a later run re-tokenizes them with
its own tokenizer), each with a ``_replay`` field (task, origin, format, stream state); the file is
also usable directly as a dataset.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Optional

from forgetless.config import DatasetSpec, option
from forgetless.data.batching import Source
from forgetless.data.formats import Example
from forgetless.data.loading import Record, load_records
from forgetless.errors import ConfigError, UserError
from forgetless.methods.base import Context, Method
from forgetless.registry import register, DATA, DATA_STREAM, STARTS_AT_BASE, STRENGTH

MEMORY_FILE = "replay_memory.jsonl"
META = "_replay"


@dataclass
class ReplayConfig:
    """A memory of old data replayed in every batch."""

    memory: list[DatasetSpec] = option(factory=list, help="Old tasks' data to build the memory from; each dataset is one task.")
    previous: Optional[DatasetSpec] = option(None, f"The {MEMORY_FILE} of an earlier run (or that run's directory) to continue from.")
    ratio: float = option(0.2, "Share of every batch drawn from the memory, in (0, 1).")
    policy: Literal["reservoir", "per_task"] = option(
        "reservoir", "'reservoir': a uniform sample of all candidates (Algorithm R); 'per_task': an equal quota per task."
    )
    size_examples: Optional[int] = option(None, "Memory size in examples (give this or size_tokens).")
    size_tokens: Optional[int] = option(None, "Memory size in tokens of the tokenized examples (give this or size_examples).")

    def validate(self, where: str) -> None:
        if not self.memory and self.previous is None:
            raise ConfigError(f"{where}: nothing to remember; give {where}.memory (old tasks' data) or {where}.previous (a {MEMORY_FILE})")
        self.validate_in_sequence(where)

    def validate_in_sequence(self, where: str) -> None:
        """In a task sequence the memory is filled from the earlier tasks, so it may start empty."""
        for i, spec in enumerate(self.memory):
            spec.validate(f"{where}.memory[{i}]")
        if self.previous is not None:
            self.previous.validate(f"{where}.previous")
        if not 0 < self.ratio < 1:
            raise ConfigError(f"{where}.ratio must be in (0, 1) (the memory's share of every batch), got {self.ratio}")
        if (self.size_examples is None) == (self.size_tokens is None):
            which = "not both" if self.size_examples else "one of them"
            raise ConfigError(f"{where}: give the memory size as size_examples or size_tokens ({which})")
        for key in ("size_examples", "size_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{key} must be at least 1, got {value}")


@dataclass
class Candidate:
    """An example that may enter the memory, with the record it was tokenized from."""

    record: dict
    format: str
    task: str
    where: str
    example: object  # forgetless.data.formats.Example
    key: Optional[float] = None  # priority for the token-budget reservoir

    @property
    def tokens(self) -> int:
        return len(self.example.input_ids)


def load_candidates(encoder, spec: DatasetSpec, task: str) -> tuple[list[Candidate], int]:
    """Records of ``spec`` with their examples, and the stream length a saved memory recorded.

    Records are encoded one by one so that each example keeps the record it came from; a saved
    memory's ``_replay`` field restores each record's task, origin and format.
    """
    out, seen = [], 0
    for rec in load_records(spec):
        data = dict(rec.data)
        meta = data.pop(META, {})
        seen = max(seen, int(meta.get("seen", 0)))
        fmt = meta.get("format", spec.format)
        examples, _ = encoder.encode_all([Record(data, rec.where)], fmt)
        if examples:
            out.append(Candidate(data, fmt, meta.get("task", task), meta.get("where", rec.where), examples[0], meta.get("key")))
    return out, seen


def algorithm_r(items: list, k: int, rng: random.Random, reservoir: tuple = (), seen: int = 0) -> tuple[list, int]:
    """Vitter's Algorithm R, continued from ``reservoir`` after ``seen`` items: (sample, items seen)."""
    res = list(reservoir)
    for item in items:
        if len(res) < k:
            res.append(item)
        else:
            j = rng.randrange(seen + 1)  # uniform in 0..seen: replace with probability k/(seen+1)
            if j < k:
                res[j] = item
        seen += 1
    return res, seen


def fill_budget(ordered: list[Candidate], budget: int) -> list[Candidate]:
    """The longest prefix of ``ordered`` within ``budget`` tokens."""
    out, used = [], 0
    for c in ordered:
        if used + c.tokens > budget:
            break
        out.append(c)
        used += c.tokens
    return out


def per_task(candidates: list[Candidate], size: int, by_tokens: bool, rng: random.Random) -> list[Candidate]:
    """An equal quota per task, filled in a seeded random order; unused quota goes to the other tasks."""
    tasks: dict[str, list[Candidate]] = {}
    for c in candidates:
        tasks.setdefault(c.task, []).append(c)
    for group in tasks.values():  # shuffled in task order, so the result depends on the seed alone
        rng.shuffle(group)
    weight = (lambda c: c.tokens) if by_tokens else (lambda c: 1)
    chosen, left = [], size
    for i, name in enumerate(sorted(tasks, key=lambda t: sum(map(weight, tasks[t])))):  # small tasks first
        quota = left // (len(tasks) - i)
        picked = fill_budget(tasks[name], quota) if by_tokens else tasks[name][:quota]
        chosen += picked
        left -= sum(map(weight, picked))
    return chosen


class Replay(Method):
    name = "replay"
    memory_file = MEMORY_FILE  # where the memory is saved in the run directory (and read from by the next task)

    def __init__(self, cfg: ReplayConfig):
        self.cfg = cfg
        self.memory: list[Candidate] = []
        self.candidates = 0
        self.seen = 0

    def extra_sources(self, ctx: Context) -> list:
        self.take_memory(ctx)
        return [Source("replay", [c.example for c in self.memory], self.cfg.ratio)]

    def take_memory(self, ctx: Context) -> None:
        """The memory: on resume the one the run chose (even if the data files changed since), else chosen now."""
        state = ctx.restored(self.name)
        if state is not None:
            self.load_state_dict(state)
        else:
            self.choose_memory(ctx)

    def choose_memory(self, ctx: Context) -> None:
        cfg = self.cfg
        rng = random.Random(ctx.seed)
        old: list[Candidate] = []
        seen = 0
        if cfg.previous is not None:
            spec = cfg.previous
            if Path(spec.path).is_dir():
                spec = replace(spec, path=str(Path(spec.path) / MEMORY_FILE))
            old, seen = load_candidates(ctx.encoder, spec, "previous")
            seen = max(seen, len(old))
        new: list[Candidate] = []
        names = [s.path for s in cfg.memory]
        for i, spec in enumerate(cfg.memory):
            task = spec.path if names.count(spec.path) == 1 else f"{spec.path}#{i}"
            new += load_candidates(ctx.encoder, spec, task)[0]
        self.candidates = len(old) + len(new)
        if cfg.policy == "per_task":
            self.memory = per_task(old + new, cfg.size_examples or cfg.size_tokens, cfg.size_tokens is not None, rng)
        elif cfg.size_tokens is not None:
            for c in old + new:
                if c.key is None:  # saved keys are kept, so a previous token-budget memory merges exactly
                    c.key = rng.random()
            self.memory = fill_budget(sorted(old + new, key=lambda c: c.key), cfg.size_tokens)
        else:
            # A smaller memory subsamples the old one; a larger one is topped up by the first new candidates.
            start, _ = algorithm_r(old, cfg.size_examples, rng)
            self.memory, self.seen = algorithm_r(new, cfg.size_examples, rng, tuple(start), seen)
        if not self.memory:
            raise UserError(f"methods.{self.name}: the memory is empty (size_tokens smaller than any example?); raise the size")

    def state_dict(self) -> dict:
        memory = [{"record": c.record, "format": c.format, "task": c.task, "where": c.where, "key": c.key, "example": asdict(c.example)} for c in self.memory]
        return {"memory": memory, "seen": self.seen, "candidates": self.candidates}

    def load_state_dict(self, state: dict) -> None:
        self.memory = [Candidate(m["record"], m["format"], m["task"], m["where"], Example(**m["example"]), m["key"]) for m in state["memory"]]
        self.seen, self.candidates = int(state["seen"]), int(state["candidates"])

    def after_train(self, model, ctx: Context) -> None:
        def write(path: Path) -> None:
            with open(path, "w", encoding="utf-8") as f:
                for c in self.memory:
                    meta = {"task": c.task, "where": c.where, "format": c.format, "seen": self.seen, "key": c.key}
                    f.write(json.dumps({**c.record, META: meta}, ensure_ascii=False) + "\n")

        ctx.save_artifact(self.memory_file, write)

    @classmethod
    def next_task(cls, options: ReplayConfig, link) -> Optional[ReplayConfig]:
        """The memory grows: the previous run's memory plus the previous task's data are the candidates,
        so reservoir sampling keeps one uniform sample of every earlier task."""
        saved = link.previous / cls.memory_file if link.previous is not None else None
        if saved is not None and saved.is_file():
            options.previous = DatasetSpec(path=str(saved))
            options.memory = []  # the user's own memory sets entered the stream with the first replay run
        options.memory = [*options.memory, *link.previous_train]
        if not options.memory and options.previous is None:
            link.note(f"{cls.name}: no memory before the second task")
            return None
        return options

    def describe(self) -> dict:
        per: dict[str, int] = {}
        for c in self.memory:
            per[c.task] = per.get(c.task, 0) + 1
        return {
            "policy": self.cfg.policy,
            "candidates": self.candidates,
            "examples": len(self.memory),
            "tokens": sum(c.tokens for c in self.memory),
            "per_task": per,
        }


register(
    "replay",
    ReplayConfig,
    Replay,
    "Experience replay: a memory of old tasks' records (reservoir or per-task quotas) mixed into every batch.",
    phase=DATA,
    provides={DATA_STREAM: "", STARTS_AT_BASE: "", STRENGTH: ""},
    backends=("single", "ddp", "fsdp2", "zero2", "zero3", "qlora"),
)
