"""FSDP2 and DeepSpeed ZeRO-2/3 on CPU (gloo): two sharded processes train like one process with the same global batch.

Every method the support table marks for a backend runs, on that backend, in one of the cases
below (example configs of configs/examples/ with more methods added, so that one run checks
several methods' terms at once; a test checks that the cases cover the declarations). Each case
runs with ``--nproc 2`` and alone; the losses, every logged term (penalties non-zero and equal),
the final scores and the saved weights must agree. A killed and resumed run is bit-identical to an
uninterrupted one on each backend. A few methods whose multi-process paths differ most are checked
the same way under DDP. Each test starts its processes in a new process group and kills the group
when it ends, so no worker outlives a test.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgetless.registry import REGISTRY
from tests.conftest import FAST_MODEL
from tests.integration.test_distributed import _run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "examples"
SYNTHETIC = ("methods.synthetic_replay.prompts=demo:capitals", "methods.synthetic_replay.num_samples=16",
             "methods.synthetic_replay.max_new_tokens=4", "methods.synthetic_replay.ratio=0.2",
             "methods.synthetic_replay.drop_unfinished=false")
REPLAY = ("methods.replay.memory=[demo:capitals]", "methods.replay.size_examples=40", "methods.replay.ratio=0.2")
MIX = ("methods.mix.sources.general=demo:general", "methods.mix.ratio=0.2")
# (example config, overrides adding methods): the methods a case runs are its config's and those it adds
EWC = ("methods.ewc.weight=10000", "methods.ewc.fisher=sampled", "methods.ewc.data=demo:capitals", "methods.ewc.samples=32")
CASES = {
    "full_finetune": ("full_finetune", ()),
    # LoRA with replay and KL with the adapters switched off (the example), and L2-SP on the adapters
    "lora_replay_kl+l2sp": ("lora_replay_kl", ("methods.l2sp.weight=1.0",)),
    # every other method at once, on the frozen-block model: KL's teacher is a frozen copy there
    "freeze+ewc+kl+mix+replay+synthetic": ("freeze", (*EWC, "methods.kl.weight=1.0", *MIX, *REPLAY, *SYNTHETIC)),
    # the same with EWC's anchors kept in bfloat16 (and sharded) and activation checkpointing
    "freeze+ewc-bf16-checkpointing+kl+mix+replay+synthetic": ("freeze", (*EWC, "methods.ewc.anchor_dtype=bfloat16",
                                                                        "train.gradient_checkpointing=true", "methods.kl.weight=1.0",
                                                                        *MIX, *REPLAY, *SYNTHETIC)),
}
# Per backend: the cases compared with one process, and (last) the one also killed and resumed.
# Plain full fine-tuning is the path every case takes with its methods' terms added.
ON = {
    "fsdp2": ["full_finetune", "lora_replay_kl+l2sp", "freeze+ewc-bf16-checkpointing+kl+mix+replay+synthetic"],
    "zero2": ["lora_replay_kl+l2sp", "freeze+ewc+kl+mix+replay+synthetic"],
    "zero3": ["lora_replay_kl+l2sp", "freeze+ewc+kl+mix+replay+synthetic"],
}
FLAGS = {"fsdp2": ["--fsdp2"], "zero2": ["--zero", "2"], "zero3": ["--zero", "3"], "ddp": []}
needs_deepspeed = pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def _methods(case: str) -> set[str]:
    import yaml

    config, extra = CASES[case]
    names = set((yaml.safe_load((EXAMPLES / f"{config}.yaml").read_text()).get("methods") or {}))
    return names | {e.split(".")[1] for e in extra if e.startswith("methods.")}


def test_the_cases_cover_every_declared_method():
    """A method declared for a backend is run on it by a case, and no case runs a method on a backend it does not declare."""
    for backend, cases in ON.items():
        run = set().union(*(_methods(c) for c in cases))
        declared = {n for n, spec in REGISTRY.items() if backend in spec.backends}
        assert declared <= run, (backend, declared - run)
        assert run <= declared, (backend, run - declared)


def _overrides(out: Path, name: str, accum: int, *extra: str) -> list[str]:
    return [
        str(EXAMPLES / f"{name}.yaml"), *FAST_MODEL, f"output.dir={out}", "output.progress=false", "output.log_every=1",
        "train.max_steps=3", "train.micro_batch_size=2", f"train.grad_accum_steps={accum}", "eval.max_examples=6",
        "eval.max_new_tokens=4", *extra,
    ]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps(run_dir: Path) -> list[dict]:
    return [r for r in _records(run_dir) if "loss" in r]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run_dir / "model").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _train(out: Path, name: str, processes: int, *extra: str, env=None, backend: str = "fsdp2"):
    """The example config of ``name``, with 1 process, or with ``processes`` on ``backend`` (fsdp2, zero2, zero3, ddp)."""
    accum = 4 // processes  # the same global batch of 4 x 2 examples
    args = [sys.executable, "-m", "forgetless", "train", *_overrides(out, name, accum, *extra)]
    if processes > 1:
        args += ["--nproc", str(processes), *FLAGS[backend]]
    return _run(args, env=env)


def _params(backend: str, cases: list[str]) -> list:
    marks = [needs_deepspeed] if backend.startswith("zero") else []
    return [pytest.param(backend, case, id=f"{backend}-{case}", marks=marks) for case in cases]


@pytest.mark.parametrize("backend, case", [p for b in ON for p in _params(b, ON[b][:-1])])
def test_two_sharded_processes_match_one(tmp_path, backend, case):
    config, extra = CASES[case]
    _two_match_one(tmp_path, config, extra, backend)


# DDP (each process a full copy) on the same check, for the method whose multi-process path differs
# most: A-GEM's reference gradients (EWC's Fisher before training is checked on FSDP2 and ZeRO-2)
def test_two_ddp_processes_match_one(tmp_path):
    _two_match_one(tmp_path, "agem", (), "ddp")


def _two_match_one(tmp_path, name: str, extra, backend: str, two: str = "two", steps: int = 3) -> None:
    """One process (in this one: no second start-up) against two on ``backend``; ``two``: the
    two-process run's directory under tmp_path, already run when it has a summary."""
    import forgetless

    config, *overrides = _overrides(tmp_path / "one", name, 4, *extra)
    forgetless.train(forgetless.load_config(config, overrides))
    if not (tmp_path / two / "summary.json").exists():
        run = _train(tmp_path / two, name, 2, *extra, backend=backend)
        assert run.returncode == 0, run.stderr[-3000:]
    s1, s2 = _steps(tmp_path / "one"), _steps(tmp_path / two)
    assert len(s1) == len(s2) == steps
    assert [r["loss"] for r in s2] == pytest.approx([r["loss"] for r in s1], rel=1e-4)
    assert [r["grad_norm"] for r in s2] == pytest.approx([r["grad_norm"] for r in s1], rel=1e-3)
    for r1, r2 in zip(s1, s2):  # every method's logged term, summed over the shards where it is a penalty
        assert set(r1.get("terms", {})) == set(r2.get("terms", {}))
        for term, v in r1.get("terms", {}).items():
            assert r2["terms"][term] == pytest.approx(v, rel=2e-3, abs=1e-6), term
    for term in ("l2sp", "ewc", "kl"):
        if term in s1[-1].get("terms", {}):
            assert s2[-1]["terms"][term] > 0  # a penalty that does something, equal on both
    summary = json.loads((tmp_path / two / "summary.json").read_text())
    assert summary["train"]["processes"] == 2
    assert summary["train"]["placement"] == backend  # the run really was sharded so
    alone = json.loads((tmp_path / "one" / "summary.json").read_text())
    for name_, scores in alone["after"].items():  # scored whole on every process, the same as alone
        for metric, v in scores.items():
            assert summary["after"][name_][metric] == pytest.approx(v, rel=1e-3, abs=1e-4), (name_, metric)
    held_state = [m for m, info in alone["train"]["methods"].items() if "held_bytes" in info]
    assert held_state or not {"l2sp", "ewc"} & set(alone["train"]["methods"])
    for method in held_state:  # per-parameter state (anchors, Fisher): sharded like the parameters
        info = alone["train"]["methods"][method]
        held = summary["train"]["methods"][method]["held_bytes"]
        if backend in ("fsdp2", "zero3"):
            assert 0 < held <= 0.6 * info["held_bytes"], (method, held, info["held_bytes"])  # about half on each of two
        else:
            assert held == info["held_bytes"], method  # replicated
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / two)
    assert w1.keys() == w2.keys() and w1
    for k in w1:
        assert torch.allclose(w1[k].float(), w2[k].float(), atol=1e-5), k


