"""Task sequences: ``forgetless continual`` and ``forgetless compare``.

A strategy (a set of methods) is trained on the tasks of ``cfg.tasks`` one after the other; each
task is an ordinary fine-tuning run (:func:`forgetless.recipes.finetune.train`) in its own run
directory, started from the model the previous task ended with::

    OUT/config.yaml                         the sequence's resolved config
    OUT/<strategy>/task-1-<name>/           a run directory (config, metrics.jsonl, model/, summary)
    OUT/<strategy>/task-2-<name>/ ...
    OUT/<strategy>/strategy.json            its accuracy matrix, scores, time, memory
    OUT/results.json                        every strategy (the report is built from this file)
    OUT/report.html, results.csv, summary.md

After each task every task's evaluation data (seen or not yet seen) and every ``data.keep`` set
(general probes) are scored, so row ``t`` of the accuracy matrix ``R[t][k]`` is the headline score of
task ``k`` after task ``t``; row 0 is the model before any training.

Each task starts from the model the previous task ended with (methods that declare
``KEEPS_BASE``, e.g. expansion and olora, start every task from the base model and load their
earlier experts themselves). Method state is carried by the methods: each one's
``Method.next_task(options, link)`` says what the next task's run takes from the previous run
directory (replay grows its memory, online EWC adds the new Fisher to the decayed old one,
expansion / olora load the earlier experts / LoRAs; see each method's file). The recipe names no
method.

Baselines (``continual.baselines``): ``sequential`` is plain full fine-tuning on the same sequence;
``joint`` trains once on the union of all tasks' data with the summed step budget of the sequence.

A finished task (its run directory has ``summary.json``) is never trained again: ``--resume``
skips it and resumes the unfinished one from its checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from forgetless.config.loader import PLUGIN_MODULE_PREFIX, import_plugins
from forgetless.config import (
    ContinualConfig,
    DatasetSpec,
    RunConfig,
    default_strategy_name,
    config_from_dict,
    load_config,
    save_config,
    strategy_configs,
    to_dict,
)
from forgetless.checkpoint import check_same_config
from forgetless.errors import ConfigError, UserError
from forgetless.eval import metrics as M
from forgetless.files import CONFIG_FILE, RESULTS_FILE, STRATEGY_CONFIG, STRATEGY_FILE, SUMMARY_FILE, write_text_atomic
from forgetless.eval.headline import higher_is_better
from forgetless.methods import REGISTRY, Method, TaskLink
from forgetless.registry import KEEPS_BASE, ordered
from forgetless.report import write_report
from forgetless.report.tables import strategy_metrics
from forgetless.rundir import prepare_run_dir



# ------------------------------------------------------------------------------------------------
# Headline scores
# ------------------------------------------------------------------------------------------------

def headline(scores: Optional[dict]) -> Optional[float]:
    """The set's headline score (the value of its metric, see forgetless.eval.headline)."""
    if not scores or scores.get("score") is None:
        return None
    return float(scores["score"])


# ------------------------------------------------------------------------------------------------
# One task's run config
# ------------------------------------------------------------------------------------------------


def _eval_spec(task) -> DatasetSpec:
    spec = copy.deepcopy(task.eval or task.train[0])
    if task.metric:
        spec.metric = task.metric
    return spec


