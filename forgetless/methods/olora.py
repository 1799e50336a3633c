"""O-LoRA: a new LoRA per task, kept orthogonal to the earlier tasks' LoRAs, which stay (frozen).

Each target linear layer carries the LoRA of every earlier task (loaded from ``previous`` runs,
frozen) and a new one that trains::

    y = W x + Σ_{old t} s_t B_t A_t x + s B A x,          s = alpha / r,  B = 0 at init

The rows of ``A`` span the input subspace a LoRA reads. The new LoRA is pushed out of the earlier
tasks' subspaces by the step term ``olora`` (added once per optimiser step)::

    olora    = orth_weight · Σ_layers Σ_old ||A_old A^T||_F^2      (zero iff every row of A ⟂ every old row)
    olora_l2 = l2_weight · Σ_layers (||A||_F^2 + ||B||_F^2)         (optional)

Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual Learning" (O-LoRA,
Findings of EMNLP 2023, arXiv 2310.14152). The paper writes both terms as squared norms; its code
uses the element-wise absolute sum of ``A_old A^T`` and un-squared L2 norms. The squared forms
are kept here: they are smooth at zero, and their gradient is simple
(``∂olora/∂A = 2 · orth_weight · A Σ_old A_old^T A_old``).

Why a small LoRA layer of our own and not PEFT's multiple adapters: several LoRAs must be active at
once with only the newest trainable (PEFT's ``set_adapter`` of a list makes them all trainable,
or all frozen), the penalty reads every task's ``A`` directly, and one saved directory must hold
every task's LoRA so that load_model restores the whole sum (PEFT saves extra adapters in
sub-folders and ``from_pretrained`` loads one). The layer is applied by a forward hook like the
other forgetless adapters, so the base model's parameter names stay untouched; every added
parameter carries the ``olora_`` prefix. Each task's LoRA is identified by a hash of its weights,
so ``previous`` may name several runs of one chain without loading a LoRA twice. Inside
``adapters_disabled`` (methods.kl's reference model) only the new LoRA switches off, which gives
exactly the model the run started from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from forgetless.config import option
from forgetless.errors import ConfigError, UserError
from forgetless.methods.base import Context, Method
from forgetless.registry import register, ADAPT, ADAPTER, FREEZES_BASE, KEEPS_BASE, STARTS_AT_BASE
from forgetless.methods.moe_lora import (
    DEFAULT_TARGETS,
    check_lora_options,
    check_plain_model,
    find_linear_targets,
    read_adapter,
    switched_off,
    write_adapter,
)
from forgetless.models.adapters import AdapterKind, register_adapter_kind

KIND = "olora"
ADAPTERS = "olora_adapters"  # child module of each target layer; the prefix of every added parameter
WHERE = "methods.olora"


@dataclass
class OLoRAConfig:
    """A new LoRA kept orthogonal to the frozen LoRAs of earlier olora runs."""

    previous: list[str] = option(
        factory=list,
        help="Run directories (or their model/ folders) of earlier olora runs; their LoRAs are loaded frozen and "
        "stay in the model. A run's folder already holds the LoRAs of its own previous runs.",
        path=True,
    )
    r: int = option(8, "Rank of the new LoRA.")
    alpha: float = option(16.0, "Scaling numerator: the new LoRA's update is scaled by alpha / r.")
    dropout: float = option(0.0, "Dropout on the new LoRA's input, in [0, 1).")
    target_modules: Optional[list[str]] = option(
        None, "Linear layers to adapt (PEFT's suffix rule); default: the earlier LoRAs' layers, or the attention and "
        "MLP projections (the paper adapts q_proj and v_proj)."
    )
    orth_weight: float = option(0.5, "lambda_1: weight of the orthogonality penalty Σ ||A_old A^T||_F^2 (the paper's 0.5).")
    l2_weight: float = option(0.0, "lambda_2: weight of the L2 penalty on the new LoRA's A and B (0 = off, the paper's default).")

    def validate(self, where: str) -> None:
        if self.r < 1:
            raise ConfigError(f"{where}.r must be at least 1, got {self.r}")
        check_lora_options(self, where)
        for key in ("orth_weight", "l2_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key} must be >= 0, got {getattr(self, key)}")
        if any(not p.strip() for p in self.previous):
            raise ConfigError(f"{where}.previous has an empty path; give run directories of earlier olora runs")


class TaskLoRAs(nn.Module):
    """The LoRAs of every task on one linear layer; ``forward(x)`` is their summed update."""

    def __init__(self, like: torch.Tensor, dropout: float):
        super().__init__()
        self.d_out, self.d_in = like.shape
        self.register_buffer("like", torch.empty(0, device=like.device, dtype=like.dtype), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        self.alphas: list[float] = []
        self.enabled = True

    def add(self, r: int, alpha: float, A: Optional[torch.Tensor] = None, B: Optional[torch.Tensor] = None, trainable: bool = True) -> None:
        if A is None:
            A = nn.init.kaiming_uniform_(torch.empty(r, self.d_in), a=5**0.5)  # PEFT's LoRA init
            B = torch.zeros(self.d_out, r)
        for store, t in ((self.A, A), (self.B, B)):
            store.append(nn.Parameter(t.detach().to(device=self.like.device, dtype=self.like.dtype, copy=True), requires_grad=trainable))
        self.alphas.append(alpha)

    def forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The summed update to add to ``W x``; None when no LoRA is active. While disabled
        (``adapters_disabled``) only the earlier tasks' frozen LoRAs stay, if one is training: the
        model then computes what the run started from, as PEFT does for a merged earlier LoRA."""
        active = list(zip(self.A, self.B, self.alphas))
        if not self.enabled:
            frozen = [t for t in active if not t[0].requires_grad]
            active = frozen if len(frozen) < len(active) else []
        out = None
        for A, B, alpha in active:
            h = self.dropout(x) if A.requires_grad else x  # frozen LoRAs compute what they computed for their task
            update = F.linear(F.linear(h, A), B) * (alpha / A.shape[0])
            out = update if out is None else out + update
        return out


