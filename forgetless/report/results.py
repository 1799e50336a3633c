"""Reading a comparison's ``results.json`` and its runs' training logs, with clear errors.

``forgetless continual`` and ``forgetless compare`` write ``RUN_DIR/results.json``: the tasks in
training order, each task's metric and direction, and per strategy the accuracy matrix
``R[t][k]`` (row 0 = before training, row t = after task t; a joint baseline has rows 0 and T
only), the general probes, cost figures, its run directories and its resolved config. This
module checks that file and turns it into :class:`Results`; everything the report shows is
computed from it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from forgetless.errors import UserError
from forgetless.files import METRICS_FILE, RESULTS_FILE

KINDS = ("continual", "compare")
LOWER_IS_BETTER_METRICS = ("loss", "perplexity")
WHAT_TO_RUN = "run `forgetless continual CONFIG` or `forgetless compare CONFIG` with output.dir=RUN_DIR first"


@dataclass
class Strategy:
    name: str
    baseline: Optional[str]
    matrix: list[list[Optional[float]]]
    general: dict[str, dict[str, list[Optional[float]]]]
    time_s: Optional[float]
    trainable_params: Optional[int]
    total_params: Optional[int]
    peak_memory_mb: Optional[float]
    runs: list[str]
    config: Optional[dict]
    notes: dict[str, str] = field(default_factory=dict)  # per task: why it ran as it did


@dataclass
class Results:
    path: Path
    kind: str
    version: str
    created: str
    tasks: list[str]
    metrics: dict[str, str]
    higher_is_better: dict[str, bool]
    general: list[str]
    strategies: list[Strategy]
    notes: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def directions(self) -> list[bool]:
        return [self.higher_is_better[t] for t in self.tasks]


def _number(value: Any) -> Optional[float]:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def load_results(run_dir: Path) -> Results:
    """Read and check ``run_dir/results.json``; raise :class:`UserError` with one line on bad input."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_FILE
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such directory; {WHAT_TO_RUN}")
    if not path.is_file():
        raise UserError(f"{path}: not found; {WHAT_TO_RUN}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; regenerate it ({WHAT_TO_RUN})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); regenerate it ({WHAT_TO_RUN})") from None

    def bad(where: str, problem: str) -> UserError:
        return UserError(f"{path}: {where}: {problem}; regenerate it ({WHAT_TO_RUN})")

    if not isinstance(raw, dict):
        raise bad("top level", "expected a JSON object")
    if raw.get("kind") not in KINDS:
        raise bad("kind", f"expected one of {', '.join(KINDS)}, got {raw.get('kind')!r} (is this a continual or compare run?)")
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise bad("tasks", "expected a non-empty list of task names")
    if len(set(tasks)) != len(tasks):
        raise bad("tasks", "a task name appears twice")
    T = len(tasks)
    metrics_raw = raw.get("metrics") or {}
    if not isinstance(metrics_raw, dict):
        raise bad("metrics", "expected an object mapping each task to its metric")
    metrics = {t: str(metrics_raw.get(t, "score")) for t in tasks}
    hib_raw = raw.get("higher_is_better") or {}
    if not isinstance(hib_raw, dict) or not all(isinstance(v, bool) for v in hib_raw.values()):
        raise bad("higher_is_better", "expected an object mapping each task to true or false")
    higher = {t: hib_raw.get(t, metrics[t] not in LOWER_IS_BETTER_METRICS) for t in tasks}
    general = raw.get("general") or []
    if not isinstance(general, list) or not all(isinstance(g, str) for g in general):
        raise bad("general", "expected a list of probe-set names")
    strategies_raw = raw.get("strategies")
    if not isinstance(strategies_raw, dict) or not strategies_raw:
        raise bad("strategies", "expected an object with at least one strategy")

    strategies = []
    for name, s in strategies_raw.items():
        where = f"strategies.{name}"
        if not isinstance(s, dict):
            raise bad(where, "expected an object")
        matrix = s.get("matrix")
        if not isinstance(matrix, list) or len(matrix) != T + 1:
            got = len(matrix) if isinstance(matrix, list) else type(matrix).__name__
            raise bad(f"{where}.matrix", f"expected {T + 1} rows (before training + one per task), got {got}")
        rows: list[list[Optional[float]]] = []
        for i, row in enumerate(matrix):
            if row is None:
                rows.append([None] * T)
                continue
            if not isinstance(row, list) or len(row) != T:
                raise bad(f"{where}.matrix[{i}]", f"expected null or {T} numbers (one per task)")
            if any(v is not None and _number(v) is None for v in row):
                raise bad(f"{where}.matrix[{i}]", "expected numbers or null")
            rows.append([_number(v) for v in row])
        baseline = s.get("baseline")
        if baseline is not None and not isinstance(baseline, str):
            raise bad(f"{where}.baseline", "expected null, 'sequential' or 'joint'")
        general_curves: dict[str, dict[str, list[Optional[float]]]] = {}
        for probe, curves in (s.get("general") or {}).items():
            if not isinstance(curves, dict):
                raise bad(f"{where}.general.{probe}", "expected an object of per-row value lists")
            for key, values in curves.items():
                if not isinstance(values, list) or len(values) != T + 1:
                    raise bad(f"{where}.general.{probe}.{key}", f"expected {T + 1} values (one per matrix row)")
            general_curves[probe] = {k: [_number(v) for v in vals] for k, vals in curves.items()}
        runs = s.get("runs") or []
        if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
            raise bad(f"{where}.runs", "expected a list of run directories relative to the results file")
        notes = s.get("notes") or {}
        if not isinstance(notes, dict):
            raise bad(f"{where}.notes", "expected an object mapping tasks to notes")
        trainable, total = _number(s.get("trainable_params")), _number(s.get("total_params"))
        strategies.append(Strategy(
            name=str(name), baseline=baseline, matrix=rows, general=general_curves,
            time_s=_number(s.get("time_s")),
            trainable_params=None if trainable is None else int(trainable),
            total_params=None if total is None else int(total),
            peak_memory_mb=_number(s.get("peak_memory_mb")),
            runs=runs, config=s.get("config") if isinstance(s.get("config"), dict) else None,
            notes={str(k): str(v) for k, v in notes.items()},
        ))
    return Results(
        path=path, kind=raw["kind"], version=str(raw.get("forgetless_version", "")), created=str(raw.get("created", "")),
        tasks=tasks, metrics=metrics, higher_is_better=higher, general=general, strategies=strategies,
    )


