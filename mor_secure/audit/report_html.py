"""The HTML pieces the reviewer's page is built of: escaped text, times, figures, tables, lists.

Everything from the logs goes through `esc` (HTML-escaped, and a lone
surrogate a log may hold written as its escape, so the page can be encoded);
`figure_span` gives a key number a `data-figure="kind:name"` attribute, so
tests and tools read it without scraping prose.
"""

from __future__ import annotations

import html

from .report_view import page_text, utc_text

MAX_ROWS = 500  # long tables are cut here (with a sentence saying so) to keep the page small
FAILED_LOG = "(log FAILED verification)"  # beside a silo's figures read from its own log that failed verification


def esc(value: object) -> str:
    return html.escape(page_text(value), quote=True)


def utc(t: float) -> str:
    return utc_text(t, iso=True)


def when(t: float) -> str:
    return f'<span class="nw">{esc(utc(t))}</span>'


def figure_span(kind: str, name: str, text: object, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<span data-figure="{esc(kind)}:{esc(name)}"{c}>{esc(text)}</span>'


def red_paragraph(kind: str, name: str, text: str) -> str:
    """A warning: its own paragraph, in red, readable as figure `kind:name`."""
    return f"<p>{figure_span(kind, name, text, 'bad')}</p>"


def html_table(head: list[str], rows: list[list[str]], numeric: set[int] = frozenset(),
               limit: int | None = MAX_ROWS) -> str:
    """Cells in `rows` are already HTML; header text is escaped here. Rows past `limit` are left out, saying so."""
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows[:limit]:
        out.append("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    if limit is not None and len(rows) > limit:
        out.append(f'<p class="muted">Showing the first {limit} of {len(rows)} rows.</p>')
    return "".join(out)


def listed(items) -> str:
    inner = "".join(f"<li>{esc(p)}</li>" for p in items)
    return f'<ul class="problems">{inner}</ul>' if items else '<span class="muted">none</span>'
