"""FSDP2 (torch's ``fully_shard``, through accelerate): what the recipe and methods need on sharded parameters.

Under FSDP2 every parameter of the prepared model is a ``DTensor`` holding this process's shard
(dim 0, uneven shards unpadded), and ``accelerator.prepare`` replaces the parameter objects. So:

- a method that keeps tensors per parameter (L2-SP's and EWC's anchors, EWC's Fisher) captures
  them on the full model before ``prepare`` and *binds* them after it (``Method.bind``): it looks
  its parameters up again by name and shards its tensors like them (:func:`shard_like`), so their
  memory falls with the number of processes;
- a penalty is computed on the local shards (:func:`local`; differentiable), so each process adds
  the penalty of its shard and its shard's gradient; the recipe sums the logged values;
- every process must run the same number of forward and backward passes (each gathers the
  parameters of the blocks it runs): the recipe pads a process's micro-batches to the most any
  process has (:func:`most_over_processes`), with copies weighted 0, scores evaluation sets whole
  on every process and decodes with ``synced_gpus``;
- checkpoints and the saved model gather the full tensors (:func:`full`, :func:`unsharded`), so
  they are the same files as a single-process run's.

accelerate forms FSDP only on accelerators (a CPU launch with an FSDP config gets DDP).
:func:`enable_on_cpu` switches the same accelerate code path on for a CPU process group (gloo),
where torch's ``fully_shard`` runs, so that CI tests the path a GPU run takes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from forgetless.zero import Partition


def enable_on_cpu(accelerator) -> None:
    """Give a CPU process group accelerate's FSDP2 path (its ``prepare``, ``no_sync``, clipping),
    configured from the environment like a GPU launch. A no-op where accelerate did it itself."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return
    # accelerate has no FSDP on CPU (its state turns FSDP on only for accelerator types); the
    # plugin reads the same FSDP_* variables there as on a GPU
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (differentiable), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (every process must call it, in the same order), or the tensor itself."""
    return t.full_tensor() if is_dtensor(t) else t


def gathered(t: torch.Tensor, keep: bool) -> Optional[torch.Tensor]:
    """A DTensor (or a ZeRO-3 :class:`forgetless.zero.Partition`) gathered whole and moved to the
    CPU where ``keep`` (the main process; None elsewhere, so that no process holds many whole
    tensors at once); any other tensor as it is."""
    if isinstance(t, Partition):
        return t.whole(keep)
    if not is_dtensor(t):
        return t if keep else None
    whole = t.full_tensor()
    return whole.detach().cpu() if keep else None


def held_bytes(*groups) -> int:
    """The bytes this process holds of the tensors in ``groups`` (lists of tensors, DTensors or
    ZeRO-3 :class:`forgetless.zero.Partition`): a DTensor's shard, a partition's slice, each
    storage counted once. What a method's per-parameter state costs each process."""
    seen, total = set(), 0
    for group in groups:
        for t in group or ():
            t = t.data if isinstance(t, Partition) else local(t)
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def shard_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``t`` (the whole tensor, the same on every process) sharded like ``param``; unchanged when
    ``param`` is not sharded. Each process keeps its own slice (no communication)."""
    if not is_dtensor(param) or is_dtensor(t):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None)


def _units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model) -> None:
    """Every FSDP unit of ``model`` back to its shards. After a forward pass without backward (an
    evaluation) the root unit stays gathered, and its parameters are plain tensors until its next
    backward; this restores "outside a pass, parameters are DTensor shards"."""
    for unit in _units(model):
        unit.reshard()


@contextmanager
def unsharded(model, keep: bool = True):
    """``model`` with whole, plain parameters in place of its DTensor shards (what ``save_pretrained``
    and the checkpoint read): gathered one by one, kept on processes with ``keep`` (the main one;
    elsewhere the parameters stay shards). Every process must enter it; the shards come back on
    exit. A no-op for a model that is not sharded.

    Written by hand rather than with FSDP2's ``unshard()``: after an evaluation (a forward pass
    with no backward) re-gathering the root unit left its parameters without storage.
    """
    reshard(model)
    swapped, whole = [], {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not is_dtensor(p):
                continue
            if id(p) not in whole:  # a tied parameter (embeddings and head) is gathered once and stays tied
                data = p.full_tensor()
                whole[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad) if keep else None
            if keep:
                swapped.append((module, name, p))
                module._parameters[name] = whole[id(p)]
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def shard_module(module: torch.nn.Module, like: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen copy (the KL teacher) over the same processes as ``like``, one FSDP unit per
    transformer block, as accelerate shards the model. Returns ``module`` (sharded in place)."""
    from torch.distributed.fsdp import fully_shard

    mesh = next(p.device_mesh for p in like.parameters() if is_dtensor(p))
    blocks = set(getattr(module, "_no_split_modules", None) or [])
    for sub in module.modules():
        if type(sub).__name__ in blocks:
            fully_shard(sub, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return module


def most_over_processes(counts: list[int], device) -> list[int]:
    """The elementwise maximum of ``counts`` over all processes."""
    import torch.distributed as dist

    t = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]
