"""The reviewer's report page, opened in a real headless Chromium.

A `ReportView` with known numbers (3 silos, a few hundred calls over 20
minutes, refusals for 2 reasons, budgets, router weights, one party whose
log failed verification, one reconciliation mismatch) is written to disk and
opened by `chromium --headless --dump-dom`; the key figures are read back from
their `data-figure` attributes in the DOM Chromium rendered. A screenshot
checks the page actually paints (not a flat colour). A second, clean view
must read INTACT. Chromium is installed by `make test`; if it is missing the
test fails (never skips), saying so.

Every Chromium call has a 60 s timeout, its own profile, HOME and caches under
the test's tmp dir, runs in its own process group, and the test checks that
no process of that group is left afterwards (killing any it finds).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mor_secure.audit.report import SECTIONS, render_report, write_report
from mor_secure.audit.report_view import (
    BudgetPoint, PartyCheck, PolicyInForce, ReconcileCheck, ReportView, RoundSummary, RouterWeight, ServedModel,
    SignedRoot, SiloQuery,
)

CHROMIUM = "/usr/bin/chromium"
T0 = 1_760_000_000.0  # 2025-10-09T08:53:20Z
SILOS = ("hospital-a", "bank-b", "hospital-c")
CALLS = {"hospital-a": 150, "bank-b": 120, "hospital-c": 90}
# (silo, reason, status) -> count; two reasons in all.
REFUSED = {("hospital-a", "objective 'helpfulness' is not allowed by policy", "PERMISSION_DENIED"): 12,
           ("bank-b", "rate limit exceeded: 60 requests per minute", "RESOURCE_EXHAUSTED"): 5,
           ("bank-b", "objective 'helpfulness' is not allowed by policy", "PERMISSION_DENIED"): 2}
EPSILON = {"hospital-a": (1.0, 3.0), "bank-b": (2.5, 4.0), "hospital-c": (0.75, 1.0)}  # spent, budget
BAD_PROBLEM = "entry 17: leaf hash does not match its body (edited after it was written)"
MISMATCH = "query round-0007 ScoreBatch (request sha256 3f2a…): logged by the coordinator, absent from the silo's log"


def _view(*, broken: bool) -> ReportView:
    queries = []
    for silo in SILOS:
        refusals = [(r, st) for (s, r, st), c in REFUSED.items() if s == silo for _ in range(c)]
        for i in range(CALLS[silo]):
            t = T0 + 1200.0 * i / CALLS[silo] + SILOS.index(silo)
            reason, status = refusals[i] if i < len(refusals) else ("", "OK")
            queries.append(SiloQuery(silo=silo, time=t, caller="mor://coordinator/coordinator",
                                     rpc="/mor_secure.proto.v1.SiloRewardService/ScoreBatch", objective="safety",
                                     decision="refused" if reason else "admitted", status=status, reason=reason,
                                     items=0 if reason else 8, epsilon_spent=0.0))
    budgets = []
    for silo, (spent, limit) in EPSILON.items():  # training spends in 4 steps before serving, then nothing
        for k in range(5):
            budgets.append(BudgetPoint(silo, T0 - 3600 + 600 * k, spent * k / 4, limit, 1e-6 * k / 4, 1e-5))
        budgets.append(BudgetPoint(silo, T0 + 1200, spent, limit, 1e-6, 1e-5))
    weights = tuple(RouterWeight(silo, kind, w, 200) for kind, row in
                    {"shape": (0.7, 0.2, 0.1), "color": (0.15, 0.75, 0.1), "yes_no": (0.2, 0.2, 0.6)}.items()
                    for silo, w in zip(SILOS, row))
    parties = []
    for i, party in enumerate(["mor://coordinator/coordinator", *(f"mor://silo/{s}" for s in SILOS)]):
        bad = broken and party == "mor://silo/bank-b"
        root = SignedRoot(party, 400 + i, f"{i:02x}" * 32, T0 + 1210, True)
        parties.append(PartyCheck(party, f"{party.rsplit('/', 1)[1]}.audit.jsonl", 400 + i, not bad,
                                  (BAD_PROBLEM,) if bad else (), root))
    recon = tuple(ReconcileCheck(s, not (broken and s == "hospital-c"), CALLS[s], 30,
                                 (MISMATCH,) if broken and s == "hospital-c" else ()) for s in SILOS)
    rounds = tuple(RoundSummary(T0 + 40 * r, f"round-{r:04d}", "safety", SILOS,
                                SILOS if r != 7 else SILOS[:2], 24) for r in range(30))
    policies = tuple(PolicyInForce(s, "ab" * 32, f"silo: {s}\nallowed_objectives: [safety]\nmax_rps: 60\n")
                     for s in SILOS)
    # Every silo serves a DP-trained model (its serving start says so): the page may call its scores post-processing.
    served = tuple(ServedModel(s, T0, True, "scores of a DP-trained model are post-processing") for s in SILOS)
    return ReportView("Consortium audit — test run", T0 + 1300, tuple(parties), recon, tuple(queries),
                      tuple(budgets), weights, rounds, policies, served_models=served)


class _Figures(HTMLParser):
    """data-figure attribute -> the text inside that element."""

    def __init__(self):
        super().__init__()
        self.figures: dict[str, str] = {}
        self._open: list[list] = []  # [name, depth, text parts]

    def handle_starttag(self, tag, attrs):
        for entry in self._open:
            entry[1] += 1
        name = dict(attrs).get("data-figure")
        if name is not None:
            self._open.append([name, 1, []])

    def handle_endtag(self, tag):
        for entry in list(self._open):
            entry[1] -= 1
            if entry[1] == 0:
                self.figures[entry[0]] = "".join(entry[2]).strip()
                self._open.remove(entry)

    def handle_data(self, data):
        for entry in self._open:
            entry[2].append(data)


def _live_chromium(pgid: int, marker: str) -> list[int]:
    """Running (not zombie) processes in Chromium's process group, or naming our private dir (crashpad
    handlers start their own session but keep their database under our HOME)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            state, _, group = (d / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if state != "Z" and (int(group) == pgid or marker in cmdline):
            pids.append(int(d.name))
    return pids


def _chromium(workdir: Path, *args: str) -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make test` (it installs the Debian package `chromium`), "
                    "or `apt-get update && apt-get install -y chromium`")
    home = workdir / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={workdir / 'profile'}",
           "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
           "--disable-background-networking", "--hide-scrollbars", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"chromium did not finish within 60 s: {cmd}")
    finally:
        deadline = time.monotonic() + 5  # children exit just after the browser; then kill stragglers
        while (left := _live_chromium(proc.pid, str(workdir))) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2 if left else 0)
        assert not _live_chromium(proc.pid, str(workdir)), "chromium processes are still running"
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err[-2000:]}"
    return out


@pytest.fixture(scope="module")
def broken_page(tmp_path_factory):
    """(report path, DOM Chromium rendered, screenshot path) for the view with a failure and a mismatch."""
    tmp = tmp_path_factory.mktemp("report")
    path = write_report(_view(broken=True), tmp / "out" / "report.html")
    dom = _chromium(tmp / "dom", "--dump-dom", path.as_uri())
    png = tmp / "report.png"
    _chromium(tmp / "shot", f"--screenshot={png}", "--window-size=1280,4000", path.as_uri())
    return path, dom, png


def _figures(dom: str) -> dict[str, str]:
    parser = _Figures()
    parser.feed(dom)
    return parser.figures


def test_browser_shows_known_figures_and_not_intact(broken_page):
    path, dom, _ = broken_page
    fig = _figures(dom)
    for silo in SILOS:
        assert fig[f"queries:{silo}"] == str(CALLS[silo])
        assert fig[f"refusals:{silo}"] == str(sum(c for (s, _, _), c in REFUSED.items() if s == silo))
        assert fig[f"epsilon-spent:{silo}"] == f"{EPSILON[silo][0]:.2f}"
        assert fig[f"epsilon-budget:{silo}"] == f"{EPSILON[silo][1]:.2f}"
    assert fig["verification:mor://silo/bank-b"] == "FAILED"
    for party in ("mor://coordinator/coordinator", "mor://silo/hospital-a", "mor://silo/hospital-c"):
        assert fig[f"verification:{party}"] == "verified"
    assert fig["reconciliation:hospital-c"] == "MISMATCH"
    assert fig["reconciliation:hospital-a"] == fig["reconciliation:bank-b"] == "reconciled"
    assert fig["verdict"].startswith("NOT INTACT")
    assert "mor://silo/bank-b" in fig["verdict"] and "hospital-c" in fig["verdict"]
    # Problems are quoted verbatim; the budget note appears (serving spent nothing); the page is self-contained.
    text = path.read_text(encoding="utf-8")
    assert BAD_PROBLEM in dom and "absent from the silo&#x27;s log" in text
    assert "answering queries spends no budget" in dom
    assert "<script" not in text.lower() and "<img" not in text and "<link" not in text
    assert all(ref.startswith("#") for ref in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text))
    assert dom.count("<svg") == 3  # queries, refusals, budget


def test_screenshot_paints_the_page(broken_page):
    from matplotlib.image import imread

    _, _, png = broken_page
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(png)
    assert pixels.shape[:2] == (4000, 1280)
    assert pixels[..., :3].std() > 0.05
    assert len({tuple(p) for p in pixels[::7, ::7, :3].reshape(-1, 3).tolist()}) > 50  # plots, not just text


def test_browser_clean_view_is_intact(tmp_path):
    path = write_report(_view(broken=False), tmp_path / "report.html")
    fig = _figures(_chromium(tmp_path / "dom", "--dump-dom", path.as_uri()))
    assert fig["verdict"].startswith("INTACT")
    parties = ("mor://coordinator/coordinator", *(f"mor://silo/{s}" for s in SILOS))
    assert {fig[f"verification:{p}"] for p in parties} == {"verified"}
    assert {fig[f"reconciliation:{s}"] for s in SILOS} == {"reconciled"}


def test_render_escapes_log_text_and_handles_empty_view(tmp_path):
    evil = "<script>alert('x')</script> & $x$"
    view = _view(broken=True)
    q = view.queries[0]
    view = ReportView(view.title, view.generated_at, view.parties, view.reconciliation,
                      (SiloQuery(q.silo, q.time, q.caller, q.rpc, q.objective, "refused", "PERMISSION_DENIED",
                                 evil, 0, 0.0), *view.queries[1:]),
                      view.budgets, view.router_weights, view.rounds,
                      (PolicyInForce("hospital-a", "00" * 32, evil),))
    page = render_report(view)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; $x$" in page

    empty = ReportView("Empty", T0, (), (), (), (), (), (), ())
    path = write_report(empty, tmp_path / "a" / "b" / "empty.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "No queries were recorded." in page and "No privacy-ledger entries were recorded." in page
    assert "No round of the MoR reward was recorded." in page and "No reconciliation was run." in page
    assert 'data-figure="verdict">NOT INTACT' in page and "<svg" not in page


def test_page_stays_small_for_5000_queries():
    base = _view(broken=False)
    queries = tuple(SiloQuery(SILOS[i % 3], T0 + i * 0.7, "mor://coordinator/coordinator", "ScoreBatch", "safety",
                              "refused" if i % 17 == 0 else "admitted", "OK", "rate limit" if i % 17 == 0 else "",
                              8, 0.0) for i in range(5000))
    budgets = tuple(BudgetPoint(SILOS[i % 3], T0 + i, 0.001 * i, 10.0, 0.0, 1e-5) for i in range(3000))
    page = render_report(ReportView(base.title, base.generated_at, base.parties, base.reconciliation, queries,
                                    budgets, base.router_weights, base.rounds, base.policies))
    assert len(page.encode("utf-8")) < 2_000_000


def test_the_reviewers_guide_numbers_the_sections_as_the_page_does():
    """docs/compliance-reviewer.md walks the reviewer through the page by its headings; they must be the page's."""
    guide = (Path(__file__).parents[2] / "docs" / "compliance-reviewer.md").read_text(encoding="utf-8")
    reading = guide.split("## Reading the page")[1].split("\n## ")[0]
    described = [number + text for number, text in re.findall(r"^(\d+\. )?\*\*([^*]+?)\.?\*\*", reading, re.M)]
    assert described == [heading for sid, (heading, _) in SECTIONS.items() if sid != "glossary"]