def _add_update(module: nn.Module, args, output):
    update = getattr(module, ADAPTERS)(args[0])
    return output if update is None else output + update


def task_layers(model) -> dict[str, TaskLoRAs]:
    return {n.rsplit(".", 1)[0]: m for n, m in model.named_modules() if isinstance(m, TaskLoRAs)}


def orthogonality(layers) -> torch.Tensor:
    """Σ_layers Σ_old ||A_old A_new^T||_F^2, the newest LoRA being the last of each layer."""
    terms = [(torch.cat(list(layer.A)[:-1]) @ layer.A[-1].T).pow(2).sum() for layer in layers if len(layer.A) > 1]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def task_ids(layers: dict[str, TaskLoRAs]) -> list[str]:
    """A hash of each task's weights over all layers: the same LoRA loaded twice has the same id."""
    count = len(next(iter(layers.values())).A)
    ids = []
    for t in range(count):
        h = hashlib.sha256()
        for name in sorted(layers):
            for w in (layers[name].A[t], layers[name].B[t]):
                h.update(w.detach().float().cpu().numpy().tobytes())
        ids.append(h.hexdigest()[:16])
    return ids


def attach(model, modules: list[str], tasks: list[dict], tensors: dict, dropout: float) -> dict[str, TaskLoRAs]:
    """Give each named layer a TaskLoRAs holding the (frozen) saved LoRAs of ``tasks``."""
    out = {}
    for name in modules:
        layer = model.get_submodule(name)
        layer.add_module(ADAPTERS, TaskLoRAs(layer.weight, dropout))
        layer.register_forward_hook(_add_update)
        out[name] = getattr(layer, ADAPTERS)
        for t in tasks:
            out[name].add(t["r"], t["alpha"], tensors[t["id"]][f"{name}.A"], tensors[t["id"]][f"{name}.B"], trainable=False)
    return out


def read_tasks(paths: list, where: str) -> tuple[list[str], list[dict], dict]:
    """(modules, tasks, tensors by task id) of saved olora runs, each task once, oldest first."""
    modules, tasks, tensors = None, [], {}
    for path in paths:
        settings, weights = read_adapter(path, KIND, where)
        if modules is not None and sorted(settings["modules"]) != sorted(modules):
            raise ConfigError(f"{where}: {path} adapts other layers than {paths[0]}; O-LoRA needs the same layers for every task")
        modules = settings["modules"]
        for i, task in enumerate(settings["tasks"]):
            if task["id"] not in tensors:
                tensors[task["id"]] = {f"{m}.{k}": weights[f"{m}.{k}.{i}"] for m in modules for k in ("A", "B")}
                tasks.append(task)
    return modules or [], tasks, tensors


def _save(model, out_dir, base_ref) -> None:
    layers = task_layers(model)
    first = next(iter(layers.values()))
    tasks = [{"id": i, "r": a.shape[0], "alpha": alpha} for i, a, alpha in zip(task_ids(layers), first.A, first.alphas)]
    tensors = {f"{name}.{k}.{t}": getattr(layer, k)[t] for name, layer in layers.items() for k in ("A", "B") for t in range(len(tasks))}
    write_adapter(model, out_dir, base_ref, KIND, tensors, {"tasks": tasks, "modules": list(layers)})


