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
attributes so tests and tools can read them without scraping prose. The HTML
pieces are `report_html`'s; section 3 (the privacy budget) is `report_budget`'s.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import matplotlib

from mor_secure.pki.files import write_public

from .reconcile import MAX_MISMATCHES
from .report_budget import budget_section
from .report_html import FAILED_LOG, esc, figure_span, html_table, listed, red_paragraph, utc, when
from .report_plots import PALETTE, PLOT_STYLE, inline_svg, new_figure, plot_dates, plot_label, time_axis
from .report_view import ReportView, plural, silo_name
from .verify import MAX_PROBLEMS

# Bucket widths for the queries-over-time plot (seconds); the first giving at most ~30 buckets wins, and beyond a
# week a whole number of weeks does, so a log spanning centuries still plots ~30 buckets (not one per week).
_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400, 604800)
_MAX_BUCKETS = 30
# The refusal and caller tables list each silo's most common reasons (callers) up to this many, then one row for
# the rest: one silo's thousand distinct reasons or callers cannot push another silo's off the table.
_ROWS_PER_SILO = 20


def _each_silos_most(counts: Counter) -> Iterator[tuple[str, list, list]]:
    """For each silo in `counts` (keyed by (silo, key)): its _ROWS_PER_SILO most counted (key, count), most first,
    and the rest."""
    for silo in sorted({silo for silo, _ in counts}):
        mine = sorted(((key, n) for (s, key), n in counts.items() if s == silo), key=lambda kn: (-kn[1], kn[0]))
        yield silo, mine[:_ROWS_PER_SILO], mine[_ROWS_PER_SILO:]

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
        self.unverified = view.unverified_silos()

    def silo_html(self, silo: str) -> str:
        """A silo's name as HTML, marked in red where its own log failed verification (its figures are unvouched)."""
        return esc(silo) + (f' <span class="bad">{FAILED_LOG}</span>' if silo in self.unverified else "")

    def silo_label(self, silo: str) -> str:
        """A silo's name as plain text (a plot's legend or title), marked as `silo_html` marks it."""
        return f"{silo} {FAILED_LOG}" if silo in self.unverified else silo

    def _from_coordinator(self) -> str:
        """The red note for a section read from the coordinator's log, where that log failed verification."""
        failed = any(not p.ok for p in self.v.parties if p.party == self.v.coordinator)
        return (f'<p class="bad">WARNING: this section is read from the log of {esc(self.v.coordinator)}, which '
                "FAILED verification: nothing in it is vouched for.</p>") if failed else ""

    # -- verdict -------------------------------------------------------------------------
    def summary(self) -> str:
        v, fails = self.v, self.v.failures()
        if fails:
            verdict = "NOT INTACT — failed: " + "; ".join(fails) + "."
        elif not any(p.entries for p in v.parties):
            verdict = (f"INTACT, but empty — the {len(v.parties)} logs verified hold no entries and no signed root: "
                       "there is no record yet to vouch for.")
        else:
            unsigned = [f"{plural(p.uncovered_entries, 'entry')} of {p.party}" for p in v.parties
                        if p.uncovered_entries]
            empty = [p.party for p in v.parties if not p.entries]
            verdict = (f"INTACT — all {len(v.parties)} logs verified, all {len(v.reconciliation)} silo logs "
                       "reconciled with the coordinator's, and every signed root checks out"
                       + (f"; no root yet covers the newest {', '.join(unsigned)}" if unsigned else "")
                       + (f"; the log of {', '.join(empty)} holds no entries yet" if empty else "") + ".")
        cls = "bad" if fails else "ok"
        counts = Counter(q.silo for q in v.queries)
        refused = Counter(q.silo for q in v.queries if q.refused)
        rows = [[self.silo_html(s), figure_span("queries", s, counts[s]), figure_span("refusals", s, refused[s])]
                for s in self.silos]
        table = html_table(["silo", "calls logged", "of which refused"], rows, {1, 2}) if rows else ""
        how = ("The verdict says whether every party's log passed verification (mor audit verify) and whether every "
               "silo's log agrees with the coordinator's (mor audit reconcile); the sections below give the detail.")
        body = f'<p class="verdict {cls}" data-figure="verdict">{esc(verdict)}</p>{table}'
        return self.section("summary", how, body)

    # -- (1) queries over time -------------------------------------------------------------
    def queries(self) -> str:
        qs = self.v.queries
        how = ("How many calls each silo logged (answered or refused), counted per time bucket; "
               "a spike or a silent stretch is worth a question.")
        if not qs:
            return self.section("queries", how, "<p>No queries were recorded.</p>")
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
                    markersize=4, color=self.colour[silo], label=plot_label(self.silo_label(silo), 90))
        time_axis(ax)
        ax.set_ylabel(f"calls per {_human(width)}")
        ax.set_ylim(bottom=0)
        ax.legend(title="silo", loc="upper left", bbox_to_anchor=(1.01, 1))
        body = (f"<p>{len(qs)} calls between {esc(utc(t0))} and {esc(utc(t1))}, counted per {esc(_human(width))} "
                "(the last bucket may be partial).</p>" + inline_svg(fig, "calls per silo over time"))
        return self.section("queries", how, body + self._callers())

    def _callers(self) -> str:
        """Each silo's calls by caller: the coordinator's are reconciled; anyone else's are on the silo's record
        alone, so they are marked, and answered ones warned of."""
        coordinator = self.v.coordinator
        calls = Counter((q.silo, q.caller) for q in self.v.queries)
        refused = Counter((q.silo, q.caller) for q in self.v.queries if q.refused)
        rows = []
        for silo, most, rest in _each_silos_most(calls):
            rows += [[self.silo_html(silo), esc(caller) if caller == coordinator else
                      f'<span class="bad">{esc(caller)} (not the coordinator)</span>',
                      figure_span("calls-from", f"{silo} {caller}", n), str(refused[silo, caller])]
                     for caller, n in most]
            if rest:
                rows.append([self.silo_html(silo), f'<span class="bad">{plural(len(rest), "other caller")}, '
                             "together</span>", figure_span("calls-from-others", silo, sum(n for _, n in rest)),
                             str(sum(refused[silo, caller] for caller, _ in rest))])
        warnings = ""
        for silo in self.silos:
            if others := {c: n - refused[s, c] for (s, c), n in sorted(calls.items())
                          if s == silo and c != coordinator and n > refused[s, c]}:
                named = "; ".join(f"{c}: {n}" for c, n in list(others.items())[:_ROWS_PER_SILO])
                more = f"; and {plural(len(others) - _ROWS_PER_SILO, 'other caller')}" if len(others) > _ROWS_PER_SILO \
                    else ""
                text = (f"WARNING: {silo} answered {plural(sum(others.values()), 'call')} from callers other than "
                        f"the coordinator ({named}{more}). Reconciliation matches only the coordinator's calls, so "
                        "these are on the silo's own record alone: ask who called it, and why its policy let them.")
                warnings += red_paragraph("other-callers", silo, text)
        return ("<h3>Calls by caller</h3><p>Who asked each silo, as its own log records it; a caller that is not "
                "the coordinator whose log was given is marked in red.</p>" + warnings
                + html_table(["silo", "caller", "calls logged", "of which refused"], rows, {2, 3}, limit=None))

    # -- (2) refusals ------------------------------------------------------------------------
    def refusals(self) -> str:
        how = ("Calls a silo refused, grouped by the reason its policy gave; each bar is one reason, coloured by "
               f"silo, and the table lists, for every silo, its {_ROWS_PER_SILO} most common reasons with their "
               "gRPC status and count, and its other reasons, if any, counted together in one row.")
        refused = Counter((q.silo, q.reason, q.status) for q in self.v.queries if q.refused)
        if not refused:
            return self.section("refusals", how, "<p>No call was refused.</p>")
        by_reason: dict[str, Counter] = defaultdict(Counter)
        for (silo, reason, _), c in refused.items():
            by_reason[reason][silo] += c
        reasons = sorted(by_reason, key=lambda r: (-sum(by_reason[r].values()), r))[:12]
        fig = new_figure(10, 1.2 + 0.45 * len(reasons))
        ax = fig.add_subplot()
        left = [0] * len(reasons)
        for silo in sorted({s for s, _, _ in refused}):
            vals = [by_reason[r][silo] for r in reasons]
            ax.barh(range(len(reasons)), vals, left=left, color=self.colour[silo],
                    label=plot_label(self.silo_label(silo), 90))
            left = [a + b for a, b in zip(left, vals)]
        ax.set_yticks(range(len(reasons)), [plot_label(r, 50) for r in reasons])
        ax.invert_yaxis()
        ax.set_xlabel("refused calls (count)")
        ax.legend(title="silo", loc="upper left", bbox_to_anchor=(1.01, 1))
        rows = []
        for silo, most, rest in _each_silos_most(Counter({(s, (r, st)): c for (s, r, st), c in refused.items()})):
            rows += [[self.silo_html(silo), esc(r), f"<code>{esc(st)}</code>", str(c)] for (r, st), c in most]
            if rest:  # rows are (reason, status) pairs: one reason refused with two statuses is two of them
                rows.append([self.silo_html(silo), f'<span class="muted">the other {len(rest)} reasons and statuses, '
                             "together</span>", "", figure_span("other-reasons", silo, sum(c for _, c in rest))])
        note = "" if len(by_reason) <= 12 else (f'<p class="muted">The plot shows the 12 most common of '
                                                 f'{len(by_reason)} reasons; the table shows each silo\'s.</p>')
        # Not cut at MAX_ROWS: at most _ROWS_PER_SILO + 1 rows a silo, so every silo is in it.
        table = html_table(["silo", "reason", "status", "count"], rows, {3}, limit=None)
        return self.section("refusals", how, inline_svg(fig, "refused calls by reason") + note + table)

    # -- (3) privacy budget ------------------------------------------------------------------
    def budgets(self) -> str:
        return budget_section(self)

    # -- (4) router weights ------------------------------------------------------------------
    def router(self) -> str:
        how = ("Which silo's judgement the aligned model followed, and where: each cell is the router's mean "
               "weight on that silo over the rows of that question kind whose MoR reward its weights formed (not the "
               "rows of a round that failed or was restarted, nor a row scored by the plain average because the "
               "silos it weighted were down) (darker = "
               "followed more; the largest in each row is bold), with n the number of rows.")
        ws = self.v.router_weights
        if not ws:
            return self.section("router", how, "<p>No round of the MoR reward was recorded.</p>")
        silos, kinds = sorted({w.silo for w in ws}), sorted({w.question_kind for w in ws})
        cell = {(w.question_kind, w.silo): w for w in ws}
        top = max(1.0, max(w.mean_weight for w in ws))
        rows = []
        for k in kinds:
            best = max((cell[k, s].mean_weight for s in silos if (k, s) in cell), default=None)
            row = [esc(k)]
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
        table = html_table(["question kind", *silos], rows).replace("<td><div", '<td style="padding:0"><div')
        return self.section("router", how, self._from_coordinator() + table)

    # -- (5) rounds --------------------------------------------------------------------------
    def rounds(self) -> str:
        how = ("Each scoring round the coordinator ran: which silos it asked and which answered; "
               "a round with a silo missing was scored without that silo's judgement.")
        rs = sorted(self.v.rounds, key=lambda r: r.time)
        if not rs:
            return self.section("rounds", how, "<p>No scoring rounds were recorded.</p>")
        missing = [(r, m) for r in rs if (m := [s for s in r.asked if s not in r.answered])]
        body = self._from_coordinator() + (f"<p><b>{len(rs)}</b> rounds ({sum(r.items for r in rs)} items); "
                                           f"<b>{len(missing)}</b> with a silo missing.</p>")
        if missing:
            rows = [[when(r.time), f"<code>{esc(r.round_id)}</code>", esc(r.objective), esc(", ".join(r.asked)),
                     f'<span class="bad">{esc(", ".join(m))}</span>'] for r, m in missing]
            body += html_table(["time (UTC)", "round", "objective", "asked", "missing"], rows)
        return self.section("rounds", how, body)

    # -- (6) verification and reconciliation -------------------------------------------------
    def checks(self) -> str:
        how = ("Verification (mor audit verify) checks each log is whole, in order and unaltered; reconciliation "
               "(mor audit reconcile) checks the coordinator's record of each silo matches the silo's own; "
               f"each problem is quoted as found (a log's first {MAX_PROBLEMS}, with how many more; a silo's first "
               f"{MAX_MISMATCHES} mismatches, with how many more). 'Newest not yet signed' entries are covered by "
               "no signed root yet (a silo signs with every answer, the coordinator every 256 entries or 30 s, both "
               "when they stop); 'not in the log's shape' entries hold a value the log never writes and are read as "
               "0 or left out of this page.")
        prow = [[esc(p.party), f"<code>{esc(p.log_name)}</code>", str(p.entries),
                 figure_span("uncovered", p.party, p.uncovered_entries),
                 figure_span("misshapen", p.party, p.misshapen_entries, "bad" if p.misshapen_entries else ""),
                 figure_span("verification", p.party, "verified" if p.ok else "FAILED", "ok" if p.ok else "bad"),
                 listed(p.problems) + (f'<p class="muted">and {esc(plural(p.unlisted_problems, "more problem"))}, '
                                        'not listed</p>' if p.unlisted_problems else "")] for p in self.v.parties]
        body = (html_table(["party", "log", "entries", "newest not yet signed", "not in the log's shape",
                        "verification", "problems"], prow, {2, 3, 4}) if prow
                else "<p>No party's log was verified.</p>")
        rrow = [[self.silo_html(r.silo),
                 figure_span("reconciliation", r.silo, *(("reconciled", "ok") if r.ok else ("MISMATCH", "bad"))),
                 str(r.queries_matched), str(r.checkpoints_checked),
                 listed(r.mismatches) + (f'<p class="muted">and {esc(plural(r.unlisted_mismatches, "more mismatch"))}, '
                                         'not listed</p>' if r.unlisted_mismatches else "")]
                for r in self.v.reconciliation]
        body += "<h3>Reconciliation with the coordinator</h3>" + (
            html_table(["silo", "reconciliation", "queries matched", "checkpoints checked", "mismatches"], rrow, {2, 3})
            if rrow else "<p>No reconciliation was run.</p>")
        return self.section("checks", how, body)

    # -- (7) roots, (8) policies, glossary ---------------------------------------------------
    def roots(self) -> str:
        how = ("The latest checkpoint each party signed: the Merkle root of its first entries; anyone holding "
               "this root can later prove the log was not rewritten behind it.")
        def party(check) -> str:
            return esc(check.party) + ("" if check.ok else f' <span class="bad">{FAILED_LOG}</span>')

        rows = [[party(p), str(r.size), f'<code class="root">{esc(r.root)}</code>', when(r.time),
                 '<span class="ok">ok</span>' if r.signature_ok else '<span class="bad">INVALID</span>']
                for p in self.v.parties if (r := p.latest_root) is not None]
        rows += [[party(p), "—", '<span class="bad">no signed root</span>', "—", "—"]
                 for p in self.v.parties if p.latest_root is None and p.entries]
        body = (html_table(["party", "tree size", "root (hex)", "signed at (UTC)", "signature"], rows, {1}) if rows
                else "<p>No signed roots were recorded.</p>")
        return self.section("roots", how, body)

    def policies(self) -> str:
        how = ("Every serving policy each silo recorded when it started serving, as text, with its SHA-256 digest "
               "and each time it took effect (a restart under the policy already in force is not a new one).")
        body = ""
        for silo in sorted({p.silo for p in self.v.policies}):
            served: dict[str, tuple] = {}  # digest -> (the policy, when it took effect), first in force first
            for p in self.v.policies:
                if p.silo == silo:
                    served.setdefault(p.digest, (p, []))[1].append(p.time)
            body += (f"<h3>{self.silo_html(silo)}</h3><p>{esc(silo)} served under "
                     f"{figure_span('policies', silo, plural(len(served), 'policy'))}.</p>")
            for policy, times in served.values():
                took_effect = ", ".join(utc(t) for t in times if t is not None) or "a time this page was not given"
                body += (f'<p>Took effect at {esc(took_effect)}; digest <code class="root">{esc(policy.digest)}'
                         f"</code></p><pre>{esc(policy.text)}</pre>")
        return self.section("policies", how, body or "<p>No policy was recorded.</p>")

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
        items = "".join(f"<dt><b>{esc(t)}</b></dt><dd>{esc(d)}</dd>" for t, d in terms)
        return f'<section id="glossary"><h2>{SECTIONS["glossary"][0]}</h2><dl>{items}</dl></section>'

    @staticmethod
    def section(sid: str, how: str, body: str) -> str:
        return f'<section id="{sid}"><h2>{esc(SECTIONS[sid][0])}</h2><p class="how">{esc(how)}</p>{body}</section>'


