"""The compliance reviewer's page: one self-contained HTML file from a `ReportView`.

Why one file, and why like this: the reviewer opens it offline, on a locked-down
machine, perhaps years later, and may forward it as evidence. So it loads
nothing (no network, no external CSS, JS, fonts or images; a Content-Security-
Policy says so), needs no JavaScript, and its plots are inline SVG drawn by
matplotlib with `svg.fonttype: none`, so labels stay searchable text. It leads
with one verdict ("Is the record intact?"), and every section opens with one
sentence saying what it shows and how to read it, for a reader who has never
seen the code. Everything from the logs (reasons, policies, party names) is
HTML-escaped, and times are UTC. Key numbers carry `data-figure="kind:name"`
attributes so tests and tools can read them without scraping prose.
"""

from __future__ import annotations

import html
import math
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib
from matplotlib.lines import Line2D

from .report_plots import PALETTE, PLOT_STYLE, inline_svg, new_figure, plot_dates, plot_label, time_axis
from .report_view import BudgetPoint, ReportView, ServedModel, plural, silo_name, utc_text

# Bucket widths for the queries-over-time plot (seconds); the first giving at most ~30 buckets wins, and beyond a
# week a whole number of weeks does, so a log spanning centuries still plots ~30 buckets (not one per week).
_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400, 604800)
_MAX_BUCKETS = 30
# matplotlib's tick maths overflows on an axis reaching the largest floats (1.7e308 fails, 1e307 draws): a ledger
# value beyond this is drawn at it (the table gives the number as logged).
_PLOT_MAX = 1e300
_MAX_ROWS = 500  # long tables are cut here (with a sentence saying so) to keep the page small

# Section id -> (heading, name in the page's contents line).
SECTIONS = {"summary": ("Is the record intact?", "Verdict"), "queries": ("1. Queries per silo over time", "Queries"),
            "refusals": ("2. Refusals by reason", "Refusals"),
            "budget": ("3. Privacy budget spent against the limit", "Privacy budget"),
            "router": ("4. Router weight per silo and question kind", "Router"),
            "rounds": ("5. Scoring rounds", "Rounds"), "checks": ("6. Verification and reconciliation", "Checks"),
            "roots": ("7. Signed roots", "Roots"), "policies": ("8. Policy in force per silo", "Policies"),
            "glossary": ("Glossary", "Glossary")}