def task_run_config(scfg: RunConfig, t: int, out: Path, previous: Optional[Path]) -> tuple[RunConfig, list[str]]:
    """The RunConfig of task ``t`` (1-based) of strategy config ``scfg``, and notes on what was carried.

    ``previous`` is the run directory of task t-1 (None for the first task).
    """
    tasks = scfg.tasks
    task = tasks[t - 1]
    c = copy.deepcopy(scfg)
    c.tasks, c.continual = [], ContinualConfig()
    c.data.train = copy.deepcopy(task.train)
    c.data.eval = {task.name: _eval_spec(task)}
    c.data.keep = {**copy.deepcopy(scfg.data.keep), **{o.name: _eval_spec(o) for o in tasks if o.name != task.name}}
    c.data.eval_holdout = 0
    if task.epochs is not None:
        c.train.epochs, c.train.max_steps = task.epochs, None
    if task.max_steps is not None:
        c.train.max_steps = task.max_steps
    c.eval.before = t == 1  # later rows' "before" is the previous task's "after"
    c.output.dir = str(out / task_dir_name(t, task.name))
    c.output.save_model = True  # the next task starts from it
    # Each method says what the next task's run takes from the previous run (Method.next_task).
    # Absolute: the options it fills in are saved in the task's config.yaml, whose relative paths
    # are read relative to that file.
    link = TaskLink(t, previous.resolve() if previous is not None else None, copy.deepcopy(tasks[t - 2].train) if t >= 2 else [])
    if previous is not None and not any(REGISTRY[name].has(KEEPS_BASE) for name in c.methods):
        c.model.name_or_path = str(previous)
    for spec in ordered(list(c.methods)):
        next_task = getattr(spec.build, "next_task", Method.next_task)  # build may be a plain factory function
        options = next_task(c.methods[spec.name], dataclasses.replace(link, previous_train=copy.deepcopy(link.previous_train)))
        if options is None:
            del c.methods[spec.name]
        else:
            c.methods[spec.name] = options
    notes = link.notes
    return c, notes


def task_dir_name(t: int, name: str) -> str:
    return f"task-{t}-{name}"


def joint_run_config(cfg: RunConfig, out: Path) -> RunConfig:
    """One run on the union of every task's training data, with the sequence's total step budget."""
    from forgetless.data.loading import load_records

    c = copy.deepcopy(cfg)
    c.methods.clear()
    tasks = cfg.tasks
    c.tasks, c.continual = [], ContinualConfig()
    c.data.train = [copy.deepcopy(s) for task in tasks for s in task.train]
    c.data.eval = {task.name: _eval_spec(task) for task in tasks}
    c.data.eval_holdout = 0
    batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    steps = 0
    for task in tasks:
        max_steps = task.max_steps if task.max_steps is not None else (None if task.epochs is not None else cfg.train.max_steps)
        if max_steps is not None:
            steps += max_steps
        else:
            n = sum(len(load_records(s)) for s in task.train)
            steps += max(1, math.ceil((task.epochs or cfg.train.epochs) * n / batch))
    c.train.max_steps = steps
    c.eval.before = True
    c.output.dir = str(out / "joint")
    return c


# ------------------------------------------------------------------------------------------------
# Running a strategy
# ------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory while the block runs: GPU allocations on CUDA, else sampled resident memory."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


def _finished(run_dir: Path) -> Optional[dict]:
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _train_task(tcfg: RunConfig, resume: bool) -> dict:
    """Train one task (or read a finished one); returns its summary.json content."""
    from forgetless.recipes.finetune import train

    run_dir = Path(tcfg.output.dir)
    done = _finished(run_dir)
    if done is not None:
        return done
    if run_dir.exists() and any(run_dir.iterdir()):
        if not resume:
            raise UserError(f"{run_dir}: an unfinished task is in the way; pass --resume to continue it, or --overwrite to start over")
        tcfg.output.resume = True  # continue from its last checkpoint
    train(tcfg)
    done = _finished(run_dir)
    if done is None:
        raise UserError(f"{run_dir}: the task ended without a summary.json; run again with --resume")
    return done


