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
runs as many passes, checkpoints and the saved model are gathered whole); DeepSpeed ZeRO-2 and
ZeRO-3 likewise (forgetless/zero.py: one forgetless step is one engine step, the optimiser's
states are read and restored per parameter through DeepSpeed's fragment API). Each is tested with
2 processes against 1, on CPU. Under both the forgetting budget and lm-eval suites are refused:
both score on part of the processes (the budget's samples are split, lm-eval runs on the main
process), which would leave the others waiting. FSDP1 stays refused (untested).
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


def deepspeed_env(stage: int) -> dict[str, str]:
    """What ``accelerate launch --use_deepspeed --zero_stage N`` sets (and ``forgetless train --zero N`` for its workers)."""
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)}


PLAIN = ("single", "ddp", "fsdp2", "zero2", "zero3")  # plain full fine-tuning (no method)
LABELS = {"single": "1 process", "ddp": "DDP", "fsdp2": "FSDP2", "fsdp1": "FSDP1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "qlora": "QLoRA"}


def requested_backends(env: Mapping[str, str], load_in_4bit: bool = False) -> list[str]:
    """The backends a run is launched on, from the launcher's environment (what ``accelerate launch``
    and torchrun set) and the config: the placement, plus ``qlora`` for a 4-bit base."""
    truthy = lambda key: str(env.get(key, "")).lower() in ("1", "true", "yes")  # noqa: E731
    if truthy("ACCELERATE_USE_DEEPSPEED"):
        stage = str(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        in_file = deepspeed_file_stage(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
        if in_file is not None:  # a config file's own stage is the one DeepSpeed runs
            stage = str(in_file)
        if stage not in ("2", "3"):
            raise UserError(f"DeepSpeed ZeRO stage {stage}: forgetless runs stages 2 and 3 (--zero 2 or 3), or DDP without DeepSpeed")
        placement = "zero3" if stage == "3" else "zero2"
    elif truthy("ACCELERATE_USE_FSDP"):
        placement = "fsdp2" if str(env.get("FSDP_VERSION", "1")) == "2" else "fsdp1"
    elif int(env.get("WORLD_SIZE", "1") or 1) > 1:
        placement = "ddp"
    else:
        placement = "single"
    return [placement] + (["qlora"] if load_in_4bit else [])


def deepspeed_file_stage(path: Optional[str]) -> Optional[int]:
    """The ZeRO stage a DeepSpeed config file sets (None: none, "auto", or no file)."""
    if not path or path == "none":
        return None
    import json
    from pathlib import Path

    try:
        stage = (json.loads(Path(path).read_text()).get("zero_optimization") or {}).get("stage")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: the launch check names the file
    return stage if isinstance(stage, int) else None


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


def sharded_refusal(cfg, placement: str = "fsdp2") -> Optional[str]:
    """What of the run's config does not run under FSDP2 or DeepSpeed ZeRO (None: all of it does)."""
    b, label = cfg.budget, LABELS[placement]
    if b.every_steps or b.kl_max is not None or any(s.max_drop is not None for s in cfg.data.keep.values()):
        return f"the forgetting budget (budget.*, data.keep.*.max_drop) does not run under {label} yet"
    if cfg.eval.harness.tasks:
        return f"eval.harness (lm-eval) does not run under {label}: it scores on the main process alone"
    if cfg.model.load_in_4bit:
        return f"model.load_in_4bit (QLoRA) is not tested under {label}"
    return None


def check_backend(cfg, env: Optional[Mapping[str, str]] = None) -> None:
    """Refuse, in one line, a run on a backend one of its parts is not known to be right on."""
    env = os.environ if env is None else env
    backends = requested_backends(env, cfg.model.load_in_4bit)
    why = unsupported(list(cfg.methods), backends)
    if why is None and backends[0] in ("fsdp2", "zero2", "zero3"):
        why = sharded_refusal(cfg, backends[0])
    if why is None and backends[0] in ("zero2", "zero3"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            why = "DeepSpeed is not installed here (pip install 'forgetless[deepspeed]')"
    if why is None and "qlora" in backends:
        import torch

        if not torch.cuda.is_available():
            why = "model.load_in_4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels)"
    if why is not None:
        placement = backends[0]
        hint = ("launch with --nproc N (DDP) or one process instead" if placement in ("fsdp2", "fsdp1", "zero2", "zero3")
                else "see the support table in the README")
        raise UserError(f"{why} ({'forgetless does not run under FSDP1 yet; ' if placement not in PLAIN else ''}{hint})")


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
