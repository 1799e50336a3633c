"""The report's tables in the terminal (rich, on the progress console): what a comparison prints
when it finishes."""

from __future__ import annotations

from typing import Optional

from rich.table import Table

from forgetless.progress import console
from forgetless.report.tables import short_count


def print_table(header: list[str], rows: list[list[str]], title: str, caption: Optional[str] = None, no_wrap: bool = False) -> None:
    """One table, title above and caption below, both left-aligned."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for label in header:
        table.add_column(label, no_wrap=no_wrap)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_sequence_table(results: dict) -> None:
    """The comparison table of a task sequence (rows: strategies), from its results.json."""
    num = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
    general = results["general"]
    rows = []
    for name, s in results["strategies"].items():
        m = s["summary"]
        rows.append([
            name + ("*" if s.get("baseline") else ""),
            num(m["final_average"]), num(m["average_incremental"]), num(m["bwt"], "{:+.3f}"), num(m["fwt"], "{:+.3f}"),
            num(m["forgetting"]), *(num(m["general_retention"].get(g), "{:+.1f}") for g in general),
            num(s["time_s"], "{:.0f}"), "-" if s["trainable_params"] is None else short_count(s["trainable_params"]),
            num(s["peak_memory_mb"], "{:.0f}"),
        ])
    print_table(
        ["strategy", "final", "incr", "BWT", "FWT", "forget", *(f"gen {g}" for g in general), "train s", "params", "peak MB"], rows,
        title=f"task sequence: {' -> '.join(results['tasks'])}",
        caption="final/incr: mean headline score of all tasks at the end / over tasks seen so far; BWT < 0 and "
        "forget > 0: forgotten; " + ("gen: perplexity change on each data.keep probe (negative = worse); " if general else "")
        + "* baseline",
        no_wrap=True,
    )
