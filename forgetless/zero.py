"""DeepSpeed ZeRO (stages 2 and 3, through accelerate): what the recipe needs to keep its guarantees.

DeepSpeed does the partitioning; this module is the glue a training loop of its own needs, written
by hand because accelerate's DeepSpeed path assumes its ``accumulate()`` loop and DeepSpeed's own
checkpoint format (pickled). Under ZeRO:

- **one forgetless step is one engine step.** forgetless accumulates itself (``train.grad_accum_steps``,
  token-weighted over processes); DeepSpeed's own ``gradient_accumulation_steps`` is 1, and every
  backward tells the engine whether it is the step's last (:func:`backward`), so gradients are
  reduced and the optimiser steps once per step, whatever the number of micro-batches;
- **the update** is ``engine.step()`` (:func:`step`): it clips to ``train.max_grad_norm``
  (DeepSpeed's ``gradient_clipping``) and skips a step whose gradient norm is not finite (float32,
  and bf16 with ``check_grad_overflow``), the skip forgetless makes on other backends;
- every process runs as many forward and backward passes (ZeRO-2 reduces gradients in each
  backward, ZeRO-3 gathers parameters in each forward): the recipe pads as under FSDP2;
- **checkpoints are the files of every other backend**: the optimiser's states are read per
  parameter, whole, through DeepSpeed's fragment API (``safe_get_full_optimizer_state``) and
  written back after ``prepare`` on resume (:func:`optimizer_files`, :func:`restore_optimizer`);
  under ZeRO-3 parameters are gathered one at a time to save them (:func:`gathered_model`);
- **penalties on ZeRO-3 partitions** (L2-SP, EWC): computed on each process's partition, their
  gradient added to the partition's gradient before the engine's step (:func:`partitioned_squares`);
  the anchors and Fisher are kept as partitions only (:class:`Partition`), gathered whole one at a
  time for a checkpoint.

accelerate forms DeepSpeed only on accelerators (on a CPU it gives DDP, or N single-process runs).
:func:`enable_on_cpu` switches the same accelerate code path on for a CPU process group (gloo),
where DeepSpeed's CPU accelerator runs ZeRO, so that CI tests the path a GPU run takes.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Optional
import torch

from forgetless.errors import UserError

__all__ = ["is_deepspeed", "stage", "enable_on_cpu", "config_problem", "read_config", "configure", "engine", "backward", "step", "optimizer_files",
           "restore_optimizer", "gathered_model", "model_tensors", "is_partitioned", "local_partition", "Partition", "partition_all",
           "partitioned_squares"]


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def stage(accelerator) -> int:
    """The ZeRO stage of the run (0: not DeepSpeed)."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def enable_on_cpu(accelerator, mixed_precision: str) -> None:
    """Give a CPU process group accelerate's DeepSpeed path, configured from the environment like a
    GPU launch (``ACCELERATE_DEEPSPEED_*``, a config file). A no-op where accelerate did it itself."""
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        return
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(mixed_precision)
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state.distributed_type = DistributedType.DEEPSPEED
    # as on a GPU launch, the process state says DeepSpeed too: a later AcceleratorState() (prepare
    # makes some) copies its type from it
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    state._mixed_precision = "no"  # as accelerate sets it under DeepSpeed: the engine casts, from its config
    if not hasattr(accelerator, "deepspeed_engine_wrapped"):
        accelerator.deepspeed_engine_wrapped = None
    _quiet()


def _quiet() -> None:
    """DeepSpeed logs every engine setting at INFO; forgetless shows its own progress."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def config_problem(ds: dict, cfg, where: str = "the DeepSpeed config") -> Optional[str]:
    """What in a DeepSpeed config would break forgetless's loop (None: nothing), in one line naming the key."""
    t = cfg.train
    for section, instead in (("optimizer", "train.lr, train.weight_decay, train.adam_*"), ("scheduler", "train.scheduler, train.warmup_*")):
        if section in ds:
            return f"{where}: remove its {section!r} section; forgetless builds its own ({instead})"
    gas = ds.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1, None):
        return (f"{where}: gradient_accumulation_steps={gas}; forgetless accumulates itself: set train.grad_accum_steps={gas} "
                f"and leave the DeepSpeed value 'auto'")
    clip = ds.get("gradient_clipping", "auto")
    if clip not in ("auto", None) and float(clip) != float(t.max_grad_norm or 0.0):
        return (f"{where}: gradient_clipping={clip} differs from train.max_grad_norm={t.max_grad_norm}; set train.max_grad_norm "
                f"and leave the DeepSpeed value 'auto'")
    zero = ds.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in ("none", None):
            return f"{where}: zero_optimization.{key} to {device} is not tested with forgetless; remove it (the README's support table lists what is)"
    if str((ds.get("fp16") or {}).get("enabled", False)).lower() == "true":
        return f"{where}: fp16 is not tested with forgetless under DeepSpeed; remove it and use train.mixed_precision=bf16"
    stage = zero.get("stage", "auto")
    if stage not in ("auto", 2, 3):
        return f"{where}: zero_optimization.stage={stage}; forgetless runs stages 2 and 3 (or DDP: launch without DeepSpeed)"
    return None


