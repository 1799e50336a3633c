"""``forgetless tune CONFIG``: search strategies and strengths; report the front of learned vs kept.

Every trial is one training run of the user's config with a strategy of ``tune.strategies`` and
strengths the sampler picks (its ``methods`` replace the config's), in a process of its own, in
``OUTPUT/trials/NNNN-<strategy>/``. Two objectives, both maximised, from the run's summary:

- **learned**: the mean over the new-task sets of their headline score after training (a loss or
  perplexity counts negated);
- **kept**: the mean over the keep sets of the share of their starting score still there
  (``after / before`` for higher-is-better scores, ``before / after`` for loss and perplexity,
  each capped at 1), as in the real-model benchmark.

A forgetting budget in the config (``data.keep.NAME.max_drop``) is a constraint: a trial over it
is infeasible (Optuna's trial constraints). A trial whose strategy has a strength the budget's
controller can move (kl, l2sp, ewc, mix, replay) runs with the controller on, starting from the
sampled strength (the sampler then searches where the controller starts, and the learning
rate); any other trial (LoRA, plain full fine-tuning)
runs with ``budget.patience=2``, so when it is over budget twice in a row it stops early: the
budget prunes it. The sampler is Optuna's multi-objective TPE; its first trials are the field's advice
for what the user has (LoRA; full fine-tuning with a KL anchor; general data mixed in; replay of
old data; EWC on old data). With a budget, each advised start of a controlled strategy is followed
by up to FOLLOW_UPS trials warm-started from the controller of the one before: its strength times
the factor that controller held on average over the run, or its last factor when the run ended
over the budget (:func:`warm_scale`, :func:`follow_up`), until the controller settles. Then the
sampler explores. The study is an Optuna journal file (``OUTPUT/tune.journal``): ``--resume`` keeps every finished trial and continues an interrupted
one from its checkpoint.

The result: ``OUTPUT/tune.json`` (every trial, the Pareto front, the chosen one) and
``OUTPUT/best.yaml``, the chosen trial's config (training it gives the trial's numbers again):
the front's trial that learned the most inside the budget (without a budget, the most learned +
kept). ``budget.control`` of the config is not used: each trial's is set by its strategy (above);
the config is read with it off, so that it needs no protective method of its own.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from forgetless.config import RunConfig, config_from_dict, redact_secrets, save_config, to_dict
from forgetless.config.schema import TUNE_STRATEGIES
from forgetless.errors import UserError
from forgetless.files import BEST_FILE, METRICS_FILE, SUMMARY_FILE, TUNE_FILE
from forgetless.report.tune import write_tune_report
from forgetless.registry import REGISTRY, STRENGTH

JOURNAL_FILE = "tune.journal"
STUDY = "forgetless-tune"
REPLAY_MEMORY = 1000  # examples of tune.old_data a replay trial keeps (all of it when it has fewer)


# ------------------------------------------------------------------------------------------------
# pure parts: the objectives, the constraint, the choice, the strategies
# ------------------------------------------------------------------------------------------------


def objectives(summary: dict) -> tuple[float, float]:
    """(learned, kept) of a finished run's summary.json (see the module docstring)."""
    data, before, after = summary.get("data", {}), summary.get("before", {}), summary.get("after", {})
    learned, kept = [], []
    for row in summary.get("sets", []):
        name, role = row["set"], row["role"]
        higher = (data.get(name) or {}).get("higher_is_better", True)
        a, b = (after.get(name) or {}).get("score"), (before.get(name) or {}).get("score")
        if a is None:
            continue
        if role == "new":
            learned.append(a if higher else -a)
        elif b is not None:
            share = (a / b if b > 0 else (1.0 if a >= b else 0.0)) if higher else (b / a if a > 0 else 1.0)
            kept.append(min(1.0, max(0.0, share)))
    return (sum(learned) / len(learned) if learned else 0.0, sum(kept) / len(kept) if kept else 1.0)