def run_strategy(scfg: RunConfig, name: str, out: Path, baseline: Optional[str] = None, resume: bool = False) -> dict:
    """Train strategy ``name`` on the sequence (or a baseline); writes and returns its strategy.json."""
    sdir = out / name
    sdir.mkdir(parents=True, exist_ok=True)
    tasks = scfg.tasks
    T = len(tasks)
    rows: list[Optional[dict]] = [None] * (T + 1)
    runs, notes = [], {}
    train_time, trainable, total = 0.0, None, None
    started = time.perf_counter()
    with PeakMemory() as mem:
        if baseline == "joint":
            jcfg = joint_run_config(scfg, sdir)
            summary = _train_task(jcfg, resume)
            rows[0], rows[T] = summary["before"], summary["after"]
            runs.append(f"{name}/joint")
            summaries = [summary]
        else:
            previous: Optional[Path] = None
            summaries = []
            for t in range(1, T + 1):
                tcfg, why = task_run_config(scfg, t, sdir, previous)
                if why:
                    notes[tasks[t - 1].name] = why
                summary = _train_task(tcfg, resume)
                summaries.append(summary)
                if t == 1:
                    rows[0] = summary["before"]
                rows[t] = summary["after"]
                previous = Path(tcfg.output.dir)
                runs.append(f"{name}/{previous.name}")
        for s in summaries:
            train_time += s["train"]["train_time_s"]
            trainable = s["train"]["trainable_params"] if trainable is None else max(trainable, s["train"]["trainable_params"])
            total = s["train"]["total_params"] if total is None else max(total, s["train"]["total_params"])
    result = {
        "baseline": baseline,
        "matrix": [[headline(row.get(task.name)) if row else None for task in tasks] for row in rows],
        "scores": rows,
        "general": {
            probe: {k: [row[probe].get(k) if row and probe in row else None for row in rows] for k in ("loss", "perplexity")}
            for probe in scfg.data.keep
        },
        "time_s": round(train_time, 2),  # training time of every task (a resumed sequence keeps its earlier tasks')
        "wall_s": round(time.perf_counter() - started, 2),  # this process: training, evaluation, setup
        "trainable_params": trainable,
        "total_params": total,
        "peak_memory_mb": mem.mb,
        "runs": runs,
        "notes": notes,
        "config": to_dict(scfg),
    }
    # each task's metric as its scorer resolved it (the first run scores every task)
    scored = summaries[0].get("data", {})
    metrics = {task.name: scored[task.name]["metric"] for task in tasks}
    result["metrics"] = metrics
    directions = [higher_is_better(metrics[task.name]) for task in tasks]
    result["summary"] = summarize_strategy(result, directions, list(scfg.data.keep))
    write_text_atomic(sdir / STRATEGY_FILE, json.dumps(result, indent=2))
    return result


def summarize_strategy(result: dict, directions: list[bool], general: list[str]) -> dict:
    """The matrix metrics of one strategy (None where the matrix does not define them).

    Lower-is-better task metrics (loss, perplexity) are negated first, so BWT < 0 always means
    forgetting (forgetless.report.tables.strategy_metrics: the report's table uses the same function).
    """
    out: dict[str, Any] = dict(strategy_metrics(result["matrix"], directions))
    retention = {}
    for probe in general:
        ppl = result["general"][probe]["perplexity"]
        ok = ppl and ppl[0] is not None and ppl[-1] is not None
        retention[probe] = M.general_retention(ppl[0], ppl[-1], lower_is_better=True) if ok else None
    out["general_retention"] = retention
    return out


# ------------------------------------------------------------------------------------------------
# Several strategies: continual / compare
# ------------------------------------------------------------------------------------------------


@dataclass
class SequenceResult:
    out: Path
    results: dict
    files: dict


def plan(cfg: RunConfig, compare: bool) -> list[tuple[str, RunConfig, Optional[str]]]:
    """(name, config, baseline) of every strategy to run, in order."""
    if not cfg.tasks:
        raise ConfigError("no task sequence: add tasks: [{name, train, eval}, ...] to the config (forgetless config --markdown)")
    if compare and not cfg.continual.strategies:
        raise ConfigError("continual.strategies is empty: compare needs strategies to run (e.g. continual.strategies: {plain: {methods: {}}, ewc: {methods: {ewc: {}}}}); or use forgetless continual")
    strategies = strategy_configs(cfg) if compare else {default_strategy_name(cfg): cfg}
    todo = [(n, c, None) for n, c in strategies.items()]
    for b in cfg.continual.baselines:
        if b in strategies:
            raise ConfigError(f"continual.strategies.{b}: the name is taken by a baseline; rename the strategy")
        bcfg = copy.deepcopy(cfg)
        bcfg.methods.clear()
        bcfg.continual = ContinualConfig()
        todo.append((b, bcfg, b))
    return todo


