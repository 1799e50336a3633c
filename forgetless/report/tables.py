"""The comparison table, recomputed from each strategy's accuracy matrix, as CSV and markdown.

Every number comes from ``results.json`` through the pure functions of
:mod:`forgetless.eval.metrics`; nothing is copied from a stored summary. Transfer and forgetting
are computed on the oriented matrix (lower-is-better columns negated), so BWT < 0 means
forgetting for any metric. Averages of raw scores (final, incremental, plasticity) keep the
metric's own direction, and are left empty when tasks mix higher- and lower-is-better metrics.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from statistics import mean
from typing import Callable, Optional

from forgetless.eval import metrics as M
from forgetless.report.results import Results, Strategy

HIGHER, LOWER = "higher", "lower"


@dataclass
class Column:
    key: str
    label: str
    better: Optional[str]  # HIGHER, LOWER, or None (no best value)
    kind: str  # "level" (a score), "delta"/"gap" (a signed/unsigned difference of scores), "ppl", "seconds", "count", "mb"
    help: str = ""


def level_direction(results: Results) -> Optional[str]:
    """HIGHER or LOWER when every task's metric agrees, else None (averages are not defined)."""
    directions = set(results.directions)
    if len(directions) > 1:
        return None
    return HIGHER if directions.pop() else LOWER


def scores_are_fractions(results: Results) -> bool:
    """True when every task is higher-is-better and every score lies in [0, 1] (shown as %)."""
    if not all(results.directions):
        return False
    return all(0.0 <= v <= 1.0 for s in results.strategies for row in s.matrix for v in row if v is not None)


def _needs_entries(metric: Callable, R: list[list[Optional[float]]]) -> Optional[float]:
    """``metric(R)``, or None when an entry it reads is missing (None in the matrix)."""
    try:
        value = metric(R)
        return mean(value) if isinstance(value, list) else value
    except TypeError:  # arithmetic on a missing entry
        return None


def strategy_metrics(R: list[list[Optional[float]]], higher_is_better: list[bool]) -> dict[str, Optional[float]]:
    """The matrix metrics of one strategy; a metric that reads a missing entry is None.

    A joint baseline (rows 0 and T only) gets a final average and nothing that needs the rows in
    between; with one task there is no old task, so transfer and forgetting are None.
    """
    T = len(R) - 1
    O = M.oriented(R, higher_is_better)
    levels = len(set(higher_is_better)) == 1  # an average of a loss and an accuracy means nothing
    transfer = T >= 2

    def value(ok: bool, metric: Callable, matrix: list[list[Optional[float]]]) -> Optional[float]:
        return _needs_entries(metric, matrix) if ok else None

    return {
        "final_average": value(levels, M.final_average, R),
        "average_incremental": value(levels, M.average_incremental, R),
        "bwt": value(transfer, M.backward_transfer, O),
        "fwt": value(transfer, M.forward_transfer, O),
        "forgetting": value(transfer, M.forgetting, O),
        "plasticity": value(levels, M.plasticity, R),
    }


def general_retention(strategy: Strategy, probe: str) -> dict[str, Optional[float]]:
    """Perplexity (else loss) of a general probe before training and after the last task, and the
    retention: after - before signed so that negative = ability lost (lower is better)."""
    curves = strategy.general.get(probe) or {}
    for key in ("perplexity", "loss"):
        values = curves.get(key)
        if values and values[0] is not None and values[-1] is not None:
            before, after = values[0], values[-1]
            return {"measure": key, "before": before, "after": after, "retention": M.general_retention(before, after, lower_is_better=True)}
    return {"measure": None, "before": None, "after": None, "retention": None}


def columns(results: Results) -> list[Column]:
    level = level_direction(results)
    cols = [
        Column("final_average", "final average", level, "level", "mean over tasks of the score after the last task"),
        Column("average_incremental", "avg incremental", level, "level", "mean over steps t of the mean score on tasks 1..t after task t"),
        Column("bwt", "BWT", HIGHER, "delta", "backward transfer: score after the last task minus right after learning it; negative = forgotten"),
        Column("fwt", "FWT", HIGHER, "delta", "forward transfer: score on a task just before training it minus before any training"),
        Column("forgetting", "forgetting", LOWER, "gap", "best earlier score minus the final score, averaged over old tasks"),
        Column("plasticity", "plasticity", level, "level", "mean score on each task right after training it (new-task learning)"),
    ]
    for probe in results.general:
        cols.append(Column(f"general_{probe}", f"{probe} retention", HIGHER, "ppl",
                           f"general probe {probe}: perplexity before - after (negative = general ability lost)"))
    cols += [
        Column("time_s", "time", LOWER, "seconds", "training time of the whole sequence"),
        Column("trainable_params", "trainable params", None, "count", "parameters the strategy trains"),
        Column("peak_memory_mb", "peak memory", LOWER, "mb", "peak accelerator (or process) memory"),
    ]
    return cols


def table_rows(results: Results) -> list[dict]:
    """One row per strategy, every metric recomputed from the strategy's matrix and curves."""
    rows = []
    for s in results.strategies:
        row: dict = {"strategy": s.name, "baseline": s.baseline, **strategy_metrics(s.matrix, results.directions)}
        for probe in results.general:
            g = general_retention(s, probe)
            row[f"general_{probe}"] = g["retention"]
            row[f"general_{probe}_measure"] = g["measure"]
            row[f"general_{probe}_before"] = g["before"]
            row[f"general_{probe}_after"] = g["after"]
        row.update(time_s=s.time_s, trainable_params=s.trainable_params, total_params=s.total_params, peak_memory_mb=s.peak_memory_mb)
        rows.append(row)
    return rows