CSS = """
body{font:16px/1.45 "DejaVu Sans","Liberation Sans",sans-serif;color:#1a1a1a;max-width:1180px;margin:0 auto;
padding:1em 2em}h1{font-size:1.7em;margin-bottom:.2em}
h2{margin-top:2em;border-bottom:2px solid #ddd;padding-bottom:.2em}
p.how{color:#333;background:#f4f6f8;border-left:4px solid #8aa;padding:.4em .8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.95em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eef1f4}td:first-child{white-space:nowrap}td.n{text-align:right;font-variant-numeric:tabular-nums}
.verdict{font-size:1.35em;font-weight:bold;padding:.7em 1em;border-radius:6px}.muted{color:#666}
.ok{color:#0b6b2f}.bad{color:#b00020;font-weight:bold}.verdict.ok{background:#e3f5e8;border:2px solid #0b6b2f}
.verdict.bad{background:#fde7ea;border:2px solid #b00020}
code,pre{font-family:"DejaVu Sans Mono",monospace;font-size:.9em}code.root{overflow-wrap:anywhere;font-size:.8em}
pre{background:#f7f7f7;border:1px solid #ddd;padding:.6em;white-space:pre-wrap;overflow-wrap:anywhere}
.nw{white-space:nowrap}figure{margin:.5em 0}figure svg{width:100%;height:auto}
ul.problems{margin:0;padding-left:1.2em}nav li{display:inline;margin-right:1em}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _utc(t: float) -> str:
    return utc_text(t, iso=True)


def _when(t: float) -> str:
    return f'<span class="nw">{_e(_utc(t))}</span>'


def _fig(kind: str, name: str, text: object, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<span data-figure="{_e(kind)}:{_e(name)}"{c}>{_e(text)}</span>'


def _num(x: float) -> str:
    if math.isinf(x):
        return "∞"
    return f"{x:.2f}" if abs(x) < 1e6 else f"{x:.3g}"  # a forged 1.7e308 as a number, not 309 digits


def _table(head: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Cells in `rows` are already HTML; header text is escaped here."""
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows[:_MAX_ROWS]:
        out.append("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    if len(rows) > _MAX_ROWS:
        out.append(f'<p class="muted">Showing the first {_MAX_ROWS} of {len(rows)} rows.</p>')
    return "".join(out)


def _listed(items) -> str:
    inner = "".join(f"<li>{_e(p)}</li>" for p in items)
    return f'<ul class="problems">{inner}</ul>' if items else '<span class="muted">none</span>'


def _rise(silo: str, served: float, changed: list) -> str:
    """What a ledger that changed after the silo began serving did, and when."""
    before, after = changed[0][0], changed[-1][1]
    how = ("rose" if after.epsilon_spent > before.epsilon_spent else
           "went down" if after.epsilon_spent < before.epsilon_spent else "changed")
    return (f"{silo}'s ledger {how} from ε {_num(before.epsilon_spent)} to {_num(after.epsilon_spent)} after it "
            f"began serving ({_utc(served)}): at {', '.join(_utc(b.time) for _, b in changed)}. Scores of a "
            "DP-trained model spend no budget, so the ledger changed for something else while the silo served: a "
            "training (nothing else charges a ledger; a run is charged all it reserved until it settles for what "
            "it spent); its ledger's charges say what.")


def _fall(silo: str, mine: list[BudgetPoint], falls: list) -> str:
    """The warning for a ledger that went down in a way no ledger does (`BudgetPoint.fell_unexplained`)."""
    steps = "; ".join(f"at {_utc(b.time)} from ε {_num(a.epsilon_spent)} over {a.charges} charges "
                      f"({a.open_reservations} open) to ε {_num(b.epsilon_spent)} over {b.charges} "
                      f"({b.open_reservations} open)" for a, b in falls)
    return (f"WARNING: {silo}'s ledger went down in a way a ledger cannot: {steps}. A ledger never loses a "
            "charge, and its spent total falls only when a run settles for less than it reserved, which closes "
            "one of its open reservations; that did not happen here. Charges were removed from the ledger or it "
            f"was replaced, so what it shows may be less than {silo} spent: the most this log shows it spent is "
            f"ε {_num(max(b.epsilon_spent for b in mine))}.")


def _not_private(silo: str, models: list[ServedModel]) -> str:
    """The warning for a silo that served a model that is not differentially private (or has no report to show
    that it is: the page says only what holds for both), with what its log says of it."""
    whys = "; ".join(dict.fromkeys(m.why for m in models))
    starts = f"start at {_utc(models[0].time)} says" if len(models) == 1 else (
        f"starts at {', '.join(_utc(m.time) for m in models)} say")
    return (f"WARNING: the model {silo} served is not shown to be differentially private: its answers carry no DP "
            "guarantee and this page makes no privacy claim for them, whatever its ledger shows. Its serving "
            f"{starts}: {whys}")


def _per_pair(silo: str, models: list[ServedModel]) -> str:
    """The warning for a silo whose private model's epsilon is per preference pair (`dp.privacy_unit: pair`)."""
    starts = ", ".join(_utc(m.time) for m in models)
    return (f"WARNING: the model {silo} served (serving start at {starts}) was trained at its epsilon per "
            "preference pair, not per image or patient: an image or a patient with several pairs has no stated "
            "guarantee at that epsilon (group privacy for (ε, δ)-DP covers k pairs only at kε, with δ multiplied by "
            "1 + e^ε + ... + e^((k-1)ε)).")


def _human(seconds: int) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            return unit if n == 1 else f"{n} {unit}s"
    return "second" if seconds == 1 else f"{seconds} seconds"


class _Page:
    """Builds the page section by section; `silos` and `colour` keep one colour per silo throughout."""

    def __init__(self, view: ReportView):
        self.v = view
        names = {q.silo for q in view.queries} | {b.silo for b in view.budgets}
        names |= {w.silo for w in view.router_weights} | {r.silo for r in view.reconciliation}
        names |= {p.silo for p in view.policies} | {s for p in view.parties if (s := silo_name(p.party))}
        names |= {m.silo for m in view.served_models}
        self.silos = sorted(names)
        self.colour = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(self.silos)}

    # -- verdict -------------------------------------------------------------------------
    def summary(self) -> str:
        v, fails = self.v, self.v.failures()
        if fails:
            verdict = "NOT INTACT — failed: " + "; ".join(fails) + "."
        else:
            unsigned = [f"{plural(p.uncovered_entries, 'entry')} of {p.party}" for p in v.parties
                        if p.uncovered_entries]
            verdict = (f"INTACT — all {len(v.parties)} logs verified, all {len(v.reconciliation)} silo logs "
                       "reconciled with the coordinator's, and every signed root checks out"
                       + (f"; no root yet covers the newest {', '.join(unsigned)}." if unsigned else "."))
        cls = "bad" if fails else "ok"
        counts = Counter(q.silo for q in v.queries)
        refused = Counter(q.silo for q in v.queries if q.refused)
        rows = [[_e(s), _fig("queries", s, counts[s]), _fig("refusals", s, refused[s])] for s in self.silos]
        table = _table(["silo", "calls logged", "of which refused"], rows, {1, 2}) if rows else ""
        how = ("The verdict says whether every party's log passed verification (mor audit verify) and whether every "
               "silo's log agrees with the coordinator's (mor audit reconcile); the sections below give the detail.")
        body = f'<p class="verdict {cls}" data-figure="verdict">{_e(verdict)}</p>{table}'
        return self._section("summary", how, body)

    # -- (1) queries over time -------------------------------------------------------------
    def queries(self) -> str:
        qs = self.v.queries
        how = ("How many calls each silo logged (answered or refused), counted per time bucket; "
               "a spike or a silent stretch is worth a question.")
        if not qs:
            return self._section("queries", how, "<p>No queries were recorded.</p>")
        t0, t1 = min(q.time for q in qs), max(q.time for q in qs)
        week = _BUCKETS[-1]
        width = next((b for b in _BUCKETS if (t1 - t0) / b <= _MAX_BUCKETS),
                     math.ceil((t1 - t0) / _MAX_BUCKETS / week) * week)
        n = int((t1 - t0) // width) + 1  # buckets start at the first call
        starts = [t0 + i * width for i in range(n)]
        fig = new_figure(10, 3.2)
        ax = fig.add_subplot()
        for silo in sorted({q.silo for q in qs}):
            per = Counter(int((q.time - t0) // width) for q in qs if q.silo == silo)
            ax.plot(plot_dates([s + width / 2 for s in starts]), [per[i] for i in range(n)], marker="o",
                    markersize=4, color=self.colour[silo], label=plot_label(silo))
        time_axis(ax)
        ax.set_ylabel(f"calls per {_human(width)}")
        ax.set_ylim(bottom=0)
        ax.legend(title="silo", loc="upper left", bbox_to_anchor=(1.01, 1))
        body = (f"<p>{len(qs)} calls between {_e(_utc(t0))} and {_e(_utc(t1))}, counted per {_e(_human(width))} "
                "(the last bucket may be partial).</p>" + inline_svg(fig, "calls per silo over time"))
        return self._section("queries", how, body)

    # -- (2) refusals ------------------------------------------------------------------------
    def refusals(self) -> str:
        how = ("Calls a silo refused, grouped by the reason its policy gave; each bar is one reason, "
               "coloured by silo, and the table lists every silo, reason and gRPC status with its count.")
        refused = Counter((q.silo, q.reason, q.status) for q in self.v.queries if q.refused)
        if not refused:
            return self._section("refusals", how, "<p>No call was refused.</p>")
        by_reason: dict[str, Counter] = defaultdict(Counter)
        for (silo, reason, _), c in refused.items():
            by_reason[reason][silo] += c
        reasons = sorted(by_reason, key=lambda r: (-sum(by_reason[r].values()), r))[:12]
        fig = new_figure(10, 1.2 + 0.45 * len(reasons))
        ax = fig.add_subplot()
        left = [0] * len(reasons)
        for silo in sorted({s for s, _, _ in refused}):
            vals = [by_reason[r][silo] for r in reasons]
            ax.barh(range(len(reasons)), vals, left=left, color=self.colour[silo], label=plot_label(silo))
            left = [a + b for a, b in zip(left, vals)]
        ax.set_yticks(range(len(reasons)), [plot_label(r, 50) for r in reasons])
        ax.invert_yaxis()
        ax.set_xlabel("refused calls (count)")
        ax.legend(title="silo", loc="upper left", bbox_to_anchor=(1.01, 1))
        rows = [[_e(s), _e(r), f"<code>{_e(st)}</code>", str(c)]
                for (s, r, st), c in sorted(refused.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1]))]
        note = "" if len(by_reason) <= 12 else (f'<p class="muted">The plot shows the 12 most common of '
                                                 f'{len(by_reason)} reasons; the table lists all.</p>')
        body = inline_svg(fig, "refused calls by reason") + note + _table(["silo", "reason", "status", "count"], rows, {3})
        return self._section("refusals", how, body)

    # -- (3) privacy budget ------------------------------------------------------------------
    def budgets(self) -> str:
        how = ("The differential-privacy budget each silo's ledger records as spent (solid line) against its "
               "lifetime limit (dashed line); the solid line must never cross the dashed one. A silo whose served "
               "model is not differentially private, as its serving start says, is warned of in red, and so is a "
               "ledger that went down in a way no ledger does (a charge gone, or a fall with no reservation settled). "
               "'ε per' is what the epsilon protects, as the served model's privacy report says: one image, one "
               "patient (all of a patient's rows), or one preference pair, which is warned of in red too.")
        pts = sorted(self.v.budgets, key=lambda b: b.time)
        # Whatever its ledger shows: a silo without a ledger (DP off) may serve such a model too.
        warnings = "".join(f"<p>{_fig('model-not-private', silo, _not_private(silo, unsafe), 'bad')}</p>"
                           for silo in self.silos
                           if (unsafe := [m for m in self.v.models_served(silo) if not m.private]))
        warnings += "".join(f"<p>{_fig('per-pair', silo, _per_pair(silo, paired), 'bad')}</p>" for silo in self.silos
                            if (paired := [m for m in self.v.models_served(silo) if m.private and m.unit == "pair"]))
        if not pts:
            return self._section("budget", how, warnings + "<p>No privacy-ledger entries were recorded.</p>")
        silos = sorted({b.silo for b in pts})
        cols = min(3, len(silos))
        fig = new_figure(10, 3.2 * math.ceil(len(silos) / cols))
        rows, flat, rises = [], [], []
        for i, silo in enumerate(silos):
            mine = [b for b in pts if b.silo == silo]
            last = mine[-1]
            ax = fig.add_subplot(math.ceil(len(silos) / cols), cols, i + 1)
            spent = [min(b.epsilon_spent, _PLOT_MAX) for b in mine]
            ax.step(plot_dates([b.time for b in mine]), spent, where="post", linewidth=2,
                    color=self.colour[silo], marker="o" if len(mine) <= 60 else None, markersize=3)
            limit = min(last.epsilon_budget, _PLOT_MAX) if math.isfinite(last.epsilon_budget) else 0.0
            if limit:
                ax.axhline(limit, color="#b00020", linestyle="--")
            ax.set_ylim(0, min(max(spent + [limit]) * 1.15, _PLOT_MAX) or 1)
            ax.set_title(plot_label(silo))
            ax.set_ylabel("ε (epsilon)")
            time_axis(ax, maxticks=4)
            # "Spends nothing while serving" holds only if no ledger change falls after serving began (a refusal
            # is serving too: a rise before the first admitted query is still a rise while it served).
            if falls := [(a, b) for a, b in zip(mine, mine[1:]) if b.fell_unexplained(a)]:
                warnings += f"<p>{_fig('budget-fall', silo, _fall(silo, mine, falls), 'bad')}</p>"
            served = self.v.serving_since(silo)
            if served is not None:
                if changed := [(a, b) for a, b in zip(mine, mine[1:]) if b.time > served and
                               (a.epsilon_spent, a.delta_spent) != (b.epsilon_spent, b.delta_spent)]:
                    rises.append(_fig("budget-rise", silo, _rise(silo, served, changed), "bad"))
                elif all(q.epsilon_spent == 0 for q in self.v.queries if q.silo == silo):
                    flat.append(silo)
            rows.append([_e(silo), _fig("epsilon-spent", silo, _num(last.epsilon_spent)),
                         _fig("epsilon-budget", silo, _num(last.epsilon_budget)),
                         _fig("epsilon-unit", silo, self._units(silo)),
                         f"{last.delta_spent:.3g}", f"{last.delta_budget:.3g}", _when(last.time)])
        fig.legend(handles=[Line2D([], [], color="#555", lw=2, label="ε spent (in the silo's colour)"),
                            Line2D([], [], color="#b00020", ls="--", label="ε lifetime budget")],
                   loc="outside lower center", ncols=2)
        body = warnings + inline_svg(fig, "privacy budget spent against the limit per silo")
        body += "".join(f"<p>{rise}</p>" for rise in rises)
        # Post-processing only where every model the silo served was private, as its serving starts say.
        private = [s for s in flat if (models := self.v.models_served(s)) and all(m.private for m in models)]
        unstated = [s for s in flat if not self.v.models_served(s)]
        if private:
            body += (f"<p>For {_e(', '.join(private))}: scores of a DP-trained model are post-processing: "
                     "answering queries spends no budget. The spend was made once, when the model was trained.</p>")
        if unstated:
            body += (f"<p>For {_e(', '.join(unstated))}: the ledger did not change while serving, but the log does "
                     "not say whether the model served was differentially private (no serving start states it), "
                     "so this page does not call its answers post-processing of a DP-trained model.</p>")
        body += _table(["silo", "ε spent", "ε budget", "ε per", "δ spent", "δ budget", "as of (UTC)"], rows,
                       {1, 2, 4, 5})
        return self._section("budget", how, body)

    def _units(self, silo: str) -> str:
        """What one unit of the epsilon of the private models `silo` served is, as its serving starts say."""
        units = dict.fromkeys(m.unit or "not stated" for m in self.v.models_served(silo) if m.private)
        return ", ".join(units) or "no private model on record"

    # -- (4) router weights ------------------------------------------------------------------
    def router(self) -> str:
        how = ("Which silo's judgement the aligned model followed, and where: each cell is the router's mean "
               "weight on that silo over the rows of that question kind whose MoR reward its weights formed (not the "
               "rows of a round that failed or was restarted, nor a row scored by the plain average because the "
               "silos it weighted were down) (darker = "
               "followed more; the largest in each row is bold), with n the number of rows.")
        ws = self.v.router_weights
        if not ws:
            return self._section("router", how, "<p>No round of the MoR reward was recorded.</p>")
        silos, kinds = sorted({w.silo for w in ws}), sorted({w.question_kind for w in ws})
        cell = {(w.question_kind, w.silo): w for w in ws}
        top = max(1.0, max(w.mean_weight for w in ws))
        rows = []
        for k in kinds:
            best = max((cell[k, s].mean_weight for s in silos if (k, s) in cell), default=None)
            row = [_e(k)]
            for s in silos:
                w = cell.get((k, s))
                if w is None:
                    row.append('<span class="muted">—</span>')
                    continue
                a = max(0.0, min(1.0, w.mean_weight / top))
                bg = f"rgb({round(255 - 255 * a)},{round(255 - 141 * a)},{round(255 - 77 * a)})"
                fg = "#fff" if a > 0.55 else "#111"
                b = "font-weight:bold;" if w.mean_weight == best else ""
                row.append(f'<div style="background:{bg};color:{fg};{b}padding:.3em .6em;text-align:right">'
                           f'{w.mean_weight:.2f}<br><small>n={w.items}</small></div>')
            rows.append(row)
        table = _table(["question kind", *silos], rows).replace("<td><div", '<td style="padding:0"><div')
        return self._section("router", how, table)

    # -- (5) rounds --------------------------------------------------------------------------
    def rounds(self) -> str:
        how = ("Each scoring round the coordinator ran: which silos it asked and which answered; "
               "a round with a silo missing was scored without that silo's judgement.")
        rs = sorted(self.v.rounds, key=lambda r: r.time)
        if not rs:
            return self._section("rounds", how, "<p>No scoring rounds were recorded.</p>")
        missing = [(r, m) for r in rs if (m := [s for s in r.asked if s not in r.answered])]
        body = (f"<p><b>{len(rs)}</b> rounds ({sum(r.items for r in rs)} items); "
                f"<b>{len(missing)}</b> with a silo missing.</p>")
        if missing:
            rows = [[_when(r.time), f"<code>{_e(r.round_id)}</code>", _e(r.objective), _e(", ".join(r.asked)),
                     f'<span class="bad">{_e(", ".join(m))}</span>'] for r, m in missing]
            body += _table(["time (UTC)", "round", "objective", "asked", "missing"], rows)
        return self._section("rounds", how, body)

    # -- (6) verification and reconciliation -------------------------------------------------
    def checks(self) -> str:
        how = ("Verification (mor audit verify) checks each log is whole, in order and unaltered; reconciliation "
               "(mor audit reconcile) checks the coordinator's record of each silo matches the silo's own; "
               "every problem is quoted as found. 'Newest not yet signed' entries are covered by no signed root yet "
               "(a silo signs with every answer, the coordinator every 256 entries or 30 s, both when they stop); "
               "'not in the log's shape' entries hold a value the log never writes and are read as 0 or left out "
               "of this page.")
        prow = [[_e(p.party), f"<code>{_e(p.log_name)}</code>", str(p.entries),
                 _fig("uncovered", p.party, p.uncovered_entries),
                 _fig("misshapen", p.party, p.misshapen_entries, "bad" if p.misshapen_entries else ""),
                 _fig("verification", p.party, "verified" if p.ok else "FAILED", "ok" if p.ok else "bad"),
                 _listed(p.problems) + (f'<p class="muted">and {_e(plural(p.unlisted_problems, "more problem"))}, '
                                        'not listed</p>' if p.unlisted_problems else "")] for p in self.v.parties]
        body = (_table(["party", "log", "entries", "newest not yet signed", "not in the log's shape",
                        "verification", "problems"], prow, {2, 3, 4}) if prow
                else "<p>No party's log was verified.</p>")
        rrow = [[_e(r.silo), _fig("reconciliation", r.silo, *(("reconciled", "ok") if r.ok else ("MISMATCH", "bad"))),
                 str(r.queries_matched), str(r.checkpoints_checked), _listed(r.mismatches)]
                for r in self.v.reconciliation]
        body += "<h3>Reconciliation with the coordinator</h3>" + (
            _table(["silo", "reconciliation", "queries matched", "checkpoints checked", "mismatches"], rrow, {2, 3})
            if rrow else "<p>No reconciliation was run.</p>")
        return self._section("checks", how, body)

    # -- (7) roots, (8) policies, glossary ---------------------------------------------------
    def roots(self) -> str:
        how = ("The latest checkpoint each party signed: the Merkle root of its first entries; anyone holding "
               "this root can later prove the log was not rewritten behind it.")
        rows = [[_e(p.party), str(r.size), f'<code class="root">{_e(r.root)}</code>', _when(r.time),
                 '<span class="ok">ok</span>' if r.signature_ok else '<span class="bad">INVALID</span>']
                for p in self.v.parties if (r := p.latest_root) is not None]
        rows += [[_e(p.party), "—", '<span class="bad">no signed root</span>', "—", "—"]
                 for p in self.v.parties if p.latest_root is None and p.entries]
        body = (_table(["party", "tree size", "root (hex)", "signed at (UTC)", "signature"], rows, {1}) if rows
                else "<p>No signed roots were recorded.</p>")
        return self._section("roots", how, body)

    def policies(self) -> str:
        how = "The serving policy each silo recorded when it started, as text, with its SHA-256 digest."
        body = "".join(f'<h3>{_e(p.silo)}</h3><p>digest <code class="root">{_e(p.digest)}</code></p>'
                       f"<pre>{_e(p.text)}</pre>" for p in sorted(self.v.policies, key=lambda p: p.silo))
        return self._section("policies", how, body or "<p>No policy was recorded.</p>")

    @staticmethod
    def glossary() -> str:
        terms = [("Merkle root", "A single hash that fixes every entry of a log up to some size: changing, "
                  "removing or reordering any entry changes it."),
                 ("Checkpoint", "A Merkle root with the log size it covers, signed by the party; handed to "
                  "another party so the log cannot later be rewritten unnoticed."),
                 ("Reconciliation", "Matching the coordinator's record of each call with the silo's own record "
                  "of it, call by call, without either seeing the query itself."),
                 ("Epsilon (ε) / delta (δ)", "The differential-privacy budget: how much one privacy unit (a "
                  "patient, an image or a pair: each silo's report names its unit) can change what is released "
                  "(smaller is more private); δ is the small chance the ε guarantee does not hold.")]
        items = "".join(f"<dt><b>{_e(t)}</b></dt><dd>{_e(d)}</dd>" for t, d in terms)
        return f'<section id="glossary"><h2>{SECTIONS["glossary"][0]}</h2><dl>{items}</dl></section>'

    @staticmethod
    def _section(sid: str, how: str, body: str) -> str:
        return f'<section id="{sid}"><h2>{_e(SECTIONS[sid][0])}</h2><p class="how">{_e(how)}</p>{body}</section>'


def render_report(view: ReportView) -> str:
    """The whole report as one HTML5 document (no external resources, no JavaScript)."""
    page = _Page(view)
    with matplotlib.rc_context(PLOT_STYLE):
        sections = [page.summary(), page.queries(), page.refusals(), page.budgets(), page.router(),
                    page.rounds(), page.checks(), page.roots(), page.policies(), page.glossary()]
    nav = "".join(f'<li><a href="#{sid}">{_e(short)}</a></li>' for sid, (_, short) in SECTIONS.items())
    csp = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(view.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_e(view.title)}</h1><p class=\"muted\">Audit report generated {_e(_utc(view.generated_at))} "
            f"from the logs of {len(view.parties)} part{'y' if len(view.parties) == 1 else 'ies'}. "
            f"All times are UTC.</p><nav><ul>{nav}</ul></nav>"
            + "".join(sections) + "</body></html>\n")


def write_report(view: ReportView, path) -> Path:
    """Render `view` and write it to `path` (UTF-8, parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(view), encoding="utf-8")
    return path
