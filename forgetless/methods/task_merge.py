"""Task merging: every task trains from the base model; the model is the merge of the tasks' deltas.

Each run trains like a plain fine-tune from the base. At its end (``after_train``, before the
run's final evaluation, so its "after" scores are the merged model's) it saves its own *task
vector* ``tau = theta_trained - theta_base`` (the trainable tensors that changed) as
``task_vector.safetensors`` in the run directory, and sets the weights to

    theta = theta_base + scale * merge(tau_previous_1, ..., tau_previous_k, tau)

with ``merge`` one of forgetless.merging's methods (TIES by default: trim each vector to its top
``density`` share by magnitude, elect one sign per entry, average the agreeing values). In a task
sequence the method declares KEEPS_BASE, so every task trains from the base model, and
``next_task`` hands the next run every earlier run directory (``previous``): the model after task
``t`` merges the deltas of tasks 1..t. A single run merges its own delta alone (trimmed, or dropped
and rescaled by DARE).

Merging the deltas of independently trained tasks instead of training one model on top of the
other is the model-merging answer to forgetting (Ilharco et al. 2023, task arithmetic; Yadav et
al. 2023, TIES-Merging; Yu et al. 2024, DARE): no task's training moves another task's weights,
and interference is handled at merge time.

Works on plain weights (full fine-tunes, or weights chosen by methods.freeze): adapters (LoRA and
forgetless's own) keep their update outside the base weights, so it is refused; to merge LoRA
runs, use ``forgetless interpolate RUN1 RUN2 --merge ties``, which folds them in first.

Memory: a CPU copy of the trainable weights (the starting point of the delta); at the end, every
task's vector in float32 in RAM while they are merged. Resume needs no state: ``before_train``
sees the starting weights on a resumed run too, so the snapshot is taken again, identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from forgetless.config import option
from forgetless.errors import ConfigError
from forgetless.merging import DEFAULT_DENSITY, MERGE_METHODS, RANDOM_METHODS, SPARSE_METHODS, merge_task_vectors
from forgetless.methods.base import Context, Method
from forgetless.models.adapters import has_adapters
from forgetless.registry import register, KEEPS_BASE, REGULARIZE

WHERE = "methods.task_merge"
VECTOR_FILE = "task_vector.safetensors"


@dataclass
class TaskMergeConfig:
    """Train from the base; the model becomes base + scale * merge(every task's delta)."""

    merge: str = option("ties", f"How the task vectors are merged: {', '.join(MERGE_METHODS)} (forgetless.merging).")
    density: float = option(
        DEFAULT_DENSITY,
        "Share of each task vector's entries kept by ties and magnitude (the largest) or DARE (at random, rescaled by "
        "1/density); task_arithmetic keeps all. 1 keeps all (ties is then sign election and the disjoint mean alone).",
    )
    scale: float = option(1.0, "lambda: the model becomes base + scale * merged vector.")
    seed: int = option(0, "Seed of DARE's random drop (each tensor's draw is seeded from it and the tensor's name).")
    previous: list[str] = option(
        factory=list,
        help="Run directories of earlier task_merge runs over the same base, whose task vectors are merged with this "
        "run's; a task sequence fills it in.",
        path=True,
    )

    def validate(self, where: str) -> None:
        if self.merge not in MERGE_METHODS:
            raise ConfigError(f"{where}.merge: unknown merge method {self.merge!r}; use one of {', '.join(MERGE_METHODS)}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"{where}.density must be in (0, 1] (the share of entries kept), got {self.density}")
        if self.scale < 0:
            raise ConfigError(f"{where}.scale must be >= 0, got {self.scale}")
        if any(not str(p).strip() for p in self.previous):
            raise ConfigError(f"{where}.previous has an empty path; give run directories of earlier task_merge runs")


def _vector_file(run_dir, where: str) -> Path:
    path = Path(run_dir) / VECTOR_FILE
    if not path.is_file():
        raise ConfigError(f"{where}: {run_dir} has no {VECTOR_FILE}; give run directories of finished task_merge runs")
    return path


def read_vector(run_dir, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(_vector_file(run_dir, where)))


def check_fits(run_dir, shapes: dict[str, tuple], where: str) -> None:
    """The saved vector's tensors exist in this model with the same shapes (read from the file's header only)."""
    from safetensors import safe_open

    with safe_open(str(_vector_file(run_dir, where)), framework="pt") as f:
        for name in f.keys():
            shape = tuple(f.get_slice(name).get_shape())
            if shapes.get(name) != shape:
                has = "lacks it" if name not in shapes else f"has {shapes[name]}"
                raise ConfigError(f"{where}: {run_dir}'s task vector has {name} {shape}, this model {has}; merge runs over one base")


class TaskMerge(Method):
    name = "task_merge"

    def __init__(self, cfg: TaskMergeConfig):
        self.cfg = cfg
        self.start: dict[str, torch.Tensor] = {}
        self.facts: dict = {}

    def wrap_model(self, model, ctx: Context):
        if has_adapters(model):
            raise ConfigError(f"{WHERE}: the model carries adapters, whose update lies outside the base weights; merge task "
                              f"vectors of full (or freeze) fine-tunes, or merge LoRA runs with forgetless interpolate --merge")
        return model

    def before_train(self, model, ctx: Context) -> None:
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        for run_dir in self.cfg.previous:  # before the run directory is touched: a wrong path costs no training
            check_fits(run_dir, shapes, f"{WHERE}.previous")
        # theta_base of the delta: the trainable weights as the run starts (a resumed run sees them too)
        self.start = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def after_train(self, model, ctx: Context) -> None:
        from safetensors.torch import save_file

        cfg = self.cfg
        params = dict(model.named_parameters())
        own = {}
        for n, start in self.start.items():
            delta = params[n].detach().to("cpu", torch.float32) - start.float()
            if torch.count_nonzero(delta):
                own[n] = delta.contiguous()
        ctx.save_artifact(VECTOR_FILE, lambda path: save_file(own, str(path), metadata={"format": "forgetless task vector"}))
        vectors = [read_vector(r, f"{WHERE}.previous") for r in cfg.previous] + [own]
        merged = merge_task_vectors(vectors, cfg.merge, density=cfg.density if cfg.merge in SPARSE_METHODS else None, seed=cfg.seed)
        for n, d in merged.items():
            p = params[n]
            base = self.start[n] if n in self.start else p.detach().cpu()  # an untrained weight is still the base's
            p.copy_((base.float() + cfg.scale * d).to(device=p.device, dtype=p.dtype))
        self.facts.update({
            "tasks_merged": len(vectors),
            "tensors": len(merged),
            "changed_entries": sum(int(torch.count_nonzero(v)) for v in own.values()),
            "kept_entries": sum(int(torch.count_nonzero(v)) for v in merged.values()),
        })

    def describe(self) -> dict:
        cfg = self.cfg
        out = {"merge": cfg.merge, "scale": cfg.scale, "previous_runs": len(cfg.previous)}
        if cfg.merge in SPARSE_METHODS:
            out["density"] = cfg.density
        if cfg.merge in RANDOM_METHODS:
            out["seed"] = cfg.seed
        return {**out, **self.facts}

    @classmethod
    def next_task(cls, options: TaskMergeConfig, link):
        """Every task trains from the base; the next run merges the vectors of every earlier run (the
        previous run's own ``previous`` and the previous run itself)."""
        if link.previous is not None:
            options.previous = [*_previous_of(link.previous), str(link.previous)]
        return options


def _previous_of(run_dir: Path) -> list[str]:
    """The ``previous`` runs of an earlier task_merge run, read from its config.yaml (absolute paths)."""
    import yaml

    from forgetless.files import CONFIG_FILE

    path = Path(run_dir) / CONFIG_FILE
    try:
        saved = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("methods", {}).get(TaskMerge.name) or {}
    except OSError:
        return []
    return [str(p) if Path(p).is_absolute() else str((path.parent / p).resolve()) for p in saved.get("previous") or []]


register(
    "task_merge",
    TaskMergeConfig,
    TaskMerge,
    "Task merging: each task trains from the base; the model is base + scale * the TIES / DARE / task-arithmetic merge of every task's delta.",
    phase=REGULARIZE,
    provides={KEEPS_BASE: ""},
)