def best_rows(rows: list[dict], column: Column) -> set[int]:
    """Indices of the rows holding the best value of a column (ties all count; none when every
    row has the same value, as nothing stands out)."""
    values = [(i, r[column.key]) for i, r in enumerate(rows) if r.get(column.key) is not None]
    if column.better is None or len({v for _, v in values}) < 2:
        return set()
    pick = max if column.better == HIGHER else min
    best = pick(v for _, v in values)
    return {i for i, v in values if v == best}


def formatter(results: Results) -> Callable[[Column, Optional[float], dict], str]:
    fractions = scores_are_fractions(results)

    def fmt(col: Column, value: Optional[float], row: dict) -> str:
        if value is None:
            return "n/a"
        if col.kind == "level":
            return percent(value) if fractions else f"{value:.4g}"
        if col.kind in ("delta", "gap"):
            sign = "+" if col.kind == "delta" else ""
            return f"{100 * value:{sign}.1f} pts" if fractions else f"{value:{sign}.4g}"
        if col.kind == "ppl":
            return ("+" if value > 0 else "") + _plain(value)
        if col.kind == "seconds":
            return f"{value:,.1f} s"
        if col.kind == "count":
            total = row.get("total_params")
            return short_count(value) + (f" ({100 * value / total:.3g}%)" if total else "")
        if col.kind == "mb":
            return f"{value:,.0f} MB"
        return str(value)

    return fmt


def short_count(n: float) -> str:
    """A count in 3 significant digits: 1704192 -> '1.7M', 1250000 -> '1.25M', 73696 -> '73.7k', 512 -> '512'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
    return f"{int(n)}"


def percent(fraction: float) -> str:
    """A score in [0, 1] as a percentage: 0.994 -> '99.4%'."""
    return f"{fraction:.1%}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def detail(col: Column, row: dict) -> str:
    """What a general-retention cell is made of: 'ppl 40 → 85'."""
    if col.kind != "ppl" or row.get(f"{col.key}_before") is None:
        return ""
    unit = "ppl" if row[f"{col.key}_measure"] == "perplexity" else "loss"
    return f"{unit} {_plain(row[f'{col.key}_before'])} → {_plain(row[f'{col.key}_after'])}"


def _plain(value: float) -> str:
    """3 significant digits without scientific notation for large values: 1033.1 -> '1,033'."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def direction(col: Column) -> str:
    """'lower is better', 'higher is better', or '' for a column with no better direction."""
    return f"{col.better} is better" if col.better else ""


def header(col: Column) -> str:
    """The column's label with its direction, e.g. 'forgetting (lower is better)'."""
    return f"{col.label} ({direction(col)})" if col.better else col.label


def results_csv(results: Results, rows: list[dict]) -> str:
    """One row per strategy with plain numbers (empty = not defined)."""
    keys = ["strategy", "baseline", "final_average", "average_incremental", "bwt", "fwt", "forgetting", "plasticity"]
    for probe in results.general:
        keys += [f"general_{probe}_retention", f"general_{probe}_before", f"general_{probe}_after", f"general_{probe}_measure"]
    keys += ["time_s", "trainable_params", "total_params", "peak_memory_mb"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys)
    for r in rows:
        r = {**r, **{f"general_{p}_retention": r[f"general_{p}"] for p in results.general}}
        writer.writerow(["" if r.get(k) is None else r[k] for k in keys])
    return buf.getvalue()


def matrix_markdown(results: Results, strategy: Strategy) -> str:
    fractions = scores_are_fractions(results)
    cell = lambda v: "–" if v is None else (percent(v) if fractions else f"{v:.4g}")  # noqa: E731
    rows = [["before training" if t == 0 else f"task {t}: {results.tasks[t - 1]}", *(cell(v) for v in row)]
            for t, row in enumerate(strategy.matrix)]
    return "\n".join(markdown_table(["after \\ on", *results.tasks], rows))


def summary_markdown(results: Results, rows: list[dict]) -> str:
    cols = columns(results)
    fmt = formatter(results)
    tasks = ", ".join(f"{t} ({results.metrics[t]}, {'higher' if results.higher_is_better[t] else 'lower'} is better)" for t in results.tasks)
    lines = [
        f"# forgetless {results.kind}: {' → '.join(results.tasks)}",
        "",
        f"Tasks in training order: {tasks}.",
        "Every number below is recomputed from the accuracy matrices in results.json"
        + (" (scores in %, differences in percentage points)." if scores_are_fractions(results) else "."),
        "",
    ]
    cells = [[r["strategy"] + (f" (baseline: {r['baseline']})" if r["baseline"] else ""),
              *(fmt(c, r.get(c.key), r) + (f" ({detail(c, r)})" if detail(c, r) else "") for c in cols)] for r in rows]
    lines += markdown_table(["strategy", *(header(c) for c in cols)], cells)
    lines += ["", "n/a: not defined for this strategy (a joint baseline has no per-task rows; one task has no old tasks).", ""]
    for s in results.strategies:
        lines += [f"## {s.name}: score on each task (columns) after each training step (rows)", "", matrix_markdown(results, s), ""]
    if results.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in results.notes] + [""]
    return "\n".join(lines)
