"""Elastic weight consolidation: keep the weights that old knowledge depends on near their values.

    penalty = weight / 2 * sum_i F_i (theta_i - theta_old_i)^2

over the *trainable* parameters (so with freeze it covers what trains, with LoRA the adapter,
anchored at its initial values). ``theta_old`` are the weights at the start of the run and ``F``
the diagonal Fisher information of the loss on old-task or general data at those weights (see
:mod:`forgetless.methods.fisher`): a parameter the old data is sensitive to is expensive to move
(Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", PNAS).

Online EWC (Schwarz et al. 2018, "Progress & Compress", ICML): with ``previous_state`` (the
``ewc_state.safetensors`` of the previous run of a task sequence) the Fisher is
``gamma * F_prev + F_new``; the anchors are this run's start weights. Every run saves its Fisher
and anchors to ``ewc_state.safetensors`` (safetensors, never pickle) for the next one.

``F`` is a mean over examples of squared gradients of per-example mean token losses, and the
penalty is added once per optimiser step next to the token-mean LM loss; in the Bayesian reading
(a Laplace approximation of the old posterior) ``weight`` is roughly the number of old examples
the penalty stands for per new one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from forgetless.config import DatasetSpec, option
from forgetless.errors import ConfigError, UserError
from forgetless.methods.base import Context, Method
from forgetless.registry import register, REGULARIZE, STARTS_AT_BASE, STRENGTH
from forgetless.methods.fisher import FISHER_KINDS, diagonal_fisher, trainable
from forgetless import zero
from forgetless.sharding import gathered, held_bytes, is_dtensor, local, shard_like

STATE_FILE = "ewc_state.safetensors"
STATE_FORMAT = "forgetless.ewc/1"


@dataclass
class EWCConfig:
    """Penalty on moving the weights that matter for old / general data (diagonal Fisher)."""

    weight: float = option(
        1e4,
        "lambda: strength of the penalty weight/2 * sum F (theta - theta_old)^2. Tune it: the Fisher's scale depends "
        "on the model, the data and the kind (the run summary shows fisher_sum and fisher_max).",
    )
    fisher: Literal["empirical", "sampled"] = option(
        "sampled",
        "'sampled' (the 'true' Fisher): gradients of labels drawn from the model's own predictions at each target "
        "position (seeded by train.seed); 'empirical': gradients of the data's own labels, near zero on data the "
        "model already fits, so it needs a far larger weight.",
    )
    data: Optional[DatasetSpec] = option(None, "Old-task or general data to compute the Fisher on (default: the first data.keep set).")
    samples: int = option(128, "Examples of the data used for the Fisher (the first N).")
    chunk_size: int = option(8, "Examples whose per-example gradients are computed at once (memory: chunk_size x trainable parameters).")
    anchor_dtype: Literal["auto", "bfloat16"] = option(
        "auto", "dtype the anchors and the weight x Fisher tensors are kept in on the device: 'auto', the parameters' own; "
        "'bfloat16' halves them for float32 weights (the penalty is still computed in the parameters' dtype)."
    )
    normalize: Literal["none", "max", "mean"] = option(
        "none",
        "Divide the Fisher used in the penalty by its largest ('max') or mean ('mean') value over all parameters, "
        "which makes weight less dependent on the model and data; the saved state keeps the raw Fisher.",
    )
    gamma: float = option(1.0, "Online EWC: decay of the previous Fisher, F = gamma * F_prev + F_new (with previous_state).")
    previous_state: Optional[str] = option(
        None, "Online EWC: the ewc_state.safetensors of the previous run of a task sequence (or that run's directory).",
        path=True,
    )

    def validate(self, where: str) -> None:
        if self.weight < 0:
            raise ConfigError(f"{where}.weight must be >= 0, got {self.weight}")
        if self.fisher not in FISHER_KINDS:
            raise ConfigError(f"{where}.fisher must be one of {', '.join(FISHER_KINDS)}, got {self.fisher!r}")
        for key in ("samples", "chunk_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"{where}.gamma must be in [0, 1], got {self.gamma}")
        if self.previous_state is not None and not state_path(self.previous_state).is_file():
            raise ConfigError(f"{where}.previous_state: {self.previous_state} not found; give the {STATE_FILE} of a previous run or its run directory")


def state_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p / STATE_FILE if p.is_dir() else p


class _AnchoredSquares(torch.autograd.Function):
    """``1/2 * sum_i w_i (p_i - a_i)^2`` and its gradient ``w_i (p_i - a_i)``; ``w``: tensors or a number.

    Written by hand because autograd would record several small ops per parameter tensor and keep
    their intermediates; here the gradient is computed in the forward pass by two fused
    ``torch._foreach_*`` calls over all tensors, and the value is a dot product per tensor.
    """

    @staticmethod
    def forward(ctx, weights, anchors: list, *params):
        diffs = torch._foreach_sub(params, anchors)
        grads = torch._foreach_mul(diffs, weights)
        ctx.save_for_backward(*grads)  # freed after backward
        return torch.stack([_dot(g, d) for g, d in zip(grads, diffs)]).sum() / 2

    @staticmethod
    def backward(ctx, grad_out):
        grads = ctx.saved_tensors
        return (None, None, *torch._foreach_mul(grads, grad_out.to(grads[0].dtype)))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) without materialising the product, accumulated in float32 or better."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum(dtype=torch.float32)


def anchored_squares(params: list, anchors: list, weights) -> torch.Tensor:
    """``1/2 * sum w (p - a)^2`` over lists of tensors, differentiable in ``params``.

    ``weights``: one tensor per parameter (EWC: strength x Fisher) or one number (L2-SP: strength).
    FSDP2 shards (DTensors, anchors and weights sharded alike: :func:`bind_anchored`): the penalty
    of this process's shards, whose gradient is exactly theirs; the processes' values sum to the
    whole penalty (the recipe adds them up for the log). ZeRO-3 partitions (anchors and weights
    given as :func:`partitions`): the same, through :func:`forgetless.zero.partitioned_squares`.
    """
    if params and zero.is_partitioned(params[0]):
        return zero.partitioned_squares(params, anchors, weights)
    if params and is_dtensor(params[0]):
        params, anchors = [local(p) for p in params], [local(a) for a in anchors]
        weights = [local(w) for w in weights] if isinstance(weights, list) else weights
    return _AnchoredSquares.apply(weights, anchors, *params)


def kept_dtype(param: torch.Tensor, choice: str) -> torch.dtype:
    """The dtype per-parameter state is kept in: the parameter's ('auto'), or bfloat16 for floating weights."""
    return torch.bfloat16 if choice == "bfloat16" and param.is_floating_point() else param.dtype