def render_report(view: ReportView) -> str:
    """The whole report as one HTML5 document (no external resources, no JavaScript)."""
    page = _Page(view)
    with matplotlib.rc_context(PLOT_STYLE):
        sections = [page.summary(), page.queries(), page.refusals(), page.budgets(), page.router(),
                    page.rounds(), page.checks(), page.roots(), page.policies(), page.glossary()]
    nav = "".join(f'<li><a href="#{sid}">{esc(short)}</a></li>' for sid, (_, short) in SECTIONS.items())
    csp = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(view.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(view.title)}</h1><p class=\"muted\">Audit report generated {esc(utc(view.generated_at))} "
            f"from the logs of {len(view.parties)} part{'y' if len(view.parties) == 1 else 'ies'}. "
            f"All times are UTC.</p><nav><ul>{nav}</ul></nav>"
            + "".join(sections) + "</body></html>\n")


def write_report(view: ReportView, path) -> Path:
    """Render `view` and write it to `path` (UTF-8, mode 0644, parent folders created); returns the path.

    The page is rendered whole, then written to a new file beside `path` and moved over it (`write_public`), so
    a run that fails (rendering, a full disk) leaves the report already there as it was, never emptied or cut
    short. A `path` that is a symbolic link (`latest.html`) has its target replaced, not the link."""
    path = Path(path)
    page = render_report(view).encode("utf-8")
    write_public(path.resolve() if path.is_symlink() else path, page)
    return path
