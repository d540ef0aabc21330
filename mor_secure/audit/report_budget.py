"""Section 3 of the reviewer's page: each silo's privacy ledger against its budget, and what it shows.

Per silo: its ledger drawn against its lifetime budget; the red warnings the
reviewer must read (its log failed verification, its model is not shown to be
private or is private per preference pair, it spent beyond its budget, its
budget changed while it served, its ledger went down in a way no ledger does);
and, only where none of those withholds it and the ledger stayed flat while it
served, the claim that its answers are post-processing of a DP-trained model.
The sentences are plain text; the page escapes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from matplotlib.lines import Line2D

from .report_html import esc, figure_span, html_table, red_paragraph, utc, when
from .report_plots import inline_svg, new_figure, plot_dates, plot_label, time_axis
from .report_view import BudgetPoint, ReportView, ServedModel, number_text

# matplotlib's tick maths overflows on an axis reaching the largest floats (1.7e308 fails, 1e307 draws): a ledger
# value beyond this is drawn at it (the table gives the number as logged).
_PLOT_MAX = 1e300


def _ledger(point: BudgetPoint) -> str:
    return f"ε {number_text(point.epsilon_spent)} and δ {point.delta_spent:.3g}"


def _budget(point: BudgetPoint) -> str:
    return f"ε {number_text(point.epsilon_budget)} and δ {point.delta_budget:.3g}"


@dataclass(frozen=True)
class LedgerFindings:
    """One silo's ledger as the page states it: red warnings above the plot (figure kind, sentence), the red
    statement of a change while it served (below the plot), and whether it stayed flat while the silo served."""

    warnings: tuple[tuple[str, str], ...]
    changed_while_serving: str | None
    flat_while_serving: bool


def ledger_findings(view: ReportView, silo: str, mine: list[BudgetPoint]) -> LedgerFindings:
    """What `silo`'s ledger points `mine` (oldest first) show."""
    steps = list(zip(mine, mine[1:]))
    warnings = []
    if falls := [(a, b) for a, b in steps if b.fell_unexplained(a)]:
        warnings.append(("budget-fall", _fall(silo, mine, falls)))
    if over := [b for b in mine if b.overspent]:
        warnings.append(("budget-overspent", _overspent(silo, over)))
    served = view.serving_since(silo)
    # A refusal is serving too: a change before the first admitted query is still a change while it served.
    serving = [(a, b) for a, b in steps if served is not None and b.time > served]
    if limits := [(a, b) for a, b in serving
                  if (a.epsilon_budget, a.delta_budget) != (b.epsilon_budget, b.delta_budget)]:
        warnings.append(("budget-limit-changed", _limit_changed(silo, served, limits)))
    spends = [(a, b) for a, b in serving if (a.epsilon_spent, a.delta_spent) != (b.epsilon_spent, b.delta_spent)]
    flat = (served is not None and not spends and not limits and not over
            and all(q.epsilon_spent == 0 for q in view.queries if q.silo == silo))
    return LedgerFindings(tuple(warnings), _rise(silo, served, spends) if spends else None, flat)


def _rise(silo: str, served: float, changed: list) -> str:
    """What a ledger that changed after the silo began serving did, and when."""
    before, after = changed[0][0], changed[-1][1]
    how = ("rose" if after.epsilon_spent > before.epsilon_spent else
           "went down" if after.epsilon_spent < before.epsilon_spent else "changed")
    return (f"{silo}'s ledger {how} from ε {number_text(before.epsilon_spent)} to {number_text(after.epsilon_spent)} "
            f"after it began serving ({utc(served)}): at {', '.join(utc(b.time) for _, b in changed)}. Scores of a "
            "DP-trained model spend no budget, so the ledger changed for something else while the silo served: a "
            "training (nothing else charges a ledger; a run is charged all it reserved until it settles for what "
            "it spent); its ledger's charges say what.")


def _fall(silo: str, mine: list[BudgetPoint], falls: list) -> str:
    """The warning for a ledger that went down in a way no ledger does (`BudgetPoint.fell_unexplained`)."""
    steps = "; ".join(f"at {utc(b.time)} from ε {number_text(a.epsilon_spent)} over {a.charges} charges "
                      f"({a.open_reservations} open) to ε {number_text(b.epsilon_spent)} over {b.charges} "
                      f"({b.open_reservations} open)" for a, b in falls)
    return (f"WARNING: {silo}'s ledger went down in a way a ledger cannot: {steps}. A ledger never loses a "
            "charge, and its spent total falls only when a run settles for less than it reserved, which closes "
            "one of its open reservations; that did not happen here. Charges were removed from the ledger or it "
            f"was replaced, so what it shows may be less than {silo} spent: the most this log shows it spent is "
            f"ε {number_text(max(b.epsilon_spent for b in mine))}.")