@pytest.mark.parametrize("backend", ["fsdp2", pytest.param("zero3", marks=needs_deepspeed)])
def test_processes_with_different_micro_batch_counts_stay_in_step(tmp_path, backend):
    """Examples of very different lengths group into different numbers of micro-batches on the two
    processes (a pass per micro-batch, each gathering parameters): the shorter process runs padding
    passes weighted 0, so neither waits on the other, and the run still equals one process.
    With KL on its own data, whose micro-batches are padded too."""
    import random

    from tests.conftest import write_jsonl

    rng = random.Random(0)
    words = "one two three four five six seven eight nine ten".split()
    records = [{"prompt": f"Say {w}:", "completion": " " + " ".join(rng.choice(words) for _ in range(rng.choice([1, 30])))}
               for w in words * 3]
    data = write_jsonl(tmp_path / "uneven.jsonl", records)
    extra = (f"data.train={data}", f"methods.kl.data={data}", "data.eval={}", "data.keep={}", "eval.before=false")
    _two_match_one(tmp_path, "kl", extra, backend)
    assert sum(r.get("padded_passes", 0) for r in _steps(tmp_path / "two")) > 0  # the padding ran


@pytest.mark.parametrize("backend, case", [p for b in ON for p in _params(b, ON[b][-1:])])
def test_killed_and_resumed_sharded_run_is_bit_identical(tmp_path, backend, case):
    """Killed after step 3's record (before its checkpoint), resumed from step 2's checkpoint (gathered
    whole, sharded again at the resume): the same losses, terms and weights as an uninterrupted
    run, which itself matches one process. Under ZeRO the optimiser's states go through
    DeepSpeed's fragments, and under ZeRO-3 the parameters are gathered from partitions."""
    name, extra = CASES[case]
    extra = ("train.max_steps=4", "output.checkpoint_every=1", "output.keep_checkpoints=true", *extra)
    whole = _train(tmp_path / "whole", name, 2, *extra, backend=backend)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _train(tmp_path / "cut", name, 2, *extra, env={"FORGETLESS_FAULT": "step:3"}, backend=backend)
    assert killed.returncode != 0
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = _run([sys.executable, "-m", "forgetless", "train", *_overrides(tmp_path / "cut", name, 2, *extra), "--resume",
                    "--nproc", "2", *FLAGS[backend]])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _steps(tmp_path / "whole"), _steps(tmp_path / "cut")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("terms") for r in a] == [r.get("terms") for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    wa, wb = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ca = load_file(str(tmp_path / "whole" / "checkpoints" / "step-000004" / "optimizer.safetensors"))
    cb = load_file(str(tmp_path / "cut" / "checkpoints" / "step-000004" / "optimizer.safetensors"))
    assert ca.keys() == cb.keys() and ca and all(torch.equal(ca[k], cb[k]) for k in ca)
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "cut"))
    if backend in ("fsdp2", "zero3") and "ewc" in sa["train"]["methods"]:  # the resumed run holds shards too, not the whole state
        whole = 12 * sa["train"]["trainable_params"]  # float32 anchor, Fisher and weight per trainable parameter (bf16 ones: 8)
        assert 0 < sb["train"]["methods"]["ewc"]["held_bytes"] == sa["train"]["methods"]["ewc"]["held_bytes"] <= 0.6 * whole
    _two_match_one(tmp_path, name, extra, backend, two="whole", steps=4)  # and the uninterrupted run is one process's