def _load(base, adapter_dir):
    modules, tasks, tensors = read_tasks([adapter_dir], str(adapter_dir))
    try:
        attach(base, modules, tasks, tensors, 0.0)
    except AttributeError:
        raise UserError(f"{adapter_dir}: its LoRAs do not fit the base model (no layer {modules[0]!r}); check its base model") from None
    return base


class OLoRA(Method):
    name = "olora"

    def __init__(self, cfg: OLoRAConfig):
        self.cfg = cfg
        self.layers: list[TaskLoRAs] = []
        self.facts: dict = {}

    def wrap_model(self, model, ctx: Context):
        cfg = self.cfg
        check_plain_model(model, WHERE, own=KIND)
        layers = task_layers(model)  # a model loaded from an olora run brings its LoRAs
        modules, tasks, tensors = read_tasks(cfg.previous, f"{WHERE}.previous")
        if layers and tasks and sorted(layers) != sorted(modules):
            raise ConfigError(f"{WHERE}.previous adapts other layers than the model's own LoRAs (model.name_or_path); use the same layers")
        if cfg.target_modules is not None or not (layers or tasks):
            names = find_linear_targets(model, cfg.target_modules or DEFAULT_TARGETS, f"{WHERE}.target_modules")
            if (layers or tasks) and sorted(names) != sorted(layers or modules):
                raise ConfigError(f"{WHERE}.target_modules must name the earlier LoRAs' layers; leave it unset with previous")
            modules = names
        if layers:
            known = set(task_ids(layers))
            for t in tasks:
                if t["id"] not in known:
                    for name, layer in layers.items():
                        layer.add(t["r"], t["alpha"], tensors[t["id"]][f"{name}.A"], tensors[t["id"]][f"{name}.B"], trainable=False)
        else:
            layers = attach(model, modules, tasks, tensors, cfg.dropout)
        for name, p in model.named_parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            layer.add(cfg.r, cfg.alpha)
        self.layers = list(layers.values())
        self.facts = {"earlier_tasks": len(self.layers[0].A) - 1, "layers": len(self.layers), "r": cfg.r,
                      "trainable_params": sum(p.numel() for layer in self.layers for p in layer.parameters() if p.requires_grad)}
        return model

    def step_terms(self, model) -> dict[str, torch.Tensor]:
        out = {}
        if self.cfg.orth_weight and len(self.layers[0].A) > 1:
            out["olora"] = self.cfg.orth_weight * orthogonality(self.layers)
        if self.cfg.l2_weight:
            out["olora_l2"] = self.cfg.l2_weight * sum(layer.A[-1].pow(2).sum() + layer.B[-1].pow(2).sum() for layer in self.layers)
        return out

    @classmethod
    def next_task(cls, options: OLoRAConfig, link) -> OLoRAConfig:
        """Every task starts from the base model; the previous run's LoRAs (its own and its
        predecessors') are loaded frozen, and a new one is trained for the task."""
        if link.previous is not None:
            options.previous = [str(link.previous)]
        return options

    def describe(self) -> dict:
        if self.layers and len(self.layers[0].A) > 1:
            self.facts["final_overlap"] = round(float(orthogonality(self.layers).detach()), 8)
        return dict(self.facts)


@torch.no_grad()
def fold(model):
    """forgetless merge: every task's LoRA is linear in the weights, ``W + Σ_t (alpha_t / r_t) B_t A_t``;
    fold them in and take the adapters off, leaving the plain base architecture."""
    for name, layer in task_layers(model).items():
        target = model.get_submodule(name)
        update = sum((B.float() @ A.float()) * (alpha / A.shape[0]) for A, B, alpha in zip(layer.A, layer.B, layer.alphas))
        target.weight += update.to(target.weight.dtype)
        delattr(target, ADAPTERS)
        for key, hook in list(target._forward_hooks.items()):
            if hook is _add_update:
                del target._forward_hooks[key]
    return model


register_adapter_kind(AdapterKind(
    KIND, detect=lambda m: bool(task_layers(m)), disable=lambda m: switched_off(task_layers(m).values()), save=_save, load=_load,
    fold=fold,
))
register(
    "olora",
    OLoRAConfig,
    OLoRA,
    "O-LoRA: a new LoRA per task, penalised for overlapping the subspaces of earlier tasks' frozen LoRAs, which stay in the model.",
    phase=ADAPT,
    provides={
        ADAPTER: "",
        FREEZES_BASE: "olora freezes every base weight itself (only the new LoRA trains)",
        KEEPS_BASE: "",
        STARTS_AT_BASE: "",
    },
    prefix="olora_adapters",
)
