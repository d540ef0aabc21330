"""The report's plots: matplotlib figures in the page's style, rendered to inline SVG.

No pyplot (no global state, no GUI backend); `svg.fonttype: none` keeps
every label searchable text in the page; the SVG is stripped of its
metadata block (creator and date) and hidden from screen readers, which
read the figure's `aria-label` instead.
"""

from __future__ import annotations

import html
import io
import re
from datetime import datetime, timezone

import matplotlib.dates as mdates
from matplotlib.figure import Figure

from .report_view import LATEST_TIME, page_text

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#F0E442")
PLOT_STYLE = {"svg.fonttype": "none", "font.size": 11, "font.family": "DejaVu Sans",
              "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False}


def plot_label(text: str, limit: int = 60) -> str:
    """A log string safe as a matplotlib label: one line, short, no mathtext, nothing it cannot draw."""
    text = " ".join(page_text(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def inline_svg(fig, alt: str) -> str:
    """`fig` as an inline <figure> whose `alt` text says what it shows."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg[svg.index("<svg"):], flags=re.S)
    svg = svg.replace("<svg", '<svg aria-hidden="true"', 1)
    return f'<figure role="img" aria-label="{html.escape(alt, quote=True)}">{svg}</figure>'


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")  # no pyplot: no global state, no GUI backend


def time_axis(ax, maxticks: int = 9) -> None:
    locator = mdates.AutoDateLocator(tz=timezone.utc, minticks=3, maxticks=maxticks)
    offsets = ["", "%Y", "%Y-%m", "%Y-%m-%d", "%Y-%m-%d", "%Y-%m-%d %H:%M"]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=timezone.utc, offset_formats=offsets))
    ax.set_xlabel("time (UTC)", loc="left")  # the date offset sits at the right end of the axis
    # matplotlib draws dates of years 1..9999 only; the axis margin past a call late in year 9999 would leave them.
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, min(hi, float(plot_dates([LATEST_TIME])[0])))


def plot_dates(times):
    """UNIX times as matplotlib dates; a bucket's midpoint past the calendar's last second is drawn at it."""
    return mdates.date2num([datetime.fromtimestamp(min(t, LATEST_TIME), timezone.utc) for t in times])