def read_config(path: str, cfg) -> dict:
    """A DeepSpeed JSON config file, checked (:func:`config_problem`); a UserError names the file."""
    import json

    try:
        ds = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read the DeepSpeed config ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(ds, dict):
        raise UserError(f"{path}: a DeepSpeed config is a JSON object")
    why = config_problem(ds, cfg, path)
    if why:
        raise UserError(why)
    return ds


def configure(accelerator, cfg) -> None:
    """Fit the DeepSpeed config to forgetless's loop (one step = one engine step), refusing in one line what would break it."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    source = getattr(plugin.hf_ds_config, "config_file_or_dict", None)
    why = config_problem(ds, cfg, str(source) if isinstance(source, (str, Path)) else "the DeepSpeed config")
    if why is None and int(plugin.zero_stage) not in (2, 3):
        why = f"ZeRO stage {plugin.zero_stage}: forgetless runs stages 2 and 3 (or DDP: launch without DeepSpeed)"
    if why:
        raise UserError(why)
    t = cfg.train
    ds["gradient_accumulation_steps"] = 1
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["train_batch_size"] = t.micro_batch_size * accelerator.num_processes
    ds["gradient_clipping"] = float(t.max_grad_norm or 0.0)
    ds["steps_per_print"] = 2**31 - 1  # the engine's own throughput lines; forgetless logs every step
    _quiet()


def engine(accelerator):
    """The DeepSpeed engine ``prepare`` made (None before it, or when the run is not DeepSpeed)."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return wrapped.engine if wrapped is not None and is_deepspeed(accelerator) else None


def backward(accelerator, loss: torch.Tensor, last: bool) -> None:
    """One micro-batch's backward; ``last``: the step's last on this process (its gradients are
    reduced then, and :func:`step` may run after it). Not accelerate's backward, which steps the
    engine on every call outside ``accumulate()``."""
    e = engine(accelerator)
    e.set_gradient_accumulation_boundary(is_boundary=last)
    e.backward(loss)


def step(accelerator) -> tuple[float, bool]:
    """The engine's update (clip, step, zero the gradients). Returns the gradient norm before
    clipping (inf where it was not finite) and whether the engine skipped the update for it."""
    e = engine(accelerator)
    _apply_deferred()  # penalties on ZeRO-3 partitions: their gradients, before the engine clips and steps
    e.step()
    norm = e.get_global_grad_norm()
    norm = float(norm.item() if torch.is_tensor(norm) else (norm if norm is not None else float("nan")))
    skipped = bool(getattr(e.optimizer, "overflow", False))
    return (float("inf") if skipped else norm), skipped


def _inner(optimizer):
    """The torch optimiser forgetless built, inside accelerate's and DeepSpeed's wrappers."""
    opt = optimizer
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _flat_state(optimizer) -> dict:
    """The torch optimiser's states of DeepSpeed's flat partitions, and the step they share."""
    return _inner(optimizer).state