def budget_excess(summary: dict, limits: dict[str, float]) -> float:
    """The largest ``drop - max_drop`` over the limited keep sets (<= 0: inside the budget)."""
    from forgetless.recipes.budget import score_drop

    data, before, after = summary.get("data", {}), summary.get("before", {}), summary.get("after", {})
    excess = [-math.inf]
    for name, limit in limits.items():
        a, b = (after.get(name) or {}).get("score"), (before.get(name) or {}).get("score")
        if a is not None and b is not None:
            excess.append(score_drop(b, a, (data.get(name) or {}).get("higher_is_better", True)) - limit)
    return max(excess)


def pareto_front(points: dict[int, tuple[float, float]]) -> list[int]:
    """The keys whose (learned, kept) no other point beats on both (and strictly on one)."""
    front = []
    for k, (x, y) in points.items():
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for k2, (x2, y2) in points.items() if k2 != k):
            front.append(k)
    return sorted(front)


def choose(trials: list[dict], budgeted: bool) -> Optional[dict]:
    """The trial to recommend: the most learned among the feasible front (with a budget), else the
    most learned + kept; ties to the one that kept more, then the earlier."""
    done = [t for t in trials if t.get("learned") is not None]
    feasible = [t for t in done if t.get("feasible", True)]
    if not feasible:
        return None
    front = set(pareto_front({t["number"]: (t["learned"], t["kept"]) for t in feasible}))
    pool = [t for t in feasible if t["number"] in front]
    key = (lambda t: (t["learned"], t["kept"], -t["number"])) if budgeted else (lambda t: (t["learned"] + t["kept"], t["kept"], -t["number"]))
    return max(pool, key=key)


def strategies_for(cfg: RunConfig) -> list[str]:
    """``tune.strategies`` with 'auto' expanded by what the user has."""
    t = cfg.tune
    if "auto" not in t.strategies:
        return list(dict.fromkeys(t.strategies))
    out = ["lora", "kl", "l2sp", "full"]
    if t.general_data is not None:
        out.append("mix")
    if t.old_data is not None:
        out += ["replay", "ewc"]
    return list(dict.fromkeys(out + [s for s in t.strategies if s != "auto"]))


def advised_starts(strategies: list[str]) -> list[dict]:
    """The first trials: each strategy at the strength practitioners start from, in the advised order."""
    starts = {
        "lora": {"strategy": "lora", "lora.r": 16, "lr_factor": 1.0},
        "kl": {"strategy": "kl", "kl.weight": 1.0, "lr_factor": 1.0},
        "mix": {"strategy": "mix", "mix.ratio": 0.1, "lr_factor": 1.0},
        "replay": {"strategy": "replay", "replay.ratio": 0.2, "lr_factor": 1.0},
        "ewc": {"strategy": "ewc", "ewc.weight": 1.0, "lr_factor": 1.0},
        "l2sp": {"strategy": "l2sp", "l2sp.weight": 0.01, "lr_factor": 1.0},
        "full": {"strategy": "full", "lr_factor": 1.0},
    }
    order = ["lora", "kl", "mix", "replay", "ewc", "l2sp", "full"]
    return [starts[s] for s in order if s in strategies]


def trial_config(cfg: RunConfig, params: dict, run_dir: Path) -> RunConfig:
    """The run of one trial: the user's config, the strategy's methods (they replace the config's),
    the searched learning rate, and the budget as a pruning rule."""
    t = cfg.tune
    out = copy.deepcopy(cfg)
    strategy = params["strategy"]
    factor = params.get("lr_factor", 1.0)
    lr = cfg.train.lr * factor * (10.0 if strategy == "lora" else 1.0)
    methods: dict = {}
    if strategy == "lora":
        methods["lora"] = {"r": int(params["lora.r"]), "alpha": 2 * int(params["lora.r"])}
    elif strategy in ("kl", "l2sp"):
        methods[strategy] = {"weight": float(params[f"{strategy}.weight"])}
    elif strategy == "ewc":
        methods["ewc"] = {"weight": float(params["ewc.weight"]), "data": to_dict(t.old_data), "normalize": "mean"}
    elif strategy == "mix":
        methods["mix"] = {"ratio": float(params["mix.ratio"]), "sources": {"general": to_dict(t.general_data)}}
    elif strategy == "replay":
        methods["replay"] = {"ratio": float(params["replay.ratio"]), "memory": [to_dict(t.old_data)], "size_examples": REPLAY_MEMORY}
    raw = to_dict(out)
    raw["methods"] = methods
    raw["train"]["lr"] = lr
    raw["output"].update({"dir": str(run_dir), "overwrite": False, "resume": False, "progress": False, "push_to_hub": None})
    if any(spec.max_drop is not None for spec in cfg.data.keep.values()):
        # a strength the budget's controller can move starts where the sampler put it, and the
        # controller keeps the trial inside the budget; any other trial over it twice in a row stops
        controlled = bool(methods) and all(REGISTRY[m].has(STRENGTH) for m in methods)
        raw["budget"].update({"control": controlled, "patience": 0 if controlled else 2, "restore": False})
    return config_from_dict(raw)