def _overspent(silo: str, over: list[BudgetPoint]) -> str:
    """The warning for a ledger that records more spent than its budget (`BudgetPoint.overspent`)."""
    worst = max(over, key=lambda b: (b.epsilon_spent - b.epsilon_budget, b.delta_spent - b.delta_budget))
    return (f"WARNING: {silo}'s ledger records more spent than its lifetime budget allows: from {utc(over[0].time)} "
            f"({len(over)} of its readings), at most {_ledger(worst)} spent of a budget of {_budget(worst)}. A "
            "ledger refuses any charge beyond its budget, so this one was overspent or its record altered: this page "
            f"makes no claim that {silo}'s answers are within a privacy budget.")


def _limit_changed(silo: str, served: float, changed: list) -> str:
    """The warning for a lifetime budget that changed while the silo served, each change with its time."""
    steps = "; ".join(f"at {utc(b.time)} from {_budget(a)} to {_budget(b)}" for a, b in changed)
    return (f"WARNING: {silo}'s lifetime budget changed after it began serving ({utc(served)}): {steps}. A "
            "ledger's budget is fixed when it is created, so the silo went on from another ledger (a new one starts "
            "with a fresh budget and nothing spent): ask the silo why, and what its earlier ledger had spent.")


def not_private(silo: str, models: list[ServedModel]) -> str:
    """The warning for a silo that served a model that is not differentially private (or has no report to show
    that it is: the page says only what holds for both), with what its log says of it."""
    whys = "; ".join(dict.fromkeys(m.why for m in models))
    starts = f"start at {utc(models[0].time)} says" if len(models) == 1 else (
        f"starts at {', '.join(utc(m.time) for m in models)} say")
    return (f"WARNING: the model {silo} served is not shown to be differentially private: its answers carry no DP "
            "guarantee and this page makes no privacy claim for them, whatever its ledger shows. Its serving "
            f"{starts}: {whys}")


def per_pair(silo: str, models: list[ServedModel]) -> str:
    """The warning for a silo whose private model's epsilon is per preference pair (`dp.privacy_unit: pair`)."""
    starts = ", ".join(utc(m.time) for m in models)
    return (f"WARNING: the model {silo} served (serving start at {starts}) was trained at its epsilon per "
            "preference pair, not per image or patient: an image or a patient with several pairs has no stated "
            "guarantee at that epsilon (group privacy for (ε, δ)-DP covers k pairs only at kε, with δ multiplied by "
            "1 + e^ε + ... + e^((k-1)ε)).")


def unverified(silo: str) -> str:
    """The warning for a silo whose own log failed verification."""
    return (f"WARNING: {silo}'s log FAILED verification, so nothing this page reads from it is vouched for: its "
            "ledger may not be what it recorded, and this page makes no privacy claim for its answers.")