def optimizer_files(optimizer, model, order: list[str], groups: list[dict], keep: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimiser's state in the files of every other backend: ``state.<index>.<key>`` whole per
    parameter (``order``: the trainable parameters' names in the optimiser's order before
    ``prepare``; ``groups``: its param_groups then, with parameter indices). Every process must
    call it (each state is assembled over the processes); only those that ``keep`` get tensors."""
    from deepspeed.utils import safe_get_full_optimizer_state

    state = _flat_state(optimizer)
    flat = next(iter(state.values()), None)
    tensors: dict[str, torch.Tensor] = {}
    if flat is not None:
        _link(_ds_optimizer(optimizer))
        params = dict(model.named_parameters())
        keys = [k for k, v in flat.items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() > 1]
        step_value = flat.get("step")
        for i, name in enumerate(order):
            for key in keys:
                whole = safe_get_full_optimizer_state(params[name], key)
                if keep:
                    tensors[f"state.{i}.{key}"] = whole.detach().float().cpu().clone()
            if keep and step_value is not None:
                tensors[f"state.{i}.step"] = torch.as_tensor(step_value).detach().float().cpu().clone().reshape(())
    live = _inner(optimizer).param_groups
    saved_groups = [{**{k: v for k, v in g.items() if k != "params"}, **{k: v for k, v in live[j].items() if k != "params"}, "params": g["params"]}
                    for j, g in enumerate(groups)]
    return tensors, {"param_groups": saved_groups, "state": {}, "param_names": list(order)}


def restore_optimizer(optimizer, model, order: list[str], tensors: dict[str, torch.Tensor], info: dict, where: Path) -> None:
    """Write a checkpoint's whole per-parameter states into DeepSpeed's partitions (after ``prepare``;
    every process calls it, each keeping its own partition)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    if list(info["param_names"]) != list(order):
        raise UserError(f"{where}: the checkpoint's optimiser covers other parameters than this run trains; resume with the run's own config")
    inner = _inner(optimizer)
    ds_opt = _ds_optimizer(optimizer)
    flats = _flat_partitions(ds_opt)
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        by_index.setdefault(int(index), {})[name] = value
    first = by_index.get(0, {})
    keys = [k for k in first if k != "step"]
    if keys:  # DeepSpeed creates the states at its first step: create them, then fill them
        step_value = first.get("step", torch.tensor(0.0))
        for flat in flats:
            entry = inner.state[flat]
            entry.setdefault("step", torch.zeros((), dtype=torch.float32, device=flat.device) + float(step_value))
            for k in keys:
                entry.setdefault(k, torch.zeros_like(flat))
        _link(ds_opt)
        params = dict(model.named_parameters())
        for i, name in enumerate(order):
            for k in keys:
                value = by_index[i][k].to(flats[0].device)
                safe_set_full_optimizer_state(params[name], value, k)
    for saved, live in zip(info["param_groups"], inner.param_groups):
        for k, v in saved.items():
            if k != "params":
                live[k] = tuple(v) if isinstance(live.get(k), tuple) else v


def _link(ds_opt) -> None:
    """ZeRO-2: point every parameter at its fragment of the optimiser's current states (DeepSpeed
    links them once, at its first step, and not again when they are replaced)."""
    if hasattr(ds_opt, "_lazy_init_hp_params_optimizer_state"):
        ds_opt._hp_optimizer_states_linked = False
        ds_opt._lazy_init_hp_params_optimizer_state()


def _ds_optimizer(optimizer):
    opt = optimizer
    while hasattr(opt, "optimizer") and not hasattr(opt, "loss_scaler") and not hasattr(opt, "fp32_partitioned_groups_flat") \
            and not hasattr(opt, "single_partition_of_fp32_groups"):
        opt = opt.optimizer
    return opt


def _flat_partitions(ds_opt) -> list[torch.Tensor]:
    if hasattr(ds_opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return list(ds_opt.single_partition_of_fp32_groups)
    if hasattr(ds_opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(ds_opt.fp32_partitioned_groups_flat)
    raise RuntimeError(f"unknown DeepSpeed optimiser {type(ds_opt).__name__}: cannot restore its state")


def _partitioned(p) -> bool:
    return hasattr(p, "ds_id")  # a ZeRO-3 parameter (its data is this process's partition, outside a forward)


def model_tensors(model, names: list[str], keep: bool) -> dict[str, torch.Tensor]:
    """``names``' tensors of ``model``, whole, to the CPU of processes that ``keep`` them (every
    process must call it under ZeRO-3, where each is gathered in turn)."""
    import deepspeed

    out = {}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for n in names:
        t = params.get(n, buffers.get(n))
        if t is not None and _partitioned(t):
            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                if keep:
                    out[n] = t.detach().cpu().clone()
        elif keep and t is not None:
            out[n] = t.detach()
    return out


@contextmanager
def gathered_model(model, keep: bool = True):
    """``model`` with whole, plain parameters in place of ZeRO-3's partitions (what
    ``save_pretrained`` reads), gathered one by one and kept on processes with ``keep``. Every
    process must enter it; the partitioned parameters come back on exit. A no-op outside ZeRO-3."""
    import deepspeed

    swapped, whole = [], {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not _partitioned(p):
                continue
            if id(p) not in whole:  # a tied parameter is gathered once and stays tied
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    whole[id(p)] = torch.nn.Parameter(p.detach().cpu().clone(), requires_grad=p.requires_grad) if keep else None
            if keep:
                swapped.append((module, name, p))
                module._parameters[name] = whole[id(p)]
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p



# ------------------------------------------------------------------------------------------------
# Penalties on ZeRO-3 partitions (L2-SP, EWC): outside a forward pass a ZeRO-3 parameter holds no
# values, only this process's partition (``ds_tensor``), and its gradient lives in the
# optimiser's partition. The penalty 1/2 sum w (p - a)^2 is separable, so each process computes it
# on its partition (the values sum to the whole penalty) and adds its gradient w (p - a), times
# the factor the loss gives the term, to its gradient partition after the backward pass and
# before the engine's step (:func:`step`), where the model's own gradients are already reduced.
# ------------------------------------------------------------------------------------------------

_DEFERRED: list = []  # (parameter, gradient of its partition): added to the gradients before the next step


def is_partitioned(p) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter (its data this process's partition outside a forward)."""
    return _partitioned(p)


def local_partition(t: torch.Tensor, p) -> torch.Tensor:
    """This process's ZeRO-3 partition of ``t`` (whole, shaped like ``p``): the flat slice DeepSpeed
    keeps of ``p``, zero-padded at the end like it, on ``p``'s device."""
    import torch.distributed as dist

    part = p.ds_tensor.numel()
    start = dist.get_rank(group=p.ds_process_group) * part
    piece = t.detach().reshape(-1)[start:start + part]
    if piece.numel() < part:
        piece = torch.cat([piece, piece.new_zeros(part - piece.numel())])
    return piece.to(p.ds_tensor.device, copy=True)


class Partition:
    """This process's ZeRO-3 partition of a per-parameter tensor a method keeps (an anchor, a
    Fisher): the flat slice :func:`local_partition` cuts, with the parameter it is cut like. A
    method keeps these instead of the whole tensors, so that its memory scales down with the
    processes, as under FSDP2; :meth:`whole` puts the tensor together again for a checkpoint or a
    saved state (collective: every process calls it, one tensor at a time)."""

    __slots__ = ("data", "param")

    def __init__(self, data: torch.Tensor, param) -> None:
        self.data, self.param = data, param

    def whole(self, keep: bool) -> Optional[torch.Tensor]:
        """The whole tensor, shaped like the parameter, on the CPU where ``keep`` (None elsewhere)."""
        import torch.distributed as dist

        group = self.param.ds_process_group
        data = self.data.to(self.param.ds_tensor.device).contiguous()  # NCCL gathers on the device
        parts = [torch.empty_like(data) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, data, group=group)
        if not keep:
            return None
        return torch.cat(parts)[: self.param.ds_numel].reshape(self.param.ds_shape).cpu()


def partition_all(tensors: list, params: list, device: Optional[str] = None) -> list:
    """:class:`Partition` of each whole tensor like its parameter (on ``device``, default the parameter's)."""
    return [Partition(local_partition(t, p) if device is None else local_partition(t, p).to(device), p) for t, p in zip(tensors, params)]


class _PartitionedSquares(torch.autograd.Function):
    """``1/2 sum w (p - a)^2`` over this process's partitions; its backward defers ``w (p - a) x
    grad_out`` to the partitions' gradients (applied in :func:`step`)."""

    @staticmethod
    def forward(ctx, handle, params: list, anchors: list, weights):
        value = torch.zeros((), dtype=torch.float32, device=handle.device)
        grads = []
        for i, p in enumerate(params):
            theta = p.ds_tensor.detach()
            diff = theta - anchors[i].to(theta.dtype)
            g = diff * (weights[i].to(theta.dtype) if isinstance(weights, list) else weights)
            value = value + torch.dot(g.float(), diff.float())
            grads.append(g)
        ctx.params, ctx.grads = params, grads
        return value / 2

    @staticmethod
    def backward(ctx, grad_out):
        _DEFERRED.extend((p, g.float() * grad_out.float()) for p, g in zip(ctx.params, ctx.grads))
        ctx.params = ctx.grads = None
        return torch.zeros((), device=grad_out.device), None, None, None


def partitioned_squares(params: list, anchors: list, weights) -> torch.Tensor:
    """The penalty of this process's partitions (``anchors`` and ``weights``: :func:`local_partition`
    of the whole ones; ``weights`` may be one number); differentiable in effect: the loss's
    backward defers its gradient to the partitions."""
    handle = torch.zeros((), device=params[0].ds_tensor.device, requires_grad=True)  # gives the term a backward
    return _PartitionedSquares.apply(handle, params, anchors, weights)


def _apply_deferred() -> None:
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    for p, g in _DEFERRED:
        current = safe_get_local_grad(p)
        safe_set_local_grad(p, current + g.to(current.device, current.dtype).reshape(current.shape))
    _DEFERRED.clear()
