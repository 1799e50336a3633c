"""Mixture of LoRA experts (LoRAMoE / MoLA): several LoRAs per layer, chosen per token by a router.

Every target linear layer ``W`` (frozen) gets ``E`` LoRA experts (``A_e ∈ R^{r×d_in}``,
``B_e ∈ R^{d_out×r}``) and a router ``R ∈ R^{E×d_in}``::

    y = W x + Σ_{e ∈ topk(R x)} g_e(x) · (alpha / r) · B_e A_e x,     g = softmax of the top-k logits

``B_e`` starts at zero, so the model starts exactly equal to its base. Experts specialise on
different kinds of tokens, and the router keeps old behaviour on the experts that carry it
(Dou et al., 2024, "LoRAMoE", arXiv 2312.09979; Gao et al., 2024, "MoLA", arXiv 2402.08562).
A load-balancing term keeps every expert in use (Fedus et al., 2022, "Switch Transformers",
arXiv 2101.03961)::

    moe_balance = E · Σ_e f_e · P_e      (per layer, averaged over layers)

with ``f_e`` the share of the forward's top-k assignments (non-padding tokens) that went to
expert ``e`` and ``P_e`` its mean router probability (softmax over all experts). It is 1 when
routing is uniform and up to ``E`` when it collapses onto one expert. It is a per-forward *mean*,
while a batch term must be a *sum* over the batch's target tokens (the recipe divides by the global
target count), so it is multiplied by the micro-batch's number of target tokens.

PEFT has no mixture-of-LoRA tuner, so the layer is written here by hand. Like the bottleneck
adapters, experts are a child module ``moe_lora_experts`` of each target linear layer, applied by
a forward hook: the base model's modules and parameter names stay untouched, and every added
parameter carries the ``moe_lora_`` prefix (one filter for "trainable" and "saved"). All experts
are computed with one matmul of the stacked ``A`` s and one of the stacked ``B`` s; the gates are
zero for unchosen experts, so the result is exactly the sparse formula above (at ``E·r`` extra
rank, which is small next to ``d``, and with every expert in the graph, which DDP needs).
methods.expansion adds experts to the same module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from forgetless.config import option
from forgetless.data.batching import count_targets
from forgetless.errors import ConfigError, UserError
from forgetless.methods.base import Context, Method
from forgetless.registry import register, ADAPT, ADAPTER, FREEZES_BASE
from forgetless.models.adapters import ADAPTER_FILE, ADAPTER_KINDS, AdapterKind, is_peft_model, register_adapter_kind, switched_off

KIND = "moe_lora"
EXPERTS = "moe_lora_experts"  # child module of each target layer; the prefix of every added parameter
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class MoELoRAConfig:
    """A router choosing top_k of num_experts LoRA experts per token, on each target layer."""

    num_experts: int = option(4, "LoRA experts per target layer.")
    top_k: int = option(2, "Experts each token uses; their gates are the softmax of their router logits.")
    r: int = option(8, "Rank of each expert.")
    alpha: float = option(16.0, "Scaling numerator: each expert's update is scaled by alpha / r.")
    dropout: float = option(0.0, "Dropout on the experts' input (not the router's), in [0, 1).")
    target_modules: list[str] = option(
        factory=lambda: list(DEFAULT_TARGETS),
        help="Linear layers that get experts, matched like PEFT's target_modules: a layer whose name is, or ends "
        "with '.NAME'. Default: the attention and MLP projections of every block.",
    )
    balance_weight: float = option(
        0.01,
        "Weight of the Switch load-balancing term moe_balance, E · Σ_e f_e P_e averaged over layers (1 at uniform "
        "routing, up to E when collapsed); it is counted per target token like the LM loss. 0 disables it.",
    )

    def validate(self, where: str) -> None:
        for key in ("num_experts", "top_k", "r"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be at least 1, got {getattr(self, key)}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"{where}.top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        check_lora_options(self, where)
        if self.balance_weight < 0:
            raise ConfigError(f"{where}.balance_weight must be >= 0, got {self.balance_weight}")


def check_lora_options(cfg, where: str) -> None:
    """The checks shared by every LoRA-like config here (alpha, dropout, target_modules)."""
    if cfg.alpha is not None and cfg.alpha <= 0:
        raise ConfigError(f"{where}.alpha must be positive, got {cfg.alpha}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"{where}.dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.target_modules is not None and not cfg.target_modules:
        raise ConfigError(f"{where}.target_modules is empty; give linear layer names like [q_proj, v_proj]")


class LoRAExperts(nn.Module):
    """The experts and router of one linear layer; ``forward(x)`` is the update added to ``W x``.

    Experts come in groups (one per ``add`` call) so that a group can be frozen. The first
    ``num_routed`` experts share the top-k softmax; experts added later by methods.expansion are
    *added*: expert ``e`` gets ``exp(l_e) / Σ_{j ≤ e} exp(l_j)``, its router probability against
    itself and every earlier expert, so adding one never changes an earlier one's gate.
    """

    def __init__(self, like: torch.Tensor, r: int, alpha: float, top_k: int, dropout: float):
        super().__init__()
        d_out, d_in = like.shape
        # new experts take this (empty, unsaved) buffer's device and dtype, which follow model.to()
        self.register_buffer("like", torch.empty(0, device=like.device, dtype=like.dtype), persistent=False)
        self.d_in, self.d_out, self.r, self.alpha, self.top_k = d_in, d_out, r, alpha, top_k
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.A, self.B, self.router = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        self.num_routed = 0
        self.enabled = True
        self.record = False  # keep the router statistics of the last training forward (for moe_balance)
        self.stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (probabilities, chosen experts)
        self.seen: Optional[list[torch.Tensor]] = None  # gates of every forward, while routing_shares() listens

    @property
    def num_experts(self) -> int:
        return sum(a.shape[0] for a in self.A)

    def add(self, n: int, weights: Optional[dict] = None, train_experts: bool = True, train_router: bool = True, routed: bool = True) -> None:
        """Add ``n`` experts, fresh (``B = 0``) or from ``weights`` ({"A", "B", "router"})."""
        if routed and self.num_routed != self.num_experts:
            raise ValueError("routed experts must come before added ones")
        if weights is None:
            A = torch.empty(n, self.r, self.d_in)
            for a in A:  # PEFT's LoRA init for A (kaiming uniform), and nn.Linear's for the router
                nn.init.kaiming_uniform_(a, a=5**0.5)
            router = torch.empty(n, self.d_in)
            nn.init.kaiming_uniform_(router, a=5**0.5)
            weights = {"A": A, "B": torch.zeros(n, self.d_out, self.r), "router": router}
        for name, trainable in (("A", train_experts), ("B", train_experts), ("router", train_router)):
            t = weights[name].detach().to(device=self.like.device, dtype=self.like.dtype, copy=True)
            getattr(self, name).append(nn.Parameter(t, requires_grad=trainable))
        self.num_routed += n if routed else 0

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A (E, r, d_in), B (E, d_out, r) and router (E, d_in) of all experts."""
        if len(self.A) == 1:
            return self.A[0], self.B[0], self.router[0]
        return torch.cat(list(self.A)), torch.cat(list(self.B)), torch.cat(list(self.router))

    def gates(self, logits: torch.Tensor) -> torch.Tensor:
        """(tokens, E) gates: the top-k softmax over the routed experts, zero elsewhere; added experts after."""
        n = self.num_routed
        routed = logits[:, :n]
        top, chosen = routed.topk(min(self.top_k, n), dim=-1)
        gates = torch.zeros_like(routed).scatter(-1, chosen, top.softmax(-1))
        if self.record and self.enabled and self.training and torch.is_grad_enabled():
            self.stats = (routed.softmax(-1), chosen)
        if n < logits.shape[-1]:
            gates = torch.cat([gates, (logits - logits.logcumsumexp(-1))[:, n:].exp()], -1)
        if self.seen is not None:
            self.seen.append(gates.detach())
        return gates

    def active(self) -> list[int]:
        """The groups that add their update. While disabled (``adapters_disabled``) none does, unless
        some groups train and others are frozen: then the frozen ones stay, so the model computes what
        the run started from (earlier experts included), as PEFT does for a merged earlier LoRA."""
        groups = list(range(len(self.A)))
        if self.enabled:
            return groups
        frozen = [i for i in groups if not self.A[i].requires_grad]
        return frozen if len(frozen) < len(groups) else []

    def forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The update to add to ``W x``; None when no group is active."""
        active = self.active()
        if not active:
            return None
        h = x.reshape(-1, self.d_in)
        logits = torch.cat([F.linear(h, R) for R in self.router], -1) if len(self.router) > 1 else F.linear(h, self.router[0])
        gates = self.gates(logits) * self.scaling
        h = self.dropout(h)
        # Group by group, so that adding a group leaves the earlier groups' arithmetic bit for bit.
        out, start = 0, 0
        for i, (A, B) in enumerate(zip(self.A, self.B)):
            E = A.shape[0]
            if i in active:
                z = F.linear(h, A.reshape(E * self.r, self.d_in)).view(-1, E, self.r) * gates[:, start : start + E, None]
                out = out + F.linear(z.reshape(-1, E * self.r), B.transpose(0, 1).reshape(self.d_out, E * self.r))
            start += E
        return out.view(*x.shape[:-1], self.d_out)


def _add_update(module: nn.Module, args, output):
    """Forward hook of a target layer: ``W x`` plus its experts' update."""
    update = getattr(module, EXPERTS)(args[0])
    return output if update is None else output + update


