"""OSF, orthogonal subspace fine-tuning: train every weight matrix, but only outside its top singular directions.

Each target matrix is split by its SVD at the start of the run, ``W = U_h S_h V_hᵀ + U_l S_l V_lᵀ``,
the top ``k`` directions (``effective_rank``) frozen, the rest trainable (``U_l``, ``S_l``, ``V_l``:
as many numbers as ``W`` itself, a full-rank update of the low part). The gradients of ``U_l`` and
``V_l`` are projected out of ``span(U_h)`` / ``span(V_h)``, so the update never touches the
protected directions (Nayak et al., 2025, "Sculpting Subspaces: Constrained Full Fine-Tuning in
LLMs for Continual Learning", arXiv 2504.07097; their "adaptive SVD" is PEFT's ``OSFConfig``, in
PEFT since 0.18). Everything is PEFT's (``OSFConfig`` + ``get_peft_model``); this module maps
forgetless options onto it and adds one thing:

- ``project_weights`` (default on): PEFT projects each *gradient*; AdamW then divides every
  coordinate by its own ``√v``, which leaks the step back into the protected directions. After
  every optimiser step the trainable factors are projected again with the same projector
  (``U_l ← (I − U_h U_hᵀ) U_l``, ``V_l ← V_l (I − V_h V_hᵀ)``), so that ``U_hᵀ W' = S_h V_hᵀ`` and
  ``W' V_h = U_h S_h`` hold for the trained weights ``W'`` to float rounding, whatever the optimiser.
  The cost per step is that of the gradient hooks (two matrix products per factor).

At step 0 the adapter adds ``U_l S_l V_lᵀ − U_l⁰ S_l⁰ V_l⁰ᵀ``, zero up to float rounding (about
1e-7). Inside ``adapters_disabled`` the model is the base (OSF leaves ``W`` itself untouched), so
methods.kl needs no copy. The run's ``model/`` is a plain model: OSF is folded into dense weights at
save (forgetless/models/saving.py), so ``forgetless eval`` and the next task load it like a full
fine-tune; checkpoints hold the trainable factors (and PEFT's frozen SVD buffers), about twice the
model's size, and a resumed run recomputes the same SVD from the same weights.

Task sequences (PEFT's continual example protects 30 %, 50 %, 70 %): every task starts from the
model the previous one saved and protects the top ``effective_rank + (t − 1)·grow_by`` singular
directions of *those* weights. The previous tasks' directions stay in that subspace as long as the
training did not raise a new direction above them (it cannot touch the protected ones, but it may
grow others); OSF keeps no explicit bases across tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from forgetless.config import option
from forgetless.errors import ConfigError
from forgetless.methods.base import Context, Method
from forgetless.models.adapters import check_target_modules, has_adapters, peft_targets, wrap_peft, wrapped_target_names
from forgetless.registry import register, ADAPT, ADAPTER, FREEZES_BASE, STARTS_AT_BASE

WHERE = "methods.osf"


@dataclass
class OSFConfig:
    """Train each weight matrix outside its top singular directions (PEFT's OSF)."""

    effective_rank: float = option(
        0.3,
        "Singular directions of each weight kept fixed: below 1, a fraction of min(d_out, d_in) (0.3 = the top 30 %); "
        "1 or more, that many directions. The rest (min(d_out, d_in) minus these) train.",
    )
    grow_by: float = option(
        0.2,
        "In a task sequence, added to effective_rank for every later task (a fraction with a fraction, a count with a count); "
        "a fraction stops growing below 1.",
    )
    target_modules: list[str] = option(
        factory=lambda: ["all-linear"],
        help="Linear layers to train, by name (e.g. [q_proj, v_proj]); 'all-linear' = every linear layer except the output head.",
    )
    project_weights: bool = option(
        True, "Project the trainable factors out of the protected directions after every optimiser step (exact under AdamW)."
    )

    def validate(self, where: str) -> None:
        if not self.effective_rank > 0:
            raise ConfigError(f"{where}.effective_rank must be positive (a fraction below 1, or a count), got {self.effective_rank}")
        if self.effective_rank >= 1 and self.effective_rank != int(self.effective_rank):
            raise ConfigError(f"{where}.effective_rank {self.effective_rank}: 1 or more is a count of directions; give a whole number or a fraction below 1")
        if self.grow_by < 0:
            raise ConfigError(f"{where}.grow_by must be >= 0, got {self.grow_by}")
        if self.effective_rank >= 1 and self.grow_by != int(self.grow_by):
            raise ConfigError(f"{where}.grow_by {self.grow_by} must be a whole number when effective_rank is a count ({int(self.effective_rank)})")
        check_target_modules(self.target_modules, where)


def peft_rank(value: float):
    """PEFT's effective_rank: a float in (0, 1) is a fraction, an int a count."""
    return value if value < 1 else int(value)


def osf_layers(model) -> list:
    from peft.tuners.osf.layer import OSFLayer

    return [m for m in model.modules() if isinstance(m, OSFLayer)]


@torch.no_grad()
def project_out(layer, adapter: str) -> None:
    """Remove the protected directions from the layer's trainable factors: the projector of PEFT's
    gradient hook, applied to the weights. Where a factor of the SVD is square, PEFT keeps no
    ``U_h`` (``V_h``) and the complement's projector is ``U_l⁰ U_l⁰ᵀ`` (``V_l⁰ᵀ V_l⁰``)."""
    params = layer.osf_svd_params[adapter]
    U, V = params["U_low"], params["V_low"]
    if adapter in layer._osf_U_high:
        high = layer._osf_U_high[adapter]
        U.sub_(high @ (high.T @ U))
    else:
        low = layer._osf_U_low_init[adapter]
        U.copy_(low @ (low.T @ U))
    if adapter in layer._osf_V_high:
        high = layer._osf_V_high[adapter]
        V.sub_((V @ high.T) @ high)
    else:
        low = layer._osf_V_low_init[adapter]
        V.copy_((V @ low.T) @ low)


class OSF(Method):
    name = "osf"

    def __init__(self, cfg: OSFConfig):
        self.cfg = cfg
        self.layers: list = []
        self.facts: dict = {}

    def wrap_model(self, model, ctx: Context):
        from peft import OSFConfig as PeftOSFConfig
        cfg = self.cfg
        if has_adapters(model):
            raise ConfigError(f"{WHERE}: the model carries adapters (it was loaded from an adapter run); merge it first (forgetless merge) "
                              f"and start from the merged model")
        peft_cfg = PeftOSFConfig(
            task_type="CAUSAL_LM",
            effective_rank=peft_rank(cfg.effective_rank),
            target_modules=peft_targets(cfg.target_modules),
        )
        model = wrap_peft(model, peft_cfg, WHERE)
        self.layers = osf_layers(model)
        protected = [layer.effective_rank["default"] for layer in self.layers]
        sizes = [min(layer.in_features, layer.out_features) for layer in self.layers]
        if all(k >= n for k, n in zip(protected, sizes)):
            raise ConfigError(f"{WHERE}.effective_rank {cfg.effective_rank} protects every direction of every target layer; nothing would train")
        self.facts = {
            "effective_rank": cfg.effective_rank,
            "protected_fraction": round(sum(protected) / sum(sizes), 4),
            "layers": len(self.layers),
            "target_modules": wrapped_target_names(model),
            "project_weights": cfg.project_weights,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        return model

    def configure_optimizer(self, optimizer) -> None:
        if not self.cfg.project_weights:
            return

        def project(opt, args, kwargs):
            for layer in self.layers:
                project_out(layer, "default")

        optimizer.register_step_post_hook(project)

    @classmethod
    def next_task(cls, options: OSFConfig, link) -> OSFConfig:
        """Task ``t`` protects ``effective_rank + (t − 1)·grow_by`` directions of the weights the previous task
        saved; a fraction stops at its last value below 1."""
        e, g, steps = options.effective_rank, options.grow_by, link.index - 1
        if e < 1 and g > 0:
            below_one = math.ceil((1 - e) / g) - 1  # the most steps that keep the fraction below 1
            while e + below_one * g >= 1:
                below_one -= 1
            if steps > below_one:
                steps = below_one
                link.note(f"methods.osf: effective_rank stops growing at {e + steps * g:g} (a fraction below 1) for task {link.index}")
        grown = e + steps * g
        options.effective_rank = round(grown, 6)
        return options

    def describe(self) -> dict:
        return dict(self.facts)


register(
    "osf",
    OSFConfig,
    OSF,
    "OSF through PEFT: full-rank training of each weight outside its top singular directions, which stay fixed; for task sequences.",
    phase=ADAPT,
    provides={
        ADAPTER: "osf puts PEFT's OSF layers on the model, and a run saves one kind of adapter; use one of them",
        FREEZES_BASE: "OSF trains only the SVD factors it adds (PEFT freezes every other weight), so freeze's choice would be silently overridden",
        STARTS_AT_BASE: "",
    },
    prefix="osf_",
)