def run_sequence(cfg: RunConfig, compare: bool = False, resume: bool = False) -> SequenceResult:
    """Run every strategy (and baseline) on the task sequence; write results.json and the report."""
    todo = plan(cfg, compare)
    out = Path(cfg.output.dir)
    if resume and (out / CONFIG_FILE).is_file():
        check_same_config(out / CONFIG_FILE, cfg)
    else:
        prepare_run_dir(out, cfg.output.overwrite)
        save_config(cfg, out / CONFIG_FILE)
    results = {
        "kind": "compare" if compare else "continual",
        "forgetless_version": _version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tasks": [t.name for t in cfg.tasks],
        "general": list(cfg.data.keep),
        "strategies": {},
    }
    for name, scfg, baseline in todo:
        done = out / name / STRATEGY_FILE
        if resume and done.is_file():
            strategy = json.loads(done.read_text(encoding="utf-8"))
        elif cfg.continual.isolate:
            strategy = _run_isolated(scfg, name, out, baseline, resume)
        else:
            strategy = run_strategy(scfg, name, out, baseline, resume)
        results["strategies"][name] = strategy
        if "metrics" not in results:  # each task's metric as the scorer resolved it (the same in every strategy)
            results["metrics"] = strategy["metrics"]
            results["higher_is_better"] = {k: higher_is_better(v) for k, v in strategy["metrics"].items()}
        write_text_atomic(out / RESULTS_FILE, json.dumps(results, indent=2))
    files = write_report(out)  # report.html, results.csv, summary.md from results.json
    return SequenceResult(out, results, files)


def _run_isolated(scfg: RunConfig, name: str, out: Path, baseline: Optional[str], resume: bool) -> dict:
    """Run one strategy in a child process (its own peak memory; a crash stays its own)."""
    sdir = out / name
    sdir.mkdir(parents=True, exist_ok=True)
    save_config(scfg, sdir / STRATEGY_CONFIG)  # for the user to read (secrets redacted)
    # The child gets the config itself on stdin, so no secret it may hold is written anywhere.
    cmd = [sys.executable, "-m", "forgetless.recipes.continual", "-", str(out), name]
    cmd += _outside_modules(scfg)
    if baseline:
        cmd += ["--baseline", baseline]
    if resume:
        cmd.append("--resume")
    code = subprocess.run(cmd, input=yaml.safe_dump(to_dict(scfg)), text=True).returncode
    if code != 0 or not (sdir / STRATEGY_FILE).is_file():
        raise UserError(f"strategy {name!r} failed (exit code {code}; its error is above); fix it and run again with --resume")
    return json.loads((sdir / STRATEGY_FILE).read_text(encoding="utf-8"))


def _outside_modules(scfg: RunConfig) -> list[str]:
    """Child arguments that import the modules registering the strategy's methods from outside the
    package (other than config.plugins, which the child imports itself): by name where the child can
    import it by name, else by file (e.g. a user's script, ``__main__``)."""
    args = []
    for name in sorted(scfg.methods):
        module = getattr(REGISTRY[name].build, "__module__", None)
        if module is None or module.startswith(("forgetless.", PLUGIN_MODULE_PREFIX)):
            continue
        loaded = sys.modules.get(module)
        file = getattr(loaded, "__file__", None)
        if module != "__main__" and importlib.util.find_spec(module) is not None:
            args += ["--import", module]
        elif file:
            args += ["--import-file", file]
        else:
            raise UserError(f"methods.{name}: registered in {module}, which a strategy's child process cannot import; "
                            f"put the method in a file and list it under plugins:, or set continual.isolate=false")
    return list(dict.fromkeys(args))  # each module once, keeping pairs: flags and values alternate


def _version() -> str:
    from forgetless import __version__

    return __version__


def _child(argv: list[str]) -> int:
    """Entry point of an isolated strategy: CONFIG OUT NAME [--baseline B] [--resume]."""
    import argparse

    from forgetless.progress import quiet_libraries

    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("name")
    p.add_argument("--baseline")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--import", dest="imports", action="append", default=[], help="a module that registers methods when imported")
    p.add_argument("--import-file", dest="files", action="append", default=[], help="a Python file that registers methods when imported")
    args = p.parse_args(argv)
    quiet_libraries()
    try:
        for module in args.imports:
            importlib.import_module(module)
        if args.files:
            import_plugins(args.files, "plugins", None, Path.cwd())
        cfg = config_from_dict(yaml.safe_load(sys.stdin.read())) if args.config == "-" else load_config(args.config)
        run_strategy(cfg, args.name, Path(args.out), args.baseline, args.resume)
    except UserError as e:
        print(f"forgetless: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