def anchor_copy(param: torch.Tensor, choice: str) -> torch.Tensor:
    """A detached copy of ``param`` in :func:`kept_dtype`."""
    return param.detach().to(dtype=kept_dtype(param, choice), copy=True)


def partitions(params: list, tensors: list) -> list:
    """ZeRO-3: this process's partition of each whole tensor, like its parameter's."""
    return [zero.local_partition(t, p) for t, p in zip(tensors, params)]


def bind_anchored(model, names: list[str], *per_param: list) -> tuple:
    """The trainable parameters ``names`` of ``model`` as ``prepare()`` left them, and each list of
    per-parameter tensors (whole, captured before) sharded like them (FSDP2; unchanged otherwise)."""
    live = trainable(model)
    missing = [n for n in names if n not in live]
    if missing:
        raise RuntimeError(f"parameter {missing[0]} is no longer trainable after prepare()")
    params = [live[n] for n in names]
    return (params, *[[shard_like(t, p) for t, p in zip(tensors, params)] for tensors in per_param])


class EWC(Method):
    name = "ewc"

    def __init__(self, cfg: EWCConfig):
        self.cfg = cfg
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.anchors: list[torch.Tensor] = []
        self.fisher: list[torch.Tensor] = []  # raw, on the CPU (what is saved and accumulated)
        self.weights: list[torch.Tensor] = []  # weight * normalised Fisher, like the parameters (what the penalty uses)
        self.samples = 0
        self._stats: dict = {}  # the whole Fisher's statistics, taken before FSDP2 splits it (bind)
        self._partitions: Optional[tuple] = None  # ZeRO-3: the anchors' and weights' partitions the penalty uses (bind)

    def before_train(self, model, ctx: Context) -> None:
        cfg = self.cfg
        if ctx.restored(self.name) is not None:  # resuming: the Fisher and anchors come back in load_state_dict
            params = trainable(model)
            self.names, self.params = list(params), list(params.values())
            return
        spec = cfg.data
        if spec is None:
            if ctx.keep is None:
                raise ConfigError("methods.ewc.data is not set and there is no data.keep set to compute the Fisher on; set methods.ewc.data=PATH")
            spec = ctx.keep
        params = trainable(model)
        previous = load_state(cfg.previous_state, params) if cfg.previous_state is not None else None
        examples = ctx.load_dataset(spec)[: cfg.samples]
        self.samples = len(examples)
        try:
            fisher = diagonal_fisher(model, examples, ctx.tokenizer.pad_token_id, cfg.fisher, ctx.seed, cfg.chunk_size)
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"methods.ewc.chunk_size: out of memory computing {cfg.chunk_size} per-example gradients at once; lower it") from None
        if previous is not None:
            fisher = {n: cfg.gamma * previous[n].to(f) + f for n, f in fisher.items()}
        self.names = list(params)
        self.params = list(params.values())
        self.anchors = [anchor_copy(p, self.cfg.anchor_dtype) for p in self.params]
        self.fisher = [fisher[n].cpu() for n in self.names]  # off the accelerator: the penalty uses self.weights
        self._set_weights()

    def _set_weights(self) -> None:
        """What the penalty multiplies: weight x Fisher (normalised if asked), like the parameters."""
        top = self.fisher_max()
        if top == 0:
            warnings.warn("methods.ewc: the Fisher is zero on every trainable parameter, so the penalty is zero", stacklevel=2)
        scale = {"none": 1.0, "max": top, "mean": self.fisher_mean()}[self.cfg.normalize] or 1.0
        self.weights = [(f * (self.cfg.weight / scale)).to(device=p.device, dtype=kept_dtype(p, self.cfg.anchor_dtype))
                        for f, p in zip(self.fisher, self.params)]

    def fisher_max(self) -> float:
        return float(torch.stack([f.max() for f in self.fisher]).max())

    def fisher_mean(self) -> float:
        return float(sum(f.sum() for f in self.fisher) / sum(f.numel() for f in self.fisher))

    def bind(self, model, ctx: Context) -> None:
        self.params, self.anchors, self.weights, fisher = bind_anchored(model, self.names, self.anchors, self.weights, self.fisher)
        if self.params and is_dtensor(self.params[0]):  # FSDP2: the raw Fisher as shards too, nothing whole left per process
            self._stats = self._fisher_stats()  # of the whole Fisher, before it is split (a shard's max is not the max)
            self.fisher = fisher
        if self.params and zero.is_partitioned(self.params[0]):  # ZeRO-3: partitions only (gathered for checkpoints and the saved state)
            self._stats = self._fisher_stats()  # of the whole Fisher, before it is cut
            self.anchors = zero.partition_all(self.anchors, self.params)
            self.fisher = zero.partition_all(self.fisher, self.params, device="cpu")  # the raw Fisher stays off the device
            self._partitions = ([a.data for a in self.anchors], partitions(self.params, self.weights))
            self.weights = []

    def step_terms(self, model) -> dict[str, torch.Tensor]:
        if self._partitions is not None:
            return {"ewc": anchored_squares(self.params, *self._partitions)}
        if self.anchors and self.anchors[0].device != self.params[0].device:  # the recipe moved the model
            self.anchors = [a.to(p.device) for a, p in zip(self.anchors, self.params)]
            self.weights = [w.to(p.device) for w, p in zip(self.weights, self.params)]
        return {"ewc": anchored_squares(self.params, self.anchors, self.weights)}

    def after_train(self, model, ctx: Context) -> None:
        metadata = {"fisher": self.cfg.fisher, "samples": str(self.samples)}
        # sharded: gathered by every process, one tensor at a time, to the main process's CPU
        fisher, anchors = [gathered(f, ctx.is_main) for f in self.fisher], [gathered(a, ctx.is_main) for a in self.anchors]
        ctx.save_artifact(STATE_FILE, lambda path: save_state(path, self.names, fisher, anchors, metadata))

    def state_dict(self) -> dict:
        return {
            **{f"fisher.{n}": f for n, f in zip(self.names, self.fisher)},
            **{f"anchor.{n}": a for n, a in zip(self.names, self.anchors)},
            "samples": self.samples,
        }

    def load_state_dict(self, state: dict) -> None:
        self.fisher = [state[f"fisher.{n}"].cpu() for n in self.names]
        self.anchors = [state[f"anchor.{n}"] for n in self.names]
        self.samples = int(state.get("samples", self.samples))
        self._set_weights()

    @classmethod
    def next_task(cls, options: EWCConfig, link) -> Optional[EWCConfig]:
        """Online EWC: the Fisher of the task just learned (or of ``data`` when set, at every task),
        added to the decayed Fisher of the previous run."""
        if options.data is None:
            if not link.previous_train:
                link.note("ewc: nothing to protect before the second task (set methods.ewc.data to protect general data)")
                return None
            options.data = link.previous_train[0]
        if link.previous is not None and (link.previous / STATE_FILE).is_file():
            options.previous_state = str(link.previous)
        return options

    def _fisher_stats(self) -> dict:
        return {"fisher_sum": float(sum(f.sum() for f in self.fisher)), "fisher_max": self.fisher_max()} if self.fisher else {}

    def describe(self) -> dict:
        out = {"fisher": self.cfg.fisher, "samples": self.samples, "weight": self.cfg.weight, "normalize": self.cfg.normalize,
               # anchors, raw Fisher and weights as this process holds them (sharded: its shards)
               "held_bytes": held_bytes(self.anchors, self.fisher, self.weights, *(self._partitions or ()))}
        out.update(self._stats or self._fisher_stats())
        if self.cfg.previous_state is not None:
            out["online"] = {"gamma": self.cfg.gamma, "previous_state": str(state_path(self.cfg.previous_state))}
        return out


