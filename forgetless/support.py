"""Where each method is known to be right: the support table, and the refusals made from it.

A backend is how a run is placed on its devices: ``single`` (one process), ``ddp`` (several
processes, each a full copy: ``--nproc``, torchrun), ``fsdp2`` / ``fsdp1`` (parameters sharded by
FSDP through ``accelerate launch``), ``zero2`` / ``zero3`` (DeepSpeed ZeRO through ``accelerate
launch``), and ``qlora`` (a 4-bit base, ``model.load_in_4bit``; on top of single or ddp). Every
method declares the backends it is tested on (``register(..., backends=...)``, default single and
ddp); plain full fine-tuning is :data:`PLAIN`'s. A run on any other backend is refused before it
loads anything, in one line naming the method and what to do. The README's table is
:func:`support_table`'s output, and a test compares the two, so the table cannot drift from the
refusals.

FSDP2 is built for the methods that declare it (forgetless/sharding.py says how: methods bind
their per-parameter tensors after ``prepare`` and shard them like the parameters, every process
runs as many passes, checkpoints and the saved model are gathered whole); each is tested with 2
processes against 1. Under FSDP2 the forgetting budget and lm-eval suites are refused: both score
on part of the processes (the budget's samples are split, lm-eval runs on the main process), which
would leave the others waiting in a gather. FSDP1 and DeepSpeed stay refused: DeepSpeed steps its
engine on every micro-batch outside ``accelerator.accumulate``, and nothing here is tested on them.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from forgetless.errors import UserError
from forgetless.registry import BACKENDS, REGISTRY

# what ``accelerate launch`` sets for an FSDP2 config (and ``forgetless train --fsdp2`` for its workers)
FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",  # one FSDP unit per transformer block (the model's _no_split_modules)
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
}
PLAIN = ("single", "ddp", "fsdp2")  # plain full fine-tuning (no method)
LABELS = {"single": "1 process", "ddp": "DDP", "fsdp2": "FSDP2", "fsdp1": "FSDP1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "qlora": "QLoRA"}


def requested_backends(env: Mapping[str, str], load_in_4bit: bool = False) -> list[str]:
    """The backends a run is launched on, from the launcher's environment (what ``accelerate launch``
    and torchrun set) and the config: the placement, plus ``qlora`` for a 4-bit base."""
    truthy = lambda key: str(env.get(key, "")).lower() in ("1", "true", "yes")  # noqa: E731
    if truthy("ACCELERATE_USE_DEEPSPEED"):
        stage = str(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        placement = "zero3" if stage == "3" else "zero2"
    elif truthy("ACCELERATE_USE_FSDP"):
        placement = "fsdp2" if str(env.get("FSDP_VERSION", "1")) == "2" else "fsdp1"
    elif int(env.get("WORLD_SIZE", "1") or 1) > 1:
        placement = "ddp"
    else:
        placement = "single"
    return [placement] + (["qlora"] if load_in_4bit else [])


def unsupported(methods, backends: list[str]) -> Optional[str]:
    """Why this combination is refused (None when every part supports every backend in use)."""
    for backend in backends:
        if not methods and backend not in PLAIN:
            return f"plain full fine-tuning does not run on {LABELS[backend]}"
        for name in sorted(methods):
            if backend not in REGISTRY[name].backends:
                return f"methods.{name} does not run on {LABELS[backend]}"
    if "qlora" in backends and "lora" not in methods:
        return "a 4-bit base trains only adapters: add methods.lora"
    return None


def sharded_refusal(cfg) -> Optional[str]:
    """What of the run's config does not run under FSDP2 (None: all of it does)."""
    b = cfg.budget
    if b.every_steps or b.kl_max is not None or any(s.max_drop is not None for s in cfg.data.keep.values()):
        return "the forgetting budget (budget.*, data.keep.*.max_drop) does not run under FSDP2 yet"
    if cfg.eval.harness.tasks:
        return "eval.harness (lm-eval) does not run under FSDP2: it scores on the main process alone"
    if cfg.model.load_in_4bit:
        return "model.load_in_4bit (QLoRA) is not tested under FSDP2"
    return None


def check_backend(cfg, env: Optional[Mapping[str, str]] = None) -> None:
    """Refuse, in one line, a run on a backend one of its parts is not known to be right on."""
    env = os.environ if env is None else env
    backends = requested_backends(env, cfg.model.load_in_4bit)
    why = unsupported(list(cfg.methods), backends)
    if why is None and backends[0] == "fsdp2":
        why = sharded_refusal(cfg)
    if why is None and "qlora" in backends:
        import torch

        if not torch.cuda.is_available():
            why = "model.load_in_4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels)"
    if why is not None:
        placement = backends[0]
        hint = ("launch with --nproc N (DDP) or one process instead" if placement in ("fsdp2", "fsdp1", "zero2", "zero3")
                else "see the support table in the README")
        raise UserError(f"{why} ({'forgetless does not run under FSDP1 or DeepSpeed yet; ' if placement not in PLAIN else ''}{hint})")


def support_table() -> str:
    """The README's table: every method x backend, from the same declarations as the refusals."""
    head = "| method | " + " | ".join(LABELS[b] for b in BACKENDS) + " |"
    lines = [head, "|" + " --- |" * (len(BACKENDS) + 1)]
    mark = lambda ok: "yes" if ok else "refused"  # noqa: E731
    lines.append("| (plain full fine-tuning) | " + " | ".join(mark(b in PLAIN) for b in BACKENDS[:-1]) + " | refused (needs lora) |")
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        lines.append(f"| {name} | " + " | ".join(mark(b in spec.backends) for b in BACKENDS) + " |")
    return "\n".join(lines)