@dataclass
class LossCurve:
    """Training loss over a whole task sequence: steps offset so that task t starts where t-1 ended."""

    steps: list[int]
    losses: list[float]
    boundaries: list[int]  # global step at which each task after the first starts


@dataclass
class RunLog:
    """One run's metrics.jsonl: training loss and evaluations by step."""

    losses: dict[int, float]
    evals: dict[int, dict]
    last_step: int
    budgets: dict[int, dict] = field(default_factory=dict)  # the forgetting budget's checks (forgetless/recipes/budget.py)
    budget_end: Optional[dict] = None  # its check at the end (whole keep sets; a restore of earlier weights)

    def controller_changes(self) -> list[int]:
        """The steps at which the budget's controller moved the protection's strength."""
        return [s for s, r in sorted(self.budgets.items()) if r.get("action") in ("raised", "lowered")]


def read_run_log(path: Path, label: str, notes: list[str]) -> RunLog:
    """Read a metrics.jsonl. A record repeated after a resume (same step) counts once, the last
    one written; a line that is not JSON (a run killed mid-write) is skipped and noted."""
    log = RunLog({}, {}, 0)
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                notes.append(f"{label} line {lineno} is not JSON; skipped")
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if not isinstance(step, int):
                continue
            log.last_step = max(log.last_step, step)
            if isinstance(record.get("eval"), dict):
                log.evals[step] = record["eval"]
            elif isinstance(record.get("budget"), dict):
                action = str(record["budget"].get("action", ""))
                if action == "end" or action.startswith("restored"):  # the end's record scores whole sets, not the samples
                    log.budget_end = record["budget"]
                else:
                    log.budgets[step] = record["budget"]
            elif (loss := _number(record.get("loss"))) is not None:
                log.losses[step] = loss
    return log


def read_loss_curve(results: Results, strategy: Strategy) -> Optional[LossCurve]:
    """The strategy's training losses from each run's metrics.jsonl, or None when there are none
    (a missing log is noted in ``results.notes``)."""
    steps: list[int] = []
    losses: list[float] = []
    boundaries: list[int] = []
    offset = 0
    for i, rel in enumerate(strategy.runs):
        path = results.run_dir / rel / METRICS_FILE
        if not path.is_file():
            results.notes.append(f"{strategy.name}: no training log at {rel}/{METRICS_FILE}; its loss curve is left out")
            return None
        log = read_run_log(path, f"{strategy.name}: {rel}/{METRICS_FILE}", results.notes)
        if i:
            boundaries.append(offset)
        for step in sorted(log.losses):
            steps.append(offset + step)
            losses.append(log.losses[step])
        offset += log.last_step
    return LossCurve(steps, losses, boundaries) if steps else None
