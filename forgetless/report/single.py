"""The report of one ``forgetless train`` run (a run directory with ``summary.json`` and no
``results.json``): ``report.html`` with the before/after table of every scored set, the training
loss and the scores over the run, and the resolved config. The run's own ``summary.md`` is left
as it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from forgetless.errors import UserError
from forgetless.files import CONFIG_FILE, FLIPS_FILE, METRICS_FILE, REPORT_HTML, RESULTS_FILE, SUMMARY_FILE
from forgetless.report import plots
from forgetless.report.html import config_block, esc, figure, notes_section, page, table
from forgetless.report.results import read_run_log
from forgetless.report.tables import short_count

# (key in a set's scores, label, higher is better)
SET_METRICS = (
    ("exact_match", "exact match", True),
    ("contains", "contains", True),
    ("mc_accuracy", "multiple choice acc", True),
    ("token_accuracy", "token accuracy", True),
    ("loss", "loss", False),
    ("perplexity", "perplexity", False),
)
EXTRA_CSS = """
table.cmp td.good .sub { color: #1a7f37; font-weight: 600; } table.cmp td.bad .sub { color: #cf222e; font-weight: 600; }
table.cmp td:nth-child(2), table.cmp th:nth-child(2) { text-align: left; }
td.over { color: #cf222e; font-weight: 600; }
"""


def is_single_run(run_dir: Path) -> bool:
    return (run_dir / SUMMARY_FILE).is_file() and not (run_dir / RESULTS_FILE).exists()


def _cell(before: Optional[float], after: Optional[float], higher: bool) -> str:
    if after is None:
        return "<td>n/a</td>"
    if before is None:
        return f"<td>{after:.4g}</td>"
    change = after - before
    verdict = "" if change == 0 else (" class=good" if (change > 0) == higher else " class=bad")
    return f'<td{verdict}>{before:.4g} → {after:.4g}<span class="sub">{change:+.4g}</span></td>'


def _table(before: dict, after: dict, roles: dict[str, str]) -> str:
    shown = [m for m in SET_METRICS if any(m[0] in (after.get(s) or {}) for s in roles)]
    head = "<th>set</th><th>role</th>" + "".join(
        f'<th>{esc(label)}<span class="dir">{"higher" if higher else "lower"} is better</span></th>' for _, label, higher in shown)
    body = [f"<tr><td>{esc(name)}</td><td>{'learn' if role == 'new' else 'keep'}</td>"
            + "".join(_cell((before.get(name) or {}).get(k), (after.get(name) or {}).get(k), higher) for k, _, higher in shown) + "</tr>"
            for name, role in roles.items()]
    return table(head, body)


def _training(train: dict) -> str:
    parts = []
    if "steps" in train:
        parts.append(f"{train['steps']:,} steps")
    if "tokens" in train:
        parts.append(f"{train['tokens']:,} tokens")
    if "train_time_s" in train:
        parts.append(f"{train['train_time_s']:,.1f} s")
    if "final_loss" in train:
        parts.append(f"final loss {train['final_loss']:.4f}")
    if train.get("trainable_params") is not None:
        total = train.get("total_params")
        parts.append(f"{short_count(train['trainable_params'])} trainable params" + (f" of {short_count(total)}" if total else ""))
    methods = ", ".join(train.get("methods") or {})
    if methods:
        parts.append(f"methods: {methods}")
    return " · ".join(parts)


def _budget_text(budget: dict) -> str:
    if not budget.get("limits"):
        return f"{budget.get('checks', 0)} checks of the signal, no budget set."
    limits = ", ".join(f"{n} <= {v:g}" for n, v in budget["limits"].items())
    parts = [f"limits: {limits}", f"{budget.get('checks', 0)} checks"]
    if budget.get("controlled"):
        parts.append(f"strength of {', '.join(budget['controlled'])} changed {budget.get('changes', 0)} times, "
                     f"x{budget.get('strength', 1):.3g} at the end")
    if budget.get("stopped_at") is not None:
        parts.append(f"stopped early at step {budget['stopped_at']}")
    end = budget.get("end")
    if end:
        parts.append("inside the budget at the end of training" if end.get("inside") else "over the budget at the end of training")
    if budget.get("restored_step") is not None:
        parts.append(f"so the weights of step {budget['restored_step']} (the last check inside it) were restored; the final scores are theirs")
    return "; ".join(parts) + "."


def _decisions_section(log) -> list[str]:
    """Every check of the forgetting budget: what it measured, and what the controller did."""
    checks = [(s, r) for s, r in sorted(log.budgets.items()) if "action" in r]
    if log.budget_end is not None:
        checks.append((log.last_step, log.budget_end))
    if not checks:
        return []
    names = sorted({n for _, r in checks for n in (r.get("drop") or {})})
    head = "<th>step</th><th>online KL</th>" + "".join(f"<th>drop: {esc(n)}</th>" for n in names) + \
        "<th>inside</th><th>action</th><th>strength after</th>"
    rows = []
    for step, r in checks:
        drops = r.get("drop") or {}
        cells = [f"{r['kl']:.4g}" if isinstance(r.get("kl"), (int, float)) else "–"]
        cells += [f"{drops[n]:+.3f}" if isinstance(drops.get(n), (int, float)) else "–" for n in names]
        action = str(r.get("action", ""))
        where = "whole sets, at the end" if action == "end" or action.startswith("restored") else ""
        cls = ' class="over"' if not r.get("inside", True) else ""
        rows.append(f"<tr><td>{step}</td>" + "".join(f"<td>{c}</td>" for c in cells) +
                    f"<td{cls}>{'yes' if r.get('inside') else 'no'}</td><td>{esc(action)}{' (' + where + ')' if where else ''}</td>"
                    f"<td>x{r.get('strength', 1):.3g}</td></tr>")
    return ["<h3>The controller's decisions</h3>",
            '<p class="small muted">Each check: the online KL, each keep sample\'s drop from its starting score, whether the run '
            "was inside its budget, and what the controller did to the protection's strength (dotted lines on the loss curve). "
            "The last row scores the limited keep sets whole.</p>",
            table(head, rows)]


def _flips_section(flips: dict, shown: int = 10) -> list[str]:
    """Per set: how many answers flipped each way, and the first lost ones."""
    rows = [f"<tr><td>{esc(n)}</td><td>{esc(f.get('role', ''))}</td><td>{f.get('judged')}</td><td>{f.get('right_before')}</td>"
            f"<td>{f.get('right_after')}</td><td>{len(f.get('lost') or [])}</td><td>{len(f.get('gained') or [])}</td></tr>"
            for n, f in flips.items()]
    out = ["<h2>Flipped answers</h2>",
           '<p class="small muted">Per example: right before training and wrong after (lost), or the reverse (gained); '
           "every one is in <code>flips.json</code>.</p>",
           table("<th>set</th><th>role</th><th>judged</th><th>right before</th><th>right after</th><th>lost</th><th>gained</th>", rows)]
    for name, f in flips.items():
        lost = ((f.get("examples") or {}).get("lost") or [])[:shown]
        if lost:
            body = [f"<tr><td>{esc(r.get('prompt'))}</td><td>{esc(r.get('reference'))}</td><td>{esc(r.get('before'))}</td>"
                    f"<td>{esc(r.get('after'))}</td></tr>" for r in lost]
            out += [f"<h3>{esc(name)}: lost answers (first {len(lost)})</h3>",
                    table("<th>prompt</th><th>reference</th><th>before</th><th>after</th>", body)]
    return out


def write_single_run_report(run_dir: Path) -> dict[str, Path]:
    """Write ``run_dir/report.html`` for a single training run; return its path."""
    path = run_dir / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: not valid JSON; the run did not finish cleanly, train it again") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path}: expected a JSON object; the run did not finish cleanly, train it again")
    before, after = summary.get("before") or {}, summary.get("after") or {}
    roles = {row["set"]: row.get("role", "keep") for row in summary.get("sets") or [] if isinstance(row, dict) and "set" in row}
    notes: list[str] = []
    log = read_run_log(run_dir / METRICS_FILE, METRICS_FILE, notes) if (run_dir / METRICS_FILE).is_file() else None
    curves = plots.run_curves(log, roles) if log else None
    config = run_dir / CONFIG_FILE
    sections = [
        f"<h1>Run report: {esc(run_dir.name)}</h1>",
        f'<p class="muted small">{esc(_training(summary.get("train") or {}))}</p>',
        "<h2>What it learned and what it kept</h2>",
        '<p class="small muted">Every set scored before the first step and after the last; learn = data.eval, '
        "keep = data.keep. Green: better after training, red: worse.</p>",
        _table(before, after, roles),
    ]
    if curves is not None:
        sections += ["<h2>Over the run</h2>", figure(curves, "Training loss per step, and each set's score at every evaluation "
                                                    "(solid: sets to learn, dashed: sets to keep).")]
    budget = (summary.get("train") or {}).get("budget")
    budget_plot = plots.budget_curves(log, (budget or {}).get("limits") or {}) if log else None
    if budget_plot is not None:
        sections += ["<h2>Forgetting budget</h2>", f'<p class="small muted">{esc(_budget_text(budget or {}))}</p>',
                     figure(budget_plot, "At every check: the KL from the starting model on a fixed task sample, each keep "
                                         "sample's drop from its starting score, and the strength the controller set.")]
        sections += _decisions_section(log)
    if (run_dir / FLIPS_FILE).is_file():
        sections += _flips_section(json.loads((run_dir / FLIPS_FILE).read_text(encoding="utf-8")))
    if config.is_file():
        sections += ["<h2>Configuration</h2>", config_block(config.read_text(encoding="utf-8"), CONFIG_FILE, unfolded=True)]
    sections += notes_section(notes)
    sections.append("<footer>Generated by <code>forgetless report</code> from <code>summary.json</code> and <code>metrics.jsonl</code>. "
                    "A task sequence (<code>forgetless continual</code> / <code>compare</code>) gets the full comparison report.</footer>")
    out = run_dir / REPORT_HTML
    out.write_text(page(f"Run report: {run_dir.name}", sections, EXTRA_CSS), encoding="utf-8")
    return {"html": out}
