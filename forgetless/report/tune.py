"""The report of ``forgetless tune``: ``OUTPUT/tune.html``, from ``OUTPUT/tune.json``.

The front of learned vs kept over the trials (a plot and a table of every trial: its strategy and
strengths, both objectives, whether it kept the budget, its steps, a link to its run's report),
the chosen trial and the config written for it (``best.yaml``). A finished trial without a
``report.html`` of its own gets one, so that its row links to it.
"""

from __future__ import annotations

import json
from pathlib import Path

from forgetless.errors import UserError
from forgetless.files import BEST_FILE, TUNE_FILE, TUNE_HTML
from forgetless.report import plots
from forgetless.report.html import config_block, esc, figure, page, table
from forgetless.report.single import is_single_run, write_single_run_report

CSS = """
tr.front td:first-child { font-weight: 700; } tr.chosen { background: #fff4d6; } td.over { color: #cf222e; font-weight: 600; }
"""


def is_tune_dir(out: Path) -> bool:
    return (Path(out) / TUNE_FILE).is_file()


def _number(v, fmt: str = "{:.3f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "–"


def write_tune_report(out: Path) -> Path:
    """Write ``out/tune.html`` from ``out/tune.json``; return its path."""
    out = Path(out)
    path = out / TUNE_FILE
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: missing or not valid JSON; run forgetless tune (or --resume it) to write it again") from None
    trials = result.get("trials") or []
    front, chosen = set(result.get("front") or []), result.get("chosen")
    limits = result.get("limits") or {}
    done = [t for t in trials if "learned" in t]
    facts = [f"{len(done)} finished trials of {len(trials)}", f"{result.get('training_steps', 0):,} training steps in all",
             "strategies: " + ", ".join(result.get("strategies") or [])]
    facts.append("budget: " + (", ".join(f"{n} max_drop {v:g}" for n, v in limits.items()) if limits else "none (the front of learned + kept)"))
    rows = []
    for t in trials:
        number = t.get("number")
        classes = " ".join(c for c, on in (("front", number in front), ("chosen", number == chosen)) if on)
        run_dir = t.get("run_dir")
        link = ""
        if run_dir and "learned" in t and not (Path(run_dir) / "report.html").is_file() and is_single_run(Path(run_dir)):
            write_single_run_report(Path(run_dir))  # each finished trial's own report, to link to
        if run_dir:
            rel = Path(run_dir)
            try:
                rel = rel.relative_to(out)
            except ValueError:
                pass
            link = f'<a href="{esc(str(rel))}/report.html">{esc(rel.name)}</a>' if (Path(run_dir) / "report.html").is_file() else esc(rel.name)
        feasible = t.get("feasible")
        excess = t.get("budget_excess")
        over = ' class="over"' if feasible is False else ""
        inside = "–" if feasible is None else ("yes" if feasible else "no")
        if feasible is False and isinstance(excess, (int, float)):
            inside += f" (+{excess:.3f})"
        rows.append(
            f'<tr class="{classes}"><td>{number}{" ★" if number == chosen else ""}</td><td>{esc(t.get("label", ""))}</td>'
            f'<td>{esc(t.get("state", ""))}</td><td>{_number(t.get("learned"))}</td><td>{_number(t.get("kept"))}</td>'
            f'<td{over}>{inside}</td>'
            f'<td>{"yes" if number in front else ""}</td><td>{_number(t.get("steps"), "{:,}")}</td><td>{link}</td></tr>')
    sections = [
        f"<h1>forgetless tune: {esc(out.name)}</h1>",
        f'<p class="muted small">{esc(" · ".join(facts))}</p>',
        "<h2>The front of learned vs kept</h2>",
        figure(plots.tune_front(result), "Every finished trial: learned = the new-task sets' mean score after training, kept = the "
                                         "mean share of each keep set's starting score still there. Ringed: the Pareto front of "
                                         "the trials inside the budget; starred: the chosen one."),
        "<h2>Trials</h2>",
        table("<th>trial</th><th>strategy and strengths</th><th>state</th><th>learned</th><th>kept</th><th>inside the budget</th>"
              "<th>on the front</th><th>steps</th><th>run</th>", rows),
    ]
    best = out / BEST_FILE
    if chosen is not None and best.is_file():
        label = next((t.get("label", "") for t in trials if t.get("number") == chosen), "")
        sections += [f"<h2>Chosen: trial {chosen}</h2>",
                     f'<p class="small muted">{esc(label)}: the front\'s trial that learned the most inside the budget. '
                     f"<code>forgetless train best.yaml</code> trains it again.</p>",
                     config_block(best.read_text(encoding="utf-8"), BEST_FILE, unfolded=True)]
    elif not done:
        sections.append('<p class="muted">No trial has finished yet.</p>')
    html = out / TUNE_HTML
    html.write_text(page(f"forgetless tune: {out.name}", sections, CSS), encoding="utf-8")
    return html
