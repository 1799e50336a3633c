"""report.html: self-contained, complete, and built from the same numbers as the table."""

from __future__ import annotations

import base64
import re

import pytest


@pytest.fixture(scope="module")
def page(written_report) -> str:
    return written_report["html"].read_text(encoding="utf-8")


def test_written_files(written_report):
    assert set(written_report) == {"html", "csv", "markdown"}
    assert [p.name for p in written_report.values()] == ["report.html", "results.csv", "summary.md"]
    assert all(p.stat().st_size > 0 for p in written_report.values())


def test_nothing_is_fetched_from_elsewhere(page):
    assert not re.search(r"https?://", page, re.IGNORECASE)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page and "url(" not in page
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_every_figure_is_a_real_png(page):
    sources = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    # trade-off, task scores, loss, general probe, and one heatmap per strategy
    assert len(sources) == 4 + 5
    for s in sources:
        data = base64.b64decode(s, validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_table_highlights_the_best_value_per_column(page):
    table = page[page.index('<table class="cmp">'):page.index("</table>")]
    assert "<td class=best>91.0%</td>" in table  # joint's final average
    assert "<td class=best>-11.0 pts</td>" in table  # replay's BWT
    assert table.count("<tr") == 1 + 5
    assert "lower is better" in table and "higher is better" in table


def test_sections_configs_and_formulas(page):
    for heading in ("Comparison", "Old tasks vs new task", "Each task's score through the sequence", "Training loss",
                    "General ability", "Per strategy", "How to read this report"):
        assert heading in page
    assert page.count('<details class="cfg">') == 5
    assert "ewc:\n    weight: 100.0\n    online: true" in page  # the strategy's config as YAML
    assert "R[T][k] &minus; R[k][k]" in page  # the BWT formula
    assert "Chaudhry" in page