POISON = '''"""Test only: chosen optimiser steps made non-finite, declared for the sharded backends."""
from dataclasses import dataclass

import torch

from forgetless.config import option
from forgetless.methods.base import Method
from forgetless.registry import register


@dataclass
class PoisonConfig:
    """Test only."""

    loss_at: list[int] = option(factory=list, help="Steps whose loss is NaN.")
    grad_at: list[int] = option(factory=list, help="Steps whose loss is finite but whose gradient is NaN.")


class Poison(Method):
    name = "poison"

    def __init__(self, cfg):
        self.cfg, self.step = cfg, 0

    def step_terms(self, model):
        self.step += 1
        p = next(q for q in model.parameters() if q.requires_grad)
        if self.step in self.cfg.loss_at:
            return {"poison": p.sum() * float("nan")}
        if self.step in self.cfg.grad_at:
            return {"poison": torch.sqrt(p.sum() * 0.0)}  # value 0, gradient 0 * inf = nan
        return {"poison": p.sum() * 0.0}


register("poison", PoisonConfig, Poison, "test only", backends=("single", "ddp", "zero2", "zero3"))
'''


@needs_deepspeed
def test_the_engine_skips_a_non_finite_step_and_it_is_logged(tmp_path):
    """Under ZeRO the engine makes the update: a NaN loss (step 2) and a NaN gradient with a finite
    loss (step 3) leave the weights and the optimiser's states as they were, and are logged as on
    every backend."""
    import sys as _sys

    from forgetless.registry import REGISTRY as registry, unregister

    plugin = tmp_path / "poison.py"
    plugin.write_text(POISON)
    extra = (f"plugins=[{plugin}]", "methods.poison.loss_at=[2]", "methods.poison.grad_at=[3]", "train.max_steps=4",
             "output.checkpoint_every=1", "output.keep_checkpoints=true", "output.keep_last=10", "eval.before=false")
    try:
        run = _train(tmp_path / "run", "full_finetune", 2, *extra, backend="zero2")
    finally:
        if "poison" in registry:
            unregister("poison")
        for name in [n for n in _sys.modules if n.startswith("forgetless_plugin_")]:
            del _sys.modules[name]
    assert run.returncode == 0, run.stderr[-3000:]
    records = _records(tmp_path / "run")
    assert {"step": 2, "skipped": "non-finite loss"} in records and {"step": 3, "skipped": "non-finite grad"} in records
    assert [r["step"] for r in records if "loss" in r] == [1, 4]
    ck = tmp_path / "run" / "checkpoints"
    for name in ("model.safetensors", "optimizer.safetensors"):  # steps 2 and 3 changed nothing
        a, b = load_file(str(ck / "step-000001" / name)), load_file(str(ck / "step-000003" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    before, after = load_file(str(ck / "step-000003" / "model.safetensors")), load_file(str(ck / "step-000004" / "model.safetensors"))
    assert not all(torch.equal(before[k], after[k]) for k in after)  # and step 4 trains again


@pytest.mark.parametrize("flags, extra, words", [
    (["--fsdp2"], ["methods.dft={}"], "methods.dft does not run on FSDP2"),
    (["--fsdp2"], ["methods.agem.memory=[{path: PC}]", "methods.agem.size_examples=8"], "methods.agem does not run on FSDP2"),
    (["--fsdp2"], ["budget.every_steps=2"], "the forgetting budget"),
    (["--zero", "3"], ["methods.agem.memory=[{path: PC}]", "methods.agem.size_examples=8"], "methods.agem does not run on ZeRO-3"),
])
def test_refusals_under_sharding(tmp_path, pc_file, capsys, monkeypatch, flags, extra, words):
    """What does not run sharded is refused in one line before any process starts."""
    import forgetless.cli as cli
    from tests.conftest import fast_overrides

    monkeypatch.setattr(cli.subprocess, "call", lambda *a, **k: pytest.fail("a process was started"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    extra = [e.replace("PC", str(pc_file)) for e in extra]
    assert cli.main(["train", *fast_overrides(tmp_path / "r", pc_file, *extra), "--nproc", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_fsdp2_needs_several_processes(tmp_path, pc_file, capsys):
    from forgetless.cli import main
    from tests.conftest import fast_overrides

    assert main(["train", *fast_overrides(tmp_path / "r", pc_file), "--fsdp2"]) == 2
    assert "--fsdp2 shards over several processes" in capsys.readouterr().err
