"""``report.html``: one self-contained page (inline CSS and PNG figures; no scripts, fonts or
links to fetch), readable offline and printable.

The page's parts (:func:`page`, :func:`table`, :func:`figure`, :func:`config_block`,
:func:`notes_section`) are shared by every report forgetless writes: a task sequence's
(:func:`report_html`), a single run's (:mod:`forgetless.report.single`) and the demo's."""

from __future__ import annotations

import html
from typing import Optional

import yaml

from forgetless.report.plots import Plot, colours
from forgetless.report.results import Results, Strategy
from forgetless.report.tables import best_rows, columns, detail, direction, formatter, scores_are_fractions, short_count

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d8dee4; --soft: #f6f8fa; --best: #dafbe1; --accent: #0969da; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); margin: 0; background: #fff; }
main { max-width: 1220px; margin: 0 auto; padding: 28px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 19px; margin: 36px 0 6px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 0 0 6px; }
p { margin: 6px 0; } .muted { color: var(--muted); } .small { font-size: 13px; }
.tasks { margin: 10px 0 4px; display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
.chip { background: var(--soft); border: 1px solid var(--line); border-radius: 999px; padding: 2px 10px; font-size: 13px; }
.arrow { color: var(--muted); }
.howto { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; margin-top: 18px; font-size: 13.5px; }
.howto summary { cursor: pointer; font-weight: 600; }
.howto ul { margin: 8px 0; padding-left: 20px; } .howto li { margin: 2px 0; }
code, .f { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.scroll { overflow-x: auto; }
table.cmp { border-collapse: collapse; margin: 10px 0; font-size: 13.5px; font-variant-numeric: tabular-nums; width: 100%; }
table.cmp th, table.cmp td { padding: 6px 9px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
table.cmp th { background: var(--soft); font-weight: 600; vertical-align: bottom; white-space: normal; line-height: 1.25; }
table.cmp td .sub { display: block; font-size: 11px; font-weight: 400; color: var(--muted); }
table.cmp th .dir { display: block; font-weight: 400; font-size: 11.5px; color: var(--muted); }
table.cmp td:first-child, table.cmp th:first-child { text-align: left; }
table.cmp td.best { background: var(--best); font-weight: 700; }
table.cmp tr.baseline td { color: var(--muted); }
table.cmp tr.baseline td.best { color: var(--ink); }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 7px; vertical-align: 0; }
.tag { font-size: 11px; border: 1px solid var(--line); border-radius: 4px; padding: 0 5px; margin-left: 6px; color: var(--muted); }
figure { margin: 12px 0; } figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 4px; max-width: 900px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 16px; margin-top: 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card img { max-width: 100%; height: auto; }
.facts { font-size: 12.5px; color: var(--muted); margin: 4px 0 6px; }
details.cfg summary { cursor: pointer; font-size: 13px; color: var(--accent); }
details.cfg pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; font-size: 11.5px;
                  max-height: 420px; overflow: auto; }
.notes li { font-size: 13px; color: #9a6700; }
footer { margin-top: 40px; font-size: 12.5px; color: var(--muted); border-top: 1px solid var(--line); padding-top: 10px; }
@media print { main { padding: 0; } .cards { display: block; } .card { break-inside: avoid; margin-bottom: 12px; } }
"""

HOW_TO_READ = """
<details class="howto" open><summary>How to read this report</summary>
<p><span class="f">R[t][k]</span> is the score on task <i>k</i> after training on tasks 1..<i>t</i> in order
(row <span class="f">t = 0</span>: before any training); <i>T</i> tasks in all. Means are unweighted over tasks.</p>
<ul>
<li><b>final average</b> <span class="f">= mean<sub>k</sub> R[T][k]</span>: where the model ends up on every task.</li>
<li><b>avg incremental</b> <span class="f">= mean<sub>t</sub> mean<sub>k&le;t</sub> R[t][k]</span>: the average over the sequence of the score on the tasks seen so far.</li>
<li><b>BWT</b> (backward transfer) <span class="f">= mean<sub>k&lt;T</sub> (R[T][k] &minus; R[k][k])</span>: negative = old tasks forgotten, the closer to 0 (or above) the better.</li>
<li><b>FWT</b> (forward transfer) <span class="f">= mean<sub>k&ge;2</sub> (R[k&minus;1][k] &minus; R[0][k])</span>: how much earlier tasks helped a task before it was trained.</li>
<li><b>forgetting</b> <span class="f">= mean<sub>k&lt;T</sub> (max<sub>t&lt;T</sub> R[t][k] &minus; R[T][k])</span> (Chaudhry et al. 2018): the drop from each old task's best score.</li>
<li><b>plasticity</b> <span class="f">= mean<sub>k</sub> R[k][k]</span>: how well each new task is learned right after training it.</li>
<li><b>general retention</b> <span class="f">= perplexity<sub>before</sub> &minus; perplexity<sub>after</sub></span> on a general text probe: negative = general ability lost.</li>
</ul>
<p>For a task whose metric is lower-is-better (loss, perplexity) the differences are sign-flipped, so BWT &lt; 0 always means
forgetting. A joint baseline trains on all tasks at once: it has no per-task rows, so only its final average is defined (n/a).
In the table the best value of each column is highlighted.</p>
</details>
"""


def esc(text: object) -> str:
    """``text`` as HTML-safe text."""
    return html.escape(str(text))


def figure(plot: Optional[Plot], caption: str) -> str:
    """A figure with its caption (HTML); nothing for a plot that was not drawn."""
    if plot is None:
        return ""
    return (f'<figure><img src="{plot.uri}" width="{plot.width_px}" alt="{esc(plot.alt)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def table(head: str, rows: list[str]) -> str:
    """A table in the report's style: ``head`` the header cells, ``rows`` each a ``<tr>`` (HTML)."""
    return f'<div class="scroll"><table class="cmp"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def config_block(text: str, summary: str, unfolded: bool = False) -> str:
    """A block of YAML (or any preformatted text), folded unless ``unfolded``."""
    return f'<details class="cfg"{" open" if unfolded else ""}><summary>{esc(summary)}</summary><pre>{esc(text)}</pre></details>'


def notes_section(notes: list[str]) -> list[str]:
    """The "Notes" section (what was skipped or left out while reading), or nothing."""
    if not notes:
        return []
    return ["<h2>Notes</h2>", '<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"]


def page(title: str, sections: list[str], extra_css: str = "") -> str:
    """The whole page: the report's style (plus ``extra_css``) and the sections in order."""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{CSS}{extra_css}</style></head><body><main>\n" + "\n".join(sections) + "\n</main></body></html>\n")


def comparison_table(results: Results, rows: list[dict]) -> str:
    cols = columns(results)
    fmt = formatter(results)
    style = colours(results)
    best = {c.key: best_rows(rows, c) for c in cols}
    head = "<th>strategy</th>" + "".join(
        f'<th title="{esc(c.help)}">{esc(c.label)}<span class="dir">{esc(direction(c))}</span></th>' for c in cols)
    body = []
    for i, r in enumerate(rows):
        colour = style[r["strategy"]][0]
        name = f'<span class="swatch" style="background:{colour}"></span>{esc(r["strategy"])}'
        if r["baseline"]:
            name += f'<span class="tag">baseline: {esc(r["baseline"])}</span>'
        cells = "".join(_cell(fmt(c, r.get(c.key), r), detail(c, r), i in best[c.key]) for c in cols)
        body.append(f'<tr class="{"baseline" if r["baseline"] else ""}"><td>{name}</td>{cells}</tr>')
    return table(head, body)


def _cell(text: str, sub: str, best: bool) -> str:
    sub = f'<span class="sub">{esc(sub)}</span>' if sub else ""
    return f'<td{" class=best" if best else ""}>{esc(text)}{sub}</td>'


def _facts(s: Strategy) -> str:
    parts = []
    if s.time_s is not None:
        parts.append(f"{s.time_s:,.1f} s")
    if s.trainable_params is not None:
        share = f" of {short_count(s.total_params)} ({100 * s.trainable_params / s.total_params:.3g}%)" if s.total_params else ""
        parts.append(f"{short_count(s.trainable_params)} trainable params{share}")
    if s.peak_memory_mb is not None:
        parts.append(f"peak memory {s.peak_memory_mb:,.0f} MB")
    return " · ".join(parts)


def strategy_card(results: Results, s: Strategy, heat: Plot) -> str:
    runs = ", ".join(f"<code>{esc(r)}</code>" for r in s.runs) or "none recorded"
    config = ""
    if s.config is not None:
        config = config_block(yaml.safe_dump(s.config, sort_keys=False, allow_unicode=True), "configuration (YAML)")
    tag = f'<span class="tag">baseline: {esc(s.baseline)}</span>' if s.baseline else ""
    notes = "".join(f'<div class="facts">{esc(task)}: {esc(why)}</div>' for task, why in s.notes.items())
    return (f'<div class="card" id="strategy-{esc(s.name)}"><h3>{esc(s.name)}{tag}</h3><div class="facts">{esc(_facts(s))}</div>'
            f'<img src="{heat.uri}" width="{heat.width_px}" alt="{esc(heat.alt)}">{notes}'
            f'<div class="facts">runs: {runs}</div>{config}</div>')


def report_html(results: Results, rows: list[dict], plots: dict[str, Optional[Plot]], heatmaps: dict[str, Plot]) -> str:
    chips = '<span class="arrow">→</span>'.join(
        f'<span class="chip">{i}. {esc(t)} <span class="muted">· {esc(results.metrics[t])}</span></span>' for i, t in enumerate(results.tasks, 1))
    title = {"continual": "Continual fine-tuning report", "compare": "Strategy comparison report"}[results.kind]
    unit = "Scores are shown in %, differences in percentage points (pts). " if scores_are_fractions(results) else ""
    meta = " · ".join(x for x in (f"{len(results.strategies)} strategies", results.created and f"created {results.created}",
                                  results.version and f"forgetless {results.version}") if x)
    sections = [
        f"<h1>{title}</h1>",
        f'<p class="muted small">{esc(meta)}</p>',
        f'<div class="tasks"><span class="muted small">tasks in training order:</span>{chips}</div>',
        HOW_TO_READ,
        "<h2>Comparison</h2>",
        f'<p class="small muted">{unit}Recomputed from the accuracy matrices in <code>results.json</code>; '
        "also in <code>results.csv</code> and <code>summary.md</code>. Hover a header for its definition.</p>",
        comparison_table(results, rows),
    ]
    if plots.get("tradeoff") is not None:
        sections += ["<h2>Old tasks vs new task</h2>", figure(plots["tradeoff"],
                     "One point per strategy: right = old tasks retained (BWT), up = new tasks learned (plasticity). "
                     "Ringed and joined: the Pareto front, where no other strategy is better on both. "
                     "Hollow markers are baselines.")]
    else:
        sections += ["<h2>Old tasks vs new task</h2>", '<p class="muted small">Not shown: the trade-off needs BWT and plasticity, '
                     "i.e. at least two tasks trained in sequence, all scored with metrics of one direction.</p>"]
    sections += ["<h2>Each task's score through the sequence</h2>", figure(plots.get("scores"),
                 "Column <i>k</i> of each matrix: the score on one task before training and after each task. "
                 "Shaded: the step that trains that task.")]
    if plots.get("loss") is not None:
        sections += ["<h2>Training loss</h2>", figure(plots["loss"],
                     "The loss logged in each run's <code>metrics.jsonl</code>, steps counted across the whole sequence; "
                     "dashed lines mark where the next task starts.")]
    if plots.get("general") is not None:
        sections += ["<h2>General ability</h2>", figure(plots["general"],
                     "Perplexity on general text after each training step: rising = general ability lost.")]
    sections += ["<h2>Per strategy</h2>", '<p class="small muted">Accuracy matrices: rows = after each task, columns = the tasks; '
                 "the outlined cell is each task right after it was trained. One colour scale per column, dark = better.</p>",
                 '<div class="cards">' + "".join(strategy_card(results, s, heatmaps[s.name]) for s in results.strategies) + "</div>"]
    sections += notes_section(results.notes)
    sections.append(f"<footer>Generated by <code>forgetless report</code> from <code>{esc(results.path.name)}</code>. "
                    "Regenerate with <code>forgetless report RUN_DIR</code>.</footer>")
    return page(f"{title}: {' → '.join(results.tasks)}", sections)