# The searched strength of each strategy that has one: its parameter and range (log-scaled for weights).
# (option, low, high, log scale): the search range of each strategy's strength. L2-SP's reaches
# 100: a pretrained 135M model needed about 10 to keep its facts (BENCHMARKS.md), a tiny one 1
STRENGTHS = {"kl": ("kl.weight", 0.03, 10.0, True), "l2sp": ("l2sp.weight", 1e-4, 100.0, True), "ewc": ("ewc.weight", 0.01, 100.0, True),
             "mix": ("mix.ratio", 0.05, 0.5, False), "replay": ("replay.ratio", 0.05, 0.5, False)}
FOLLOW_UPS = 2  # warm-started trials after each advised start of a controlled strategy (see follow_up)
SETTLED = 1.25  # a controller whose mean factor stays within [1/SETTLED, SETTLED] gets no follow-up


def suggest(trial, strategies: list[str], lr_range: float) -> dict:
    """The trial's strategy and strengths (Optuna's define-by-run space)."""
    strategy = trial.suggest_categorical("strategy", strategies)
    params = {"strategy": strategy, "lr_factor": trial.suggest_float("lr_factor", 1.0 / lr_range, lr_range, log=True)}
    if strategy == "lora":
        params["lora.r"] = trial.suggest_categorical("lora.r", [8, 16, 32])
    elif strategy in STRENGTHS:
        key, low, high, log = STRENGTHS[strategy]
        params[key] = trial.suggest_float(key, low, high, log=log)
    return params


def effective_scale(checks: list[tuple[int, float]], steps: int) -> float:
    """The controller's factor over a run, as one number: the geometric mean, over the optimiser
    steps, of the factor in force at each (1 until the first check; each check's from its step on).
    ``checks``: (step, factor after the check) in step order; ``steps``: the run's steps."""
    if steps <= 0:
        return 1.0
    total, at, log_s = 0.0, 0, 0.0
    for step, factor in checks:
        step = min(max(step, at), steps)
        total += (step - at) * log_s
        at, log_s = step, math.log(max(factor, 1e-12))
    total += (steps - at) * log_s
    return math.exp(total / steps)


def warm_scale(checks: list[tuple[int, float]], steps: int, over_budget: bool) -> float:
    """The factor a follow-up multiplies the last trial's strength by. Inside the budget: the one
    the controller held on average (:func:`effective_scale`), the fixed strength its run was worth.
    Over it at the end: the controller's last factor, since it was still raising and the steps
    before it ran weaker, so the whole run needed at least that (1 without checks)."""
    if over_budget:
        return checks[-1][1] if checks else 1.0
    return effective_scale(checks, steps)


def follow_up(params: dict, scale: float) -> Optional[dict]:
    """The next trial of a controlled strategy, warm-started from the last one's controller: its
    strength times ``scale`` (:func:`warm_scale`), within the search range; None when the
    controller had settled or the range allows no move.

    The controller of one run starts at the sampled strength and moves it only every
    ``budget.every_steps``; a run that starts too weak forgets before the controller catches up,
    one that starts too strong learns less while it relaxes. Starting the next trial where the last
    one's controller took its run is a warm start of the dual variable across runs."""
    strategy = params["strategy"]
    if strategy not in STRENGTHS or 1.0 / SETTLED <= scale <= SETTLED:
        return None
    key, low, high, _ = STRENGTHS[strategy]
    value = min(high, max(low, float(params[key]) * scale))
    if math.isclose(value, float(params[key]), rel_tol=1e-6):
        return None
    return {**params, key: value}


