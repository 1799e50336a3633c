"""Checkpoints for exact resume: everything a run needs to continue bit for bit, written atomically.

A checkpoint is a folder ``DIR/checkpoints/step-000120/``:

    model.safetensors        trainable parameters, parameters added by methods (adapters, experts),
                             persistent buffers; frozen base weights are rebuilt from the config
    optimizer.safetensors    optimiser state tensors, flattened as ``state.<param index>.<key>``
    optimizer.json           param_groups, non-tensor state, and the parameter names in order
    methods.safetensors      every method's state_dict() tensors, as ``<method>/<key>``
    methods.json             the rest of every method's state
    rng-rank-<r>.safetensors RNG states of process r: torch CPU (and CUDA), numpy; python's
                             ``random`` in the file's metadata
    trainer.json             step, scheduler, counters (tokens, per-source draws, non-finite steps),
                             the before-training scores, metrics.jsonl's length, the data fingerprint

Tensors are in safetensors, everything else in JSON: nothing is pickled and nothing is read with
``torch.load``. The data position needs no file: ``MixedBatches`` is a pure function of
(seed, step), so the step is the position.

Atomicity: a checkpoint is written into ``checkpoints/.tmp-step-000120``, every file flushed and
fsynced, then renamed into place; ``checkpoints/latest`` (the name of the newest complete
checkpoint) is replaced atomically after that. A crash at any moment leaves ``latest`` naming a
complete checkpoint; leftovers of an interrupted write are removed by the next one. Old
checkpoints are renamed out of the way before they are deleted (``output.keep_last``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
from array import array
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from forgetless import zero
from forgetless.errors import ConfigError, UserError
from forgetless.sharding import gathered, is_sharded, reshard, shard_like
from forgetless.files import CHECKPOINTS_DIR, CONFIG_FILE, SUMMARY_FILE, TMP_PREFIX, flatten, fsync_path, write_text_atomic  # noqa: F401  (write_text_atomic: part of this module's API)

FORMAT = "forgetless.checkpoint/1"
FOLDER = CHECKPOINTS_DIR
LATEST = "latest"
STEP_DIR = re.compile(r"^step-(\d+)$")
# Config keys a resume may change: they do not change what is trained.
RESUME_MAY_CHANGE = (
    "output.dir", "output.resume", "output.overwrite", "output.progress", "output.log_every", "output.tensorboard",
    "output.wandb", "output.wandb_project", "output.report_to", "output.project", "output.push_to_hub", "output.hub_private", "output.checkpoint_every", "output.keep_last", "output.keep_checkpoints",
    "train.max_nonfinite_steps",
)


# ------------------------------------------------------------------------------------------------
# Fault injection (tests): end the process like SIGKILL at a named point
# ------------------------------------------------------------------------------------------------

_reached: dict[str, int] = {}


def fault(point: str) -> None:
    """With ``FORGETLESS_FAULT=POINT:N`` in the environment, end the process at once (exit code 137,
    no cleanup, like SIGKILL) the N-th time ``POINT`` is reached. Points: ``step`` (after an optimiser
    step and its record), ``eval`` (after an evaluation's record), ``checkpoint`` (half-way through
    writing a checkpoint), ``checkpoint-latest`` (a checkpoint renamed into place, ``latest`` not yet
    updated). Used by the resume tests; does nothing otherwise."""
    spec = os.environ.get("FORGETLESS_FAULT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(count or 1):
        os._exit(137)


# ------------------------------------------------------------------------------------------------
# Writing files durably
# ------------------------------------------------------------------------------------------------


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    fsync_path(path)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)  # e.g. a date in a replayed record's raw fields
        f.flush()
        os.fsync(f.fileno())


def _plain_float(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else x


# ------------------------------------------------------------------------------------------------
# What is saved
# ------------------------------------------------------------------------------------------------


def model_tensors(model, added: set[str]) -> dict[str, torch.Tensor]:
    """Trainable parameters, parameters that are not the base model's (``added``: the names of those
    methods added to the loaded model, e.g. frozen earlier adapters), and persistent buffers."""
    out = {n: p for n, p in model.named_parameters() if p.requires_grad or n in added}
    persistent = set(model.state_dict(keep_vars=True))
    out.update({n: b for n, b in model.named_buffers() if n in persistent})
    return out


def restore_model(model, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy the saved tensors into the model in place (methods and the optimiser keep their references)."""
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in targets]
    if missing or unknown:
        what = f"no saved value for {missing[0]}" if missing else f"it has {unknown[0]}, which the model lacks"
        raise UserError(f"{where}: the checkpoint does not match the model ({what}); resume with the run's own config, or start a new run")
    with torch.no_grad():
        for n, t in tensors.items():
            if targets[n].shape != t.shape:
                raise UserError(f"{where}: the checkpoint does not match the model ({n} has shape {tuple(t.shape)} there, {tuple(targets[n].shape)} here)")
            targets[n].copy_(t)