def budget_section(page) -> str:
    """Section 3 of `page` (report._Page): each silo's ledger, its warnings, and the claim it may carry."""
    how = ("The differential-privacy budget each silo's ledger records as spent (solid line) against its "
           "lifetime limit (dashed line); the solid line must never cross the dashed one. Warned of in red, and "
           "given no privacy claim: a silo whose log failed verification, whose served model is not "
           "differentially private (as its serving start says), whose ledger records more spent than its budget, "
           "or whose budget changed while it served; warned of too: a ledger that went down in a way no ledger "
           "does (a charge gone, or a fall with no reservation settled). "
           "'ε per' is what the epsilon protects, as the served model's privacy report says: one image, one "
           "patient (all of a patient's rows), or one preference pair, which is warned of in red too.")
    pts = sorted(page.v.budgets, key=lambda b: b.time)
    warnings = [red_paragraph("unverified", silo, unverified(silo)) for silo in page.silos
                if silo in page.unverified]
    # Whatever its ledger shows: a silo without a ledger (DP off) may serve such a model too.
    warnings += [red_paragraph("model-not-private", silo, not_private(silo, unsafe)) for silo in page.silos
                 if (unsafe := [m for m in page.v.models_served(silo) if not m.private])]
    warnings += [red_paragraph("per-pair", silo, per_pair(silo, paired)) for silo in page.silos
                 if (paired := [m for m in page.v.models_served(silo) if m.private and m.unit == "pair"])]
    if not pts:
        return page.section("budget", how, "".join(warnings) + "<p>No privacy-ledger entries were recorded.</p>")
    silos = sorted({b.silo for b in pts})
    cols = min(3, len(silos))
    fig = new_figure(10, 3.2 * math.ceil(len(silos) / cols))
    rows, flat, rises = [], [], []
    for i, silo in enumerate(silos):
        mine = [b for b in pts if b.silo == silo]
        last = mine[-1]
        _ledger_plot(page, fig.add_subplot(math.ceil(len(silos) / cols), cols, i + 1), silo, mine)
        found = ledger_findings(page.v, silo, mine)
        warnings += [red_paragraph(kind, silo, text) for kind, text in found.warnings]
        if found.changed_while_serving:
            rises.append(red_paragraph("budget-rise", silo, found.changed_while_serving))
        flat += [silo] if found.flat_while_serving and silo not in page.unverified else []
        rows.append([page.silo_html(silo),
                     figure_span("epsilon-spent", silo, number_text(last.epsilon_spent),
                                 "bad" if last.overspent else ""),
                     figure_span("epsilon-budget", silo, number_text(last.epsilon_budget)),
                     figure_span("epsilon-unit", silo, _units(page.v, silo)),
                     f"{last.delta_spent:.3g}", f"{last.delta_budget:.3g}", when(last.time)])
    fig.legend(handles=[Line2D([], [], color="#555", lw=2, label="ε spent (in the silo's colour)"),
                        Line2D([], [], color="#b00020", ls="--", label="ε lifetime budget")],
               loc="outside lower center", ncols=2)
    body = "".join(warnings) + inline_svg(fig, "privacy budget spent against the limit per silo") + "".join(rises)
    # Post-processing only where every model the silo served was private, as its serving starts say.
    private = [s for s in flat if (models := page.v.models_served(s)) and all(m.private for m in models)]
    unstated = [s for s in flat if not page.v.models_served(s)]
    if private:
        body += (f"<p>For {esc(', '.join(private))}: scores of a DP-trained model are post-processing: "
                 "answering queries spends no budget. The spend was made once, when the model was trained.</p>")
    if unstated:
        body += (f"<p>For {esc(', '.join(unstated))}: the ledger did not change while serving, but the log does "
                 "not say whether the model served was differentially private (no serving start states it), "
                 "so this page does not call its answers post-processing of a DP-trained model.</p>")
    body += html_table(["silo", "ε spent", "ε budget", "ε per", "δ spent", "δ budget", "as of (UTC)"], rows,
                       {1, 2, 4, 5})
    return page.section("budget", how, body)


def _ledger_plot(page, ax, silo: str, mine: list) -> None:
    """`silo`'s ledger points on `ax`: spent (solid) against its budget (dashed), each as logged over time."""
    dates = plot_dates([b.time for b in mine])
    spent = [min(b.epsilon_spent, _PLOT_MAX) for b in mine]
    limits = [min(b.epsilon_budget, _PLOT_MAX) for b in mine]
    ax.step(dates, spent, where="post", linewidth=2, color=page.colour[silo],
            marker="o" if len(mine) <= 60 else None, markersize=3)
    if len(set(limits)) > 1:  # a budget that changed is drawn as logged, step by step
        ax.step(dates, limits, where="post", color="#b00020", linestyle="--")
    elif limits[0]:
        ax.axhline(limits[0], color="#b00020", linestyle="--")
    ax.set_ylim(0, min(max(spent + limits) * 1.15, _PLOT_MAX) or 1)
    ax.set_title(plot_label(page.silo_label(silo), 90))
    ax.set_ylabel("ε (epsilon)")
    time_axis(ax, maxticks=4)


def _units(view: ReportView, silo: str) -> str:
    """What one unit of the epsilon of the private models `silo` served is, as its serving starts say."""
    units = dict.fromkeys(m.unit or "not stated" for m in view.models_served(silo) if m.private)
    return ", ".join(units) or "no private model on record"
