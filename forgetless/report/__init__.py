"""The report of a continual or compare run: ``report.html``, ``results.csv`` and ``summary.md``.

(A plain ``forgetless train`` run directory, with ``summary.json`` and no ``results.json``, gets a
simpler one-run ``report.html``: see :mod:`forgetless.report.single`.)

Everything is rendered from ``RUN_DIR/results.json`` (and, for the loss curves, each run's
``metrics.jsonl``); the table's numbers are recomputed from the accuracy matrices with the pure
functions of :mod:`forgetless.eval.metrics`, so a report can always be regenerated and checked::

    from forgetless.report import write_report
    paths = write_report("runs/continual")   # {"html": ..., "csv": ..., "markdown": ...}
"""

from __future__ import annotations

import os
from pathlib import Path

from forgetless.files import REPORT_HTML, RESULTS_CSV, SUMMARY_MD
from forgetless.report import plots
from forgetless.report.html import report_html
from forgetless.report.results import load_results, read_loss_curve
from forgetless.report.single import is_single_run, write_single_run_report
from forgetless.report.tables import results_csv, summary_markdown, table_rows
from forgetless.report.tune import is_tune_dir, write_tune_report

__all__ = ["write_report"]


def write_report(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.html``, ``results.csv`` and ``summary.md`` into ``run_dir``; return their paths.

    Raises :class:`~forgetless.errors.UserError` when ``run_dir/results.json`` is missing or
    malformed. For a single training run (``summary.json``, no ``results.json``) only
    ``report.html`` is written; for ``forgetless tune``'s output (``tune.json``), ``tune.html``.
    """
    run_dir = Path(run_dir)
    if is_tune_dir(run_dir):  # forgetless tune's output: its front and trials
        return {"html": write_tune_report(run_dir)}
    if is_single_run(run_dir):
        return write_single_run_report(run_dir)
    results = load_results(run_dir)
    rows = table_rows(results)
    curves = {s.name: c for s in results.strategies if (c := read_loss_curve(results, s)) is not None}
    figures = {
        "tradeoff": plots.tradeoff(results, rows),
        "scores": plots.score_curves(results),
        "loss": plots.loss_curves(results, curves),
        "general": plots.general_curves(results),
    }
    heatmaps = {s.name: plots.heatmap(results, s) for s in results.strategies}
    paths = {"html": run_dir / REPORT_HTML, "csv": run_dir / RESULTS_CSV, "markdown": run_dir / SUMMARY_MD}
    paths["html"].write_text(report_html(results, rows, figures, heatmaps), encoding="utf-8")
    paths["csv"].write_text(results_csv(results, rows), encoding="utf-8")
    paths["markdown"].write_text(summary_markdown(results, rows), encoding="utf-8")
    return paths