def expert_layers(model) -> dict[str, LoRAExperts]:
    """The experts of every adapted layer, by the layer's qualified name."""
    return {n.rsplit(".", 1)[0]: m for n, m in model.named_modules() if isinstance(m, LoRAExperts)}


def find_linear_targets(model, names: list[str], where: str) -> list[str]:
    """Qualified names of the linear layers matching ``names`` (PEFT's suffix rule)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = [n for n in linear if any(n == t or n.endswith("." + t) for t in names)]
    if not found:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(f"{where}: no linear layer is named {names}; the model's linear layers are {short}")
    return found


def attach_experts(model, modules: list[str], r: int, alpha: float, top_k: int, dropout: float) -> dict[str, LoRAExperts]:
    """Give each named linear layer an (empty) LoRAExperts module and the hook that applies it."""
    out = {}
    for name in modules:
        layer = model.get_submodule(name)
        layer.add_module(EXPERTS, LoRAExperts(layer.weight, r, alpha, top_k, dropout))
        layer.register_forward_hook(_add_update)
        out[name] = getattr(layer, EXPERTS)
    return out


def check_plain_model(model, where: str, own: Optional[str] = None) -> None:
    """Refuse models that already carry adapters of another kind (a run saves one kind)."""
    others = [k.name for k in ADAPTER_KINDS.values() if k.name != own and k.detect(model)]
    if is_peft_model(model) or others:
        what = "a PEFT adapter" if is_peft_model(model) else f"{others[0]} adapters"
        raise ConfigError(f"{where}: the model carries {what}; start from its base model (or merge it first: forgetless merge)")


def balance_loss(layers, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Switch balancing loss of the last forward (mean over layers), and each expert's share of
    the assignments; uses and clears the statistics the layers recorded."""
    losses, shares = [], []
    keep = attention_mask.reshape(-1).bool()
    for layer in layers:
        if layer.stats is None:
            continue
        probs, chosen = layer.stats
        layer.stats = None
        if keep.numel() == probs.shape[0]:  # drop padding tokens
            probs, chosen = probs[keep], chosen[keep]
        E = probs.shape[-1]
        f = torch.bincount(chosen.reshape(-1), minlength=E).to(probs.dtype) / max(chosen.numel(), 1)
        losses.append(E * (f * probs.mean(0)).sum())
        shares.append(f)
    if not losses:
        return torch.zeros(()), torch.zeros(0)
    return torch.stack(losses).mean(), torch.stack(shares).mean(0)


