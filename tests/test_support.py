"""The support table and the refusals made from the same declarations (forgetless/support.py)."""

import re
from pathlib import Path

import pytest

import forgetless
from forgetless.cli import main
from forgetless.errors import UserError
from forgetless.registry import register
from forgetless.support import check_backend, requested_backends, support_table, unsupported

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = ["model.name_or_path=tiny", "data.train=demo:elements"]


def test_the_readme_table_is_the_declarations():
    text = README.read_text(encoding="utf-8")
    assert support_table() in text, "README.md's support table differs from forgetless.support.support_table(); paste its output"


def test_backends_from_the_launchers_environment():
    assert requested_backends({}) == ["single"]
    assert requested_backends({"WORLD_SIZE": "4"}) == ["ddp"]
    assert requested_backends({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}) == ["fsdp2"]
    assert requested_backends({"ACCELERATE_USE_FSDP": "true"}) == ["fsdp1"]
    assert requested_backends({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == ["zero3"]
    assert requested_backends({"ACCELERATE_USE_DEEPSPEED": "1"}) == ["zero2"]
    assert requested_backends({}, load_in_4bit=True) == ["single", "qlora"]
    with pytest.raises(UserError, match="ZeRO stage 1: forgetless runs stages 2 and 3"):
        requested_backends({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})


def test_a_deepspeed_config_files_stage_is_the_one_checked(tmp_path):
    """accelerate launch --deepspeed_config_file: DeepSpeed runs the file's stage, whatever the variable says."""
    f = tmp_path / "ds.json"
    f.write_text('{"zero_optimization": {"stage": 3}}')
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(f)}
    assert requested_backends(env) == ["zero3"]
    f.write_text('{"zero_optimization": {"stage": "auto"}}')
    assert requested_backends({**env, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == ["zero3"]
    assert requested_backends(env) == ["zero2"]


def test_what_is_refused_and_why():
    assert unsupported([], ["single"]) is None and unsupported(["ewc", "lora"], ["ddp"]) is None
    assert unsupported([], ["fsdp2"]) is None and unsupported(["lora", "kl", "ewc"], ["fsdp2"]) is None
    assert unsupported([], ["fsdp1"]) == "plain full fine-tuning does not run on FSDP1"
    assert unsupported(["lora", "moe_lora"], ["fsdp2"]) == "methods.moe_lora does not run on FSDP2"
    assert unsupported(["lora", "moe_lora"], ["zero3"]) == "methods.moe_lora does not run on ZeRO-3"
    assert unsupported(["lora", "kl", "replay", "mix", "freeze"], ["zero3"]) is None and unsupported([], ["zero2"]) is None
    assert unsupported(["ewc", "l2sp"], ["zero3"]) is None  # their penalties run on the partitions
    assert unsupported(["agem"], ["zero3"]) == "methods.agem does not run on ZeRO-3"
    assert unsupported(["agem"], ["zero2"]) == "methods.agem does not run on ZeRO-2"
    assert unsupported(["lora", "kl", "replay"], ["single", "qlora"]) is None
    assert unsupported(["kl"], ["single", "qlora"]) == "a 4-bit base trains only adapters: add methods.lora"
    assert unsupported(["lora", "bottleneck"], ["single", "qlora"]) == "methods.bottleneck does not run on QLoRA"


@pytest.mark.parametrize("env, overrides, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, ["methods.dft={}"], "methods.dft does not run on ZeRO-3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["methods.l2sp.weight=1", "budget.kl_max=0.1"], "does not run under ZeRO-2 yet"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["methods.mofo={}"], "methods.mofo does not run on FSDP2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["methods.l2sp.weight=1", "budget.kl_max=0.1"], "the forgetting budget"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["eval.harness.tasks=[arc_easy]"], "eval.harness (lm-eval) does not run under FSDP2"),
    ({"ACCELERATE_USE_FSDP": "true"}, [], "forgetless does not run under FSDP1 yet"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["model.load_in_4bit=true", "methods.lora.r=8"], "not tested under FSDP2"),
    ({}, ["model.load_in_4bit=true", "methods.lora.r=8"], "needs a CUDA GPU"),
])
def test_check_backend_refuses_in_one_line(env, overrides, message):
    cfg = forgetless.load_config(None, [*TINY, *overrides])
    with pytest.raises(UserError) as e:
        check_backend(cfg, env)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_refused_deepspeed_launch_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    out = tmp_path / "run"
    assert main(["train", *TINY, "methods.dft={}", f"output.dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "methods.dft does not run on ZeRO-3" in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("config, message", [
    ({"optimizer": {"type": "AdamW"}}, "remove its 'optimizer' section; forgetless builds its own"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove its 'scheduler' section"),
    ({"gradient_accumulation_steps": 4}, "set train.grad_accum_steps=4"),
    ({"gradient_clipping": 0.5}, "differs from train.max_grad_norm=1.0"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer to cpu is not tested"),
    ({"fp16": {"enabled": True}}, "use train.mixed_precision=bf16"),
    ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage=1; forgetless runs stages 2 and 3"),
])
def test_a_deepspeed_config_that_would_break_the_loop_is_refused(config, message):
    from forgetless.zero import config_problem

    cfg = forgetless.load_config(None, TINY)
    why = config_problem(config, cfg, "ds.json")
    assert why is not None and why.startswith("ds.json: ") and message in why
    assert config_problem({"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": True},
                           "zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}}, cfg) is None


@pytest.mark.parametrize("flags, text, message", [
    (["--nproc", "2", "--deepspeed-config", "DS"], '{"optimizer": {}}', "DS: remove its 'optimizer' section"),
    (["--nproc", "2", "--deepspeed-config", "DS"], '{"zero_optimization": {"stage": 2', "DS: line 1: not valid JSON"),
    (["--nproc", "2", "--zero", "3", "--deepspeed-config", "DS"], '{"zero_optimization": {"stage": 2}}', "stage is 2, --zero 3"),
    (["--nproc", "2", "--zero", "2", "--fsdp2"], "", "--fsdp2 and --zero exclude each other"),
    (["--zero", "2"], "", "DeepSpeed on the CPU runs over several processes: add --nproc 2"),
])
def test_deepspeed_launch_options_are_checked_before_any_process_starts(tmp_path, monkeypatch, capsys, flags, text, message):
    import forgetless.cli as cli

    monkeypatch.setattr(cli.subprocess, "call", lambda *a, **k: pytest.fail("a process was started"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    ds = tmp_path / "ds.json"
    ds.write_text(text)
    flags = [str(ds) if f == "DS" else f for f in flags]
    assert main(["train", *TINY, f"output.dir={tmp_path / 'run'}", *flags]) == 2
    err = capsys.readouterr().err
    assert message.replace("DS", str(ds)) in err and err.count("\n") == 1


def test_zero_launches_torchrun_with_deepspeeds_variables(tmp_path, monkeypatch):
    import forgetless.cli as cli

    seen = {}
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: seen.update(cmd=cmd, env=env) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}')
    assert main(["train", *TINY, "--nproc", "2", "--deepspeed-config", str(ds)]) == 0
    assert seen["env"]["ACCELERATE_USE_DEEPSPEED"] == "true" and seen["env"]["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert seen["env"]["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(ds.resolve())
    assert "--deepspeed-config" not in seen["cmd"] and str(ds) not in seen["cmd"]


def test_a_method_declares_only_known_backends():
    from forgetless.methods.base import Method

    class Odd(Method):
        name = "odd_backend_method"

    with pytest.raises(ValueError, match="unknown backends tpu"):
        register("odd_backend_method", object, Odd, "x", backends=("single", "tpu"))


@pytest.mark.parametrize("flags, message", [
    (["--nproc", "0"], "--nproc 0: give the number of processes"),
    (["--nnodes", "2"], "give --master-addr"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1"], "--node-rank 2: give this node's index, 0 to 1"),
    (["--master-addr", "10.0.0.1"], "go with --nnodes above 1"),
    (["--nnodes", "2", "--master-addr", "h", "--master-port", "0"], "--master-port 0"),
])
def test_launch_options_are_checked(flags, message, capsys):
    assert main(["train", *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_multi_node_launch_builds_the_torchrun_command(monkeypatch):
    import forgetless.cli as cli

    seen = {}
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: seen.update(cmd=cmd, env=env) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main(["train", *TINY, "--nproc", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                 "--master-port", "29600"]) == 0
    cmd = " ".join(seen["cmd"])
    assert re.search(r"--nproc_per_node=2 --nnodes=2 --node_rank=1 --master_addr=10.0.0.1 --master_port=29600 -m forgetless.cli train", cmd)
    assert "--standalone" not in cmd and "--nnodes 2" not in cmd.split("forgetless.cli")[1]