def optimizer_files(optimizer, model, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimiser's state flattened: tensors ``state.<index>.<key>``, and JSON (groups, names).
    Sharded (FSDP2) states are gathered whole, one at a time, to the CPU of the processes that
    ``keep`` them (every process must call it; the others get no tensors)."""
    names = {id(p): n for n, p in model.named_parameters()}
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    sd = opt.state_dict()
    tensors, plain_state = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                whole = gathered(value, keep)
                if keep:
                    tensors[f"state.{index}.{key}"] = whole
            else:
                plain_state.setdefault(str(index), {})[key] = value
    params = [p for g in opt.param_groups for p in g["params"]]
    return tensors, {"param_groups": sd["param_groups"], "state": plain_state, "param_names": [names.get(id(p), "?") for p in params]}


def restore_optimizer(optimizer, model, tensors: dict[str, torch.Tensor], info: dict, where: Path) -> None:
    """Load the saved state (whole tensors); a sharded (FSDP2) parameter's states are sharded like it."""
    opt = getattr(optimizer, "optimizer", optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    current = [names.get(id(p), "?") for p in params]
    if current != info["param_names"]:
        raise UserError(f"{where}: the checkpoint's optimiser covers other parameters than this run trains; resume with the run's own config")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        param = params[int(index)]
        state.setdefault(int(index), {})[name] = shard_like(value, param) if value.shape == param.shape else value
    for index, values in info["state"].items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for saved, live in zip(info["param_groups"], opt.param_groups):
        # JSON turned tuples (betas) into lists; give every option back the type the optimiser uses
        groups.append({k: (tuple(v) if isinstance(live.get(k), tuple) else v) for k, v in saved.items()})
    opt.load_state_dict({"state": state, "param_groups": groups})


def scheduler_state(scheduler) -> dict:
    """The schedule's counters; its lambdas are rebuilt from the config."""
    sd = dict(scheduler.state_dict())
    sd.pop("lr_lambdas", None)
    return sd


def restore_scheduler(scheduler, state: dict) -> None:
    current = scheduler.state_dict()
    scheduler.load_state_dict({**state, "lr_lambdas": current.get("lr_lambdas", [None] * len(state.get("base_lrs", [])))})


def rng_files() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states: tensors (torch CPU / CUDA, numpy's key) and metadata (the rest)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    meta = {
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps({"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}),
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    import numpy as np

    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = json.loads(meta["numpy"])
    np.random.set_state((n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))


def method_files(methods: list, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Every method's state_dict(): tensors as ``<method>/<key>`` (sharded ones gathered whole to
    the CPU of the processes that ``keep`` them: every process must call it), the rest as JSON by method."""
    tensors, plain = {}, {}
    for m in methods:
        plain[m.name] = {}
        for key, value in m.state_dict().items():
            if torch.is_tensor(value) or isinstance(value, zero.Partition):
                whole = gathered(value, keep)
                if keep:
                    tensors[f"{m.name}/{key}"] = whole
            else:
                plain[m.name][key] = value
    return tensors, plain


def data_fingerprint(sources: list) -> str:
    """A hash of every training stream (names, shares, token ids and labels): resuming on other data
    would not be exact, so it is refused."""
    h = hashlib.sha256()
    for s in sources:
        if hasattr(s.examples, "fingerprint"):  # an Arrow table (its content hash) or a stream (what it reads)
            h.update(f"{s.name}\0{s.weight!r}\0{s.examples.fingerprint}\0".encode())
            continue
        h.update(f"{s.name}\0{s.weight!r}\0{len(s.examples)}\0".encode())
        for e in s.examples:
            h.update(array("q", e.input_ids).tobytes())
            h.update(array("q", e.labels).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Writing a checkpoint
# ------------------------------------------------------------------------------------------------


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names (None when there is none yet)."""
    pointer = Path(run_dir) / FOLDER / LATEST
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    path = pointer.parent / name
    if not STEP_DIR.match(name) or not (path / "trainer.json").is_file():
        raise UserError(f"{pointer}: names {name!r}, which is not a complete checkpoint; delete the pointer to start over, or point it at a step-* folder")
    return path


def _remove(path: Path) -> None:
    """Delete a folder so that it is never seen half-deleted under its own name."""
    if not path.exists():
        return
    doomed = path.with_name(f"{TMP_PREFIX}delete-{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(run_dir: Path, newer_than: Optional[int] = None) -> None:
    """Remove half-written folders of interrupted writes and (on resume) checkpoints after the one
    resumed from, which the resumed run writes again."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(TMP_PREFIX):
            p.unlink(missing_ok=True)
    if newer_than is not None:
        for p in checkpoint_dirs(run_dir):
            if int(STEP_DIR.match(p.name).group(1)) > newer_than:
                _remove(p)


def remove_checkpoints(run_dir: Path) -> None:
    """Delete every checkpoint of a finished run (``latest`` first, so none is ever named half-deleted)."""
    folder = Path(run_dir) / FOLDER
    if folder.is_dir():
        (folder / LATEST).unlink(missing_ok=True)
        _remove(folder)


@dataclass
class CheckpointWriter:
    """Writes the checkpoints of one run (every process calls ``save``; each writes its RNG file)."""

    run_dir: Path
    accelerator: Any
    keep_last: int
    added: set[str] = field(default_factory=set)  # names of parameters methods added to the base (saved though frozen)
    zero_layout: Optional[tuple] = None  # DeepSpeed: the optimiser's parameter names and groups before prepare (forgetless/zero.py)

    def save(self, model, optimizer, scheduler, methods: list, state: "TrainerState") -> Path:
        """Write the checkpoint of ``state.step``; a failed write raises a UserError and leaves ``latest`` as it was."""
        acc = self.accelerator
        step, trainer = state.step, state.to_json()
        main, rank = acc.is_main_process, acc.process_index
        folder = Path(self.run_dir) / FOLDER
        name = step_name(step)
        tmp, final = folder / f"{TMP_PREFIX}{name}", folder / name
        error: Optional[OSError] = None
        if main:
            error = _attempt(lambda: (remove_leftovers(self.run_dir), tmp.mkdir(parents=True)))
        acc.wait_for_everyone()
        if error is None and tmp.is_dir():  # every process writes its own RNG states
            error = _attempt(lambda: _write_tensors(tmp / f"rng-rank-{rank}.safetensors", *rng_files()))
        failed = self._agree(error)
        unwrapped = acc.unwrap_model(model)
        contents = None
        if not failed and (main or is_sharded(unwrapped) or self.zero_layout is not None):  # sharded: every process takes part in gathering
            contents = self._contents(unwrapped, optimizer, methods, keep=main)
        if main and not failed:
            error = _attempt(lambda: self._write_main(tmp, final, step, contents, scheduler, trainer))
        if self._agree(error) or failed:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._failure(name, error)
        return final

    def _contents(self, model, optimizer, methods: list, keep: bool) -> Optional[tuple]:
        """The model's, optimiser's and methods' tensors and JSON; a sharded model's gathered whole
        (to the CPU, kept on the main process only)."""
        if self.zero_layout is not None:  # DeepSpeed: every state assembled over the processes, parameters gathered under ZeRO-3
            order, groups = self.zero_layout
            opt_tensors, opt_info = zero.optimizer_files(optimizer, model, order, groups, keep)
            m_tensors, m_plain = method_files(methods, keep)
            tensors = zero.model_tensors(model, list(model_tensors(model, self.added)), keep)
            return (tensors, opt_tensors, opt_info, m_tensors, m_plain) if keep else None
        sharded = is_sharded(model)
        if sharded:
            reshard(model)  # the parameters as the optimiser holds them (an evaluation leaves the root gathered)
        opt_tensors, opt_info = optimizer_files(optimizer, model, keep)
        m_tensors, m_plain = method_files(methods, keep)
        if not sharded:
            return model_tensors(model, self.added), opt_tensors, opt_info, m_tensors, m_plain
        # one tensor at a time, gathered to the main process's CPU (parameters are shards after reshard())
        tensors = {n: whole for n, t in model_tensors(model, self.added).items() if (whole := gathered(t, keep)) is not None}
        return (tensors, opt_tensors, opt_info, m_tensors, m_plain) if keep else None

    def _write_main(self, tmp: Path, final: Path, step: int, contents: tuple, scheduler, trainer: dict) -> None:
        model_t, opt_tensors, opt_info, m_tensors, m_plain = contents
        _write_tensors(tmp / "model.safetensors", model_t)
        fault("checkpoint")
        _write_tensors(tmp / "optimizer.safetensors", opt_tensors)
        _write_json(tmp / "optimizer.json", opt_info)
        _write_tensors(tmp / "methods.safetensors", m_tensors)
        _write_json(tmp / "methods.json", m_plain)
        scaler = self.accelerator.scaler
        _write_json(tmp / "trainer.json", {
            **trainer, "format": FORMAT, "step": step, "processes": self.accelerator.num_processes,
            "scheduler": scheduler_state(scheduler), "scaler": scaler.state_dict() if scaler is not None else None,
        })
        if os.name == "posix":
            fsync_path(tmp)
        if final.exists():  # written by an attempt that crashed before updating ``latest``
            _remove(final)
        os.replace(tmp, final)
        fault("checkpoint-latest")
        write_text_atomic(final.parent / LATEST, final.name + "\n")
        for old in checkpoint_dirs(self.run_dir)[: -self.keep_last]:
            if old != final:
                _remove(old)

    def _agree(self, error: Optional[OSError]) -> bool:
        """Whether any process failed (every process gets the same answer)."""
        acc = self.accelerator
        flag = torch.tensor([0.0 if error is None else 1.0])
        if acc.num_processes > 1:
            flag = acc.reduce(flag.to(acc.device), "sum").cpu()
        return bool(flag.item())

    def _failure(self, name: str, error: Optional[OSError]) -> UserError:
        good = latest_checkpoint(self.run_dir) if self.accelerator.is_main_process else None
        kept = f"the last good checkpoint is {good.relative_to(self.run_dir)}" if good else "no earlier checkpoint exists"
        if error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return UserError(f"output.dir {self.run_dir}: the disk is full; checkpoint {name} was not written and {kept}; free space, then run again with --resume")
        why = error.strerror or str(error) if error is not None else "another process failed to write its part"
        return UserError(f"output.dir {self.run_dir}: could not write checkpoint {name} ({why}); {kept}; fix that, then run again with --resume")


def _attempt(fn) -> Optional[OSError]:
    try:
        fn()
    except OSError as e:
        return e
    return None


# ------------------------------------------------------------------------------------------------
# Reading a checkpoint, and deciding where a resumed run starts
# ------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A loaded checkpoint: its trainer state and method states (model and optimiser tensors are
    read when they are restored)."""

    path: Path
    trainer: dict
    methods: dict[str, dict]

    @property
    def step(self) -> int:
        return int(self.trainer["step"])

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / name))

    def json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def rng(self, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from safetensors import safe_open

        path = self.path / f"rng-rank-{rank}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_checkpoint(path: Path) -> Checkpoint:
    try:
        trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
        plain = json.loads((path / "methods.json").read_text(encoding="utf-8"))
        from safetensors.torch import load_file

        tensors = load_file(str(path / "methods.safetensors"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:160]}); delete it (and fix checkpoints/latest) to resume from an earlier one") from None
    if trainer.get("format") != FORMAT:
        raise UserError(f"{path}: written by another version of forgetless ({trainer.get('format')!r}, expected {FORMAT!r}); start a new run")
    methods = {name: dict(values) for name, values in plain.items()}
    for key, t in tensors.items():
        name, _, k = key.partition("/")
        methods.setdefault(name, {})[k] = t
    return Checkpoint(path, trainer, methods)


@dataclass
class ResumePoint:
    """Where a run with ``output.resume`` starts: from a checkpoint, from scratch, or nowhere (finished)."""

    checkpoint: Optional[Checkpoint] = None
    finished: Optional[dict] = None  # the finished run's summary.json
    message: str = ""


def find_resume_point(run_dir: Path, cfg, processes: int) -> ResumePoint:
    """Check that ``cfg`` continues the run in ``run_dir`` and find its latest checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        return ResumePoint(message=f"resume: no run in {run_dir} yet; starting from the beginning")
    check_same_config(run_dir / CONFIG_FILE, cfg)
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        return ResumePoint(finished=json.loads(summary.read_text(encoding="utf-8")), message=f"resume: the run in {run_dir} is finished (summary.json); nothing to do")
    path = latest_checkpoint(run_dir)
    if path is None:
        return ResumePoint(message=f"resume: {run_dir} has no checkpoint yet; starting from the beginning")
    ckpt = load_checkpoint(path)
    if ckpt.trainer.get("processes") != processes:
        raise UserError(f"{path}: written by {ckpt.trainer.get('processes')} processes, this run has {processes}; resume with --nproc {ckpt.trainer.get('processes')}")
    return ResumePoint(checkpoint=ckpt, message=f"resume: continuing {run_dir} from checkpoint {path.name}")


def check_same_config(saved_path: Path, cfg) -> None:
    """ConfigError naming the first field (other than RESUME_MAY_CHANGE) that differs from the run's config.yaml."""
    import yaml

    from forgetless.config import to_dict

    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{saved_path}: cannot read the run's config ({str(e).splitlines()[0]}); resume is not possible, start a new run") from None
    from forgetless.config import redact_secrets

    here = yaml.safe_load(yaml.safe_dump(redact_secrets(to_dict(cfg))))  # config.yaml holds secrets redacted
    a = flatten(redact_secrets(saved)) if isinstance(saved, dict) else {}
    b = flatten(here)
    for key in [*b, *(k for k in a if k not in b)]:
        if key in RESUME_MAY_CHANGE or a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        if key not in a and b[key] in (None, [], {}):  # an option added since the run started, left at its default
            continue
        raise ConfigError(
            f"output.resume: {key} is {a.get(key, '<unset>')!r} in the run's config.yaml but {b.get(key, '<unset>')!r} now; "
            f"resume with the run's config ({saved_path}), or start a new run (another output.dir, or --overwrite)"
        )


@dataclass
class TrainerState:
    """The step loop's counters: what a checkpoint's ``trainer.json`` holds, saved and loaded whole.

    Everything else a resumed run needs is rebuilt from the config and seed (the data position is
    the step number) or lives in the checkpoint's other files (weights, optimiser, methods, RNG).
    """

    total_steps: int
    global_batch: int
    data: str  # the training data's fingerprint (data_fingerprint): a resume on other data is refused
    source_counts: list[int]  # examples drawn from each stream of the batch, for the observed mix
    step: int = 0  # optimiser steps done
    tokens_seen: int = 0
    last_loss: float = float("nan")
    train_time_s: float = 0.0  # training time of the steps done, over every resume
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    before: dict = field(default_factory=dict)  # the scores before training
    before_verdicts: dict = field(default_factory=dict)  # per set, [index, right, answer] before training (the flips)
    metrics_bytes: Optional[int] = None  # the length of metrics.jsonl when the checkpoint was written

    def to_json(self) -> dict:
        """JSON values, non-finite floats as null."""
        return {k: (_plain_float(v) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "TrainerState":
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        if values.get("last_loss") is None:
            values["last_loss"] = float("nan")
        return cls(**values)