@torch.no_grad()
def routing_shares(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean gate of each expert over the non-padding tokens of the inputs, averaged over layers."""
    layers = list(expert_layers(model).values())
    for layer in layers:
        layer.seen = []
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
        keep = attention_mask.reshape(-1).bool()
        return torch.stack([torch.cat(layer.seen)[keep].mean(0) for layer in layers]).mean(0)
    finally:
        for layer in layers:
            layer.seen = None


# ------------------------------------------------------------------------------------------------
# Saving and loading (the adapter kind)
# ------------------------------------------------------------------------------------------------

def write_adapter(model, out_dir, base_ref, kind: str, tensors: dict, settings: dict) -> None:
    """``{kind}.safetensors`` + ``{kind}_config.json`` + ``forgetless_adapter.json``. The built-in
    random-init ``tiny`` base exists nowhere on disk: it is saved beside, in ``base_model/``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if base_ref == "tiny":
        from forgetless.models.saving import save_base_model
        from forgetless.models.tiny import load_tiny_tokenizer

        save_base_model(model, load_tiny_tokenizer(), out / "base_model")
        base_ref = "base_model"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / f"{kind}.safetensors"))
    (out / f"{kind}_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    (out / ADAPTER_FILE).write_text(json.dumps({"kind": kind, "base_model": str(base_ref)}, indent=2), encoding="utf-8")


def read_adapter(path, kind: str, where: str) -> tuple[dict, dict]:
    """(settings, tensors) of a saved adapter of ``kind``: its directory, or a run directory."""
    from safetensors.torch import load_file

    from forgetless.models.loading import resolve_model_dir

    p = Path(resolve_model_dir(str(path))).expanduser()
    try:
        meta = json.loads((p / ADAPTER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(f"{where}: {path} holds no saved adapter ({ADAPTER_FILE}); give a run directory of a {kind} run or its model/ folder") from None
    if meta.get("kind") != kind:
        raise ConfigError(f"{where}: {path} holds {meta.get('kind')!r} adapters, not {kind!r} ones")
    try:
        settings = json.loads((p / f"{kind}_config.json").read_text(encoding="utf-8"))
        return settings, load_file(str(p / f"{kind}.safetensors"))
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: not a readable {kind} adapter ({e.__class__.__name__}: {str(e).splitlines()[0][:160]})") from None


def experts_settings(model) -> tuple[dict, dict]:
    """(settings, tensors) describing every expert of the model, ready to save."""
    layers = expert_layers(model)
    first = next(iter(layers.values()))
    tensors = {}
    for name, layer in layers.items():
        A, B, router = layer.weights()
        tensors.update({f"{name}.A": A, f"{name}.B": B, f"{name}.router": router})
    settings = {"r": first.r, "alpha": first.alpha, "top_k": first.top_k, "num_experts": first.num_experts,
                "num_routed": first.num_routed, "groups": [a.shape[0] for a in first.A], "modules": list(layers)}
    return settings, tensors


def load_experts(model, settings: dict, tensors: dict, dropout: float = 0.0, where: str = "") -> dict[str, LoRAExperts]:
    """Attach saved experts, frozen and in their saved groups, to the model."""
    try:
        layers = attach_experts(model, settings["modules"], settings["r"], settings["alpha"], settings["top_k"], dropout)
    except AttributeError:
        raise UserError(f"{where}: the saved experts do not fit this model (no layer {settings['modules'][0]!r}); check its base model") from None
    routed, groups = settings["num_routed"], settings["groups"]
    for name, layer in layers.items():
        start = 0
        for n in groups:  # the saved grouping, so that the loaded model computes exactly what was saved
            w = {k: tensors[f"{name}.{k}"][start : start + n] for k in ("A", "B", "router")}
            layer.add(n, w, train_experts=False, train_router=False, routed=start < routed)
            start += n
    return layers


def _save(model, out_dir, base_ref) -> None:
    settings, tensors = experts_settings(model)
    write_adapter(model, out_dir, base_ref, KIND, tensors, settings)


def _load(base, adapter_dir):
    settings, tensors = read_adapter(adapter_dir, KIND, str(adapter_dir))
    load_experts(base, settings, tensors, where=str(adapter_dir))
    return base




# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------


class MoELoRA(Method):
    name = "moe_lora"

    def __init__(self, cfg: MoELoRAConfig):
        self.cfg = cfg
        self.layers: list[LoRAExperts] = []
        self.share_sum: Optional[torch.Tensor] = None
        self.forwards = 0

    def wrap_model(self, model, ctx: Context):
        cfg = self.cfg
        check_plain_model(model, "methods.moe_lora", own=KIND)
        layers = expert_layers(model)
        if not layers:  # a model loaded from a moe_lora run keeps training its experts (their shape wins)
            names = find_linear_targets(model, cfg.target_modules, "methods.moe_lora.target_modules")
            layers = attach_experts(model, names, cfg.r, cfg.alpha, cfg.top_k, cfg.dropout)
            for layer in layers.values():
                layer.add(cfg.num_experts)
        for name, p in model.named_parameters():
            p.requires_grad_(EXPERTS in name)
        self.layers = list(layers.values())
        for layer in self.layers:
            layer.record = True
        return model

    def batch_terms(self, model, batch, out) -> dict[str, torch.Tensor]:
        loss, shares = balance_loss(self.layers, batch["attention_mask"])
        if shares.numel():
            self.share_sum = shares if self.share_sum is None else self.share_sum.to(shares.device) + shares  # restored on the CPU
            self.forwards += 1
        if not self.cfg.balance_weight or not shares.numel():
            return {}
        return {"moe_balance": self.cfg.balance_weight * loss * count_targets(batch["labels"])}

    def state_dict(self) -> dict:
        # the experts and routers are model parameters (saved with the model); this is the routing record
        return {"forwards": self.forwards, **({"share_sum": self.share_sum} if self.share_sum is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.forwards, self.share_sum = int(state["forwards"]), state.get("share_sum")

    def describe(self) -> dict:
        first = self.layers[0]
        out = {"layers": len(self.layers), "num_experts": first.num_experts, "top_k": first.top_k,
               "trainable_params": sum(p.numel() for layer in self.layers for p in layer.parameters() if p.requires_grad)}
        if self.share_sum is not None:
            out["routing_share"] = [round(float(s) / self.forwards, 4) for s in self.share_sum]
        return out


def attach(model, settings: dict) -> None:
    """Empty experts in the saved groups of ``settings`` (:func:`experts_settings`), weights to be loaded
    (the exported model's code: transformers then loads every expert's weights from the checkpoint)."""
    layers = attach_experts(model, settings["modules"], settings["r"], settings["alpha"], settings["top_k"], 0.0)
    for layer in layers.values():
        start = 0
        for n in settings["groups"]:
            layer.add(n, train_experts=False, train_router=False, routed=start < settings["num_routed"])
            start += n


def _export(model) -> tuple[str, dict]:
    """forgetless merge: the experts' code, to run with transformers alone (forgetless/models/export.py)."""
    from forgetless.models.export import sources

    code = sources(f"EXPERTS = {EXPERTS!r}", LoRAExperts, _add_update, attach_experts, attach)
    return code, experts_settings(model)[0]


register_adapter_kind(AdapterKind(
    KIND, detect=lambda m: bool(expert_layers(m)), disable=lambda m: switched_off(expert_layers(m).values()), save=_save, load=_load,
    export=_export,
))

register(
    "moe_lora",
    MoELoRAConfig,
    MoELoRA,
    "Mixture of LoRA experts (LoRAMoE / MoLA): a per-token router picks top_k of num_experts LoRAs per layer; base frozen.",
    phase=ADAPT,
    provides={
        ADAPTER: "",
        FREEZES_BASE: "moe_lora freezes every base weight itself (only the experts and routers train), so freeze's choice would be silently overridden",
    },
    prefix="moe_lora_experts",
)