def save_state(path: Path, names: list[str], fisher: list, anchors: list, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {f"fisher.{n}": f.detach().cpu().contiguous() for n, f in zip(names, fisher)}
    tensors.update({f"anchor.{n}": a.detach().cpu().contiguous() for n, a in zip(names, anchors)})
    save_file(tensors, str(path), metadata={"format": STATE_FORMAT, **metadata})


def load_state(path: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved Fisher of every parameter in ``params``, or a ConfigError saying what does not match."""
    from safetensors import SafetensorError, safe_open

    file = state_path(path)
    where = "methods.ewc.previous_state"
    try:
        with safe_open(str(file), framework="pt") as f:
            if (f.metadata() or {}).get("format") != STATE_FORMAT:
                raise ConfigError(f"{where}: {file} is not an EWC state saved by forgetless ({STATE_FILE})")
            keys = set(f.keys())
            out = {}
            for n, p in params.items():
                if f"fisher.{n}" not in keys:
                    raise ConfigError(f"{where}: {file} does not match the model: it has no Fisher for trainable parameter {n}")
                out[n] = f.get_tensor(f"fisher.{n}").to(p.device)
                if out[n].shape != p.shape:
                    raise ConfigError(f"{where}: {file} does not match the model: {n} has shape {tuple(out[n].shape)} there, {tuple(p.shape)} here")
    except (OSError, ValueError, SafetensorError) as e:  # missing, or not a safetensors file
        raise ConfigError(f"{where}: cannot read {file} ({str(e).splitlines()[0]})") from None
    return out


register("ewc", EWCConfig, EWC, "Elastic weight consolidation: a diagonal-Fisher penalty on moving weights old data depends on (online EWC across runs).",
         phase=REGULARIZE, provides={STARTS_AT_BASE: "", STRENGTH: ""}, backends=("single", "ddp", "fsdp2", "zero2", "zero3", "qlora"))  # on a 4-bit base: the adapters