# ------------------------------------------------------------------------------------------------
# the search
# ------------------------------------------------------------------------------------------------


def tune(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, say=print) -> dict:
    """Run the search of ``cfg.tune`` under ``cfg.output.dir``; writes and returns tune.json's content."""
    try:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
    except ImportError:
        raise UserError("forgetless tune needs Optuna: pip install 'forgetless[tune]'") from None
    if cfg.tasks:
        raise UserError("forgetless tune searches one training run; for a task sequence use forgetless compare with strategies")
    if cfg.model.load_in_4bit and set(strategies_for(cfg)) != {"lora"}:
        raise UserError("model.load_in_4bit: a 4-bit base trains only adapters, so tune.strategies must be [lora]")
    out = Path(cfg.output.dir)
    journal = out / JOURNAL_FILE
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise UserError(f"{out}: already exists; pass --resume to continue its search or --overwrite to start over")
        import shutil

        shutil.rmtree(out)
    if resume and not journal.is_file():
        say(f"{journal}: no search to resume; starting one")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "tune_config.yaml")
    strategies = strategies_for(cfg)
    limits = {name: spec.max_drop for name, spec in cfg.data.keep.items() if spec.max_drop is not None}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=cfg.tune.seed, n_startup_trials=max(len(strategies), min(10, cfg.tune.trials // 2)))
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(study_name=STUDY, storage=storage, sampler=sampler, directions=["maximize", "maximize"],
                                load_if_exists=True)
    if not study.trials:
        for params in advised_starts(strategies)[: cfg.tune.trials]:
            study.enqueue_trial(params, user_attrs={"depth": 0})
    # an interrupted trial (a killed search): its run goes on from its checkpoint, under its number
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        _finish_trial(study, storage, cfg, frozen.number, frozen.params, out, limits, say, resume=True)
    while len([t for t in study.trials if t.state.is_finished()]) < cfg.tune.trials:
        if limits:
            _enqueue_follow_ups(study, out)
        trial = study.ask()
        params = suggest(trial, strategies, cfg.tune.lr_range)
        _finish_trial(study, storage, cfg, trial.number, params, out, limits, say, resume=False)
    return _write_result(study, cfg, out, limits)


def _enqueue_follow_ups(study, out: Path) -> None:
    """For every finished advised start (or follow-up) of a controlled strategy without its follow-up
    yet: the next trial warm-started from its controller (:func:`follow_up`), up to FOLLOW_UPS deep.
    Decided from the journal and the trials' files alone, so a resumed search makes the same ones."""
    import optuna

    followed = {t.user_attrs.get("follows") for t in study.trials}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        depth = t.user_attrs.get("depth")
        if depth is None or depth >= FOLLOW_UPS or t.number in followed or t.params.get("strategy") not in STRENGTHS:
            continue
        run_dir = _trial_dir(out, t.number, t.params["strategy"])
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        checks = [(r["step"], r["budget"]["strength"]) for r in _metrics(run_dir)
                  if "budget" in r and "strength" in r["budget"] and r["budget"].get("action") != "end"]
        over = t.user_attrs.get("budget_excess", -1.0) > 0
        params = follow_up(dict(t.params), warm_scale(checks, int(summary.get("train", {}).get("steps") or 0), over))
        if params is not None:
            study.enqueue_trial(params, user_attrs={"depth": depth + 1, "follows": t.number})


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []


def _trial_dir(out: Path, number: int, strategy: str) -> Path:
    return out / "trials" / f"{number:04d}-{strategy}"


def _finish_trial(study, storage, cfg: RunConfig, number: int, params: dict, out: Path, limits: dict, say, resume: bool) -> None:
    """Run (or go on with) trial ``number`` in its own process and tell the study its objectives."""
    import optuna

    full = dict(params)
    if "strategy" not in full:  # an enqueued trial's params as Optuna stored them
        raise UserError(f"tune trial {number}: no strategy in its parameters; start the search again with --overwrite")
    run_dir = _trial_dir(out, number, full["strategy"])
    tcfg = trial_config(cfg, full, run_dir)
    summary = _run_trial(tcfg, run_dir, resume=resume or run_dir.exists())
    if summary is None:
        say(f"trial {number} ({_label(full)}): failed; see {run_dir}")
        study.tell(number, state=optuna.trial.TrialState.FAIL)
        return
    learned, kept = objectives(summary)
    excess = budget_excess(summary, limits) if limits else -math.inf
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(STUDY), number)
    value = excess if math.isfinite(excess) else -1.0
    storage.set_trial_user_attr(trial_id, "budget_excess", value)
    optuna.trial.Trial(study, trial_id).set_constraint("budget", value)  # <= 0: feasible, for the sampler
    stopped = (summary.get("train", {}).get("budget") or {}).get("stopped_at")
    study.tell(number, [learned, kept])
    flag = "" if excess <= 0 else f", over budget by {excess:.3f}" + (f" (stopped at step {stopped})" if stopped else "")
    say(f"trial {number} ({_label(full)}): learned {learned:.3f}, kept {kept:.3f}{flag}")


def _run_trial(tcfg: RunConfig, run_dir: Path, resume: bool) -> Optional[dict]:
    """One trial's training run in a child process; its summary.json, or None when it failed."""
    done = run_dir / SUMMARY_FILE
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir.parent / f"{run_dir.name}.yaml"
    save_config(tcfg, cfg_file)
    cmd = [sys.executable, "-m", "forgetless", "train", str(cfg_file)]
    if resume and any(p for p in run_dir.iterdir()):
        cmd.append("--resume")
    else:
        cmd.append("--overwrite")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not done.is_file():
        (run_dir.parent / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
        return None
    return json.loads(done.read_text(encoding="utf-8"))


def _label(params: dict) -> str:
    parts = [params["strategy"]] + [f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
                                    for k, v in params.items() if "." in k]
    parts.append(f"lr x{params.get('lr_factor', 1.0):.2g}")
    return " ".join(parts)


def _write_result(study, cfg: RunConfig, out: Path, limits: dict) -> dict:
    import optuna

    trials = []
    for t in study.trials:
        row = {"number": t.number, "state": t.state.name, "params": dict(t.params), "label": _label(t.params) if t.params else ""}
        if t.state == optuna.trial.TrialState.COMPLETE:
            excess = t.user_attrs.get("budget_excess", -1.0)
            run_dir = _trial_dir(out, t.number, t.params["strategy"])
            summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
            row.update({"learned": t.values[0], "kept": t.values[1], "feasible": excess <= 0, "budget_excess": excess if limits else None,
                        "steps": summary.get("train", {}).get("steps"), "run_dir": str(run_dir)})
        trials.append(row)
    done = [t for t in trials if "learned" in t]
    front = pareto_front({t["number"]: (t["learned"], t["kept"]) for t in done if t["feasible"]})
    chosen = choose(trials, bool(limits))
    result = {"strategies": strategies_for(cfg), "objectives": ["learned", "kept"], "limits": limits, "trials": trials,
              "front": front, "chosen": chosen["number"] if chosen else None,
              "training_steps": sum(t["steps"] or 0 for t in done)}
    (out / TUNE_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
    if chosen is not None:
        best = trial_config(cfg, dict(study.trials[chosen["number"]].params), Path(cfg.output.dir) / "best")
        raw = to_dict(best)  # the trial's own config (output.dir aside): training it gives the trial's numbers again
        raw["output"]["push_to_hub"] = cfg.output.push_to_hub  # the user's own choice, for the chosen run
        (out / BEST_FILE).write_text("# chosen by forgetless tune: " + chosen["label"] + "\n" + yaml.safe_dump(redact_secrets(raw), sort_keys=False),
                                     encoding="utf-8")
    write_tune_report(out)
    return result


__all__ = ["tune", "objectives", "budget_excess", "pareto_front", "choose", "strategies_for", "advised_starts", "trial_config",
           "effective_scale", "warm_scale", "follow_up", "TUNE_STRATEGIES"]
