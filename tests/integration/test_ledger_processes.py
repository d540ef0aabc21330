"""The privacy ledger across real OS processes: racing reservations, and a run killed before it settles.

The children load ``mor_secure/privacy/ledger_chain.py`` and ``ledger.py`` by
file path: they use only the standard library, and this keeps each child from
importing torch through ``mor_secure.privacy``'s package imports (seconds of
CPU per child, on a shared 2-core machine). What is under test, the file lock
and the on-disk chain, is the same either way.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mor_secure.privacy.ledger as ledger_module
from mor_secure.privacy.ledger import PrivacyLedger

LEDGER_PY = Path(ledger_module.__file__).resolve()
CHAIN_PY = LEDGER_PY.with_name("ledger_chain.py")
UNITS_PY = LEDGER_PY.with_name("ledger_units.py")
# Registered under their package names first, so that ledger.py's imports find them without the package.
LOAD_LEDGER = """
import importlib.util, sys
for name, file in (("mor_secure.privacy.ledger_chain", {chain_py!r}),
                   ("mor_secure.privacy.ledger_units", {units_py!r}), ("ledger_under_test", {ledger_py!r})):
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec); sys.modules[name] = module; spec.loader.exec_module(module)
assert "torch" not in sys.modules
ledger = sys.modules["ledger_under_test"]
"""
SILO = "hospital-a"
TIMEOUT_S = 60
RACE_ROUNDS = 6

# argv: ledger path, ready file, go file. Exit 0: reserved; 3: BudgetExceededError; anything else: a bug.
RACER = LOAD_LEDGER + """
import time
from pathlib import Path
path, ready, go = sys.argv[1:4]
handle = ledger.PrivacyLedger(path, silo={silo!r}, epsilon_budget=1.0, delta_budget=1e-5)
handle.check_affordable(epsilon=0.6, delta=1e-6)  # warm every code path before the start line
Path(ready).touch()
deadline = time.time() + {timeout}
while not Path(go).exists():
    if time.time() > deadline:
        sys.exit(5)
    time.sleep(0.001)
start = float(Path(go).read_text())
while time.time() < start:  # both children leave this loop within microseconds of each other
    pass
try:
    r = handle.reserve(purpose="train:race", epsilon=0.6, delta=1e-6)
except ledger.BudgetExceededError:
    sys.exit(3)
print(r.id)
"""

# argv: ledger path. Reserves, says so, then blocks until killed.
VICTIM = LOAD_LEDGER + """
handle = ledger.PrivacyLedger(sys.argv[1], silo={silo!r}, epsilon_budget=1.0, delta_budget=1e-5)
r = handle.reserve(purpose="train:killed", epsilon=0.7, delta=2e-6, details={{"pid": 1}})
print("reserved", r.id, flush=True)
sys.stdin.read()
handle.settle(r, epsilon=0.1, delta=0.0)
"""


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    script = code.format(ledger_py=str(LEDGER_PY), chain_py=str(CHAIN_PY), units_py=str(UNITS_PY), silo=SILO,
                         timeout=TIMEOUT_S)
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _reap(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=TIMEOUT_S)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _wait_for(condition, what: str, procs: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        crashed = [p for p in procs if p.poll() is not None]
        if crashed:
            pytest.fail(f"a child exited early ({crashed[0].returncode}) while waiting for {what}: "
                        f"{crashed[0].stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("round_", range(RACE_ROUNDS))
def test_two_processes_reserving_at_once_cannot_both_pass(tmp_path: Path, round_: int) -> None:
    """Several rounds, because one round with the lock removed still passes about half the time."""
    path = tmp_path / "privacy_ledger.json"
    PrivacyLedger.create(path, silo=SILO, epsilon_budget=1.0, delta_budget=1e-5)  # room for one 0.6 reservation
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{n}" for n in range(2)]
    procs: list[subprocess.Popen[str]] = []
    try:
        procs = [_spawn(RACER, str(path), str(r), str(go)) for r in ready]
        _wait_for(lambda: all(r.exists() for r in ready), "both children to open the ledger", procs)
        (tmp_path / "go.tmp").write_text(repr(time.time() + 0.2))
        os.replace(tmp_path / "go.tmp", go)  # children never read a half-written start time
        outputs = [proc.communicate(timeout=TIMEOUT_S) for proc in procs]
        codes = sorted(proc.returncode for proc in procs)
        assert codes == [0, 3], f"exit codes {codes}; stderr: {[err for _, err in outputs]}"
    finally:
        _reap(procs)

    winner = next(out.strip() for (out, _), proc in zip(outputs, procs) if proc.returncode == 0)
    ledger = PrivacyLedger(path, silo=SILO, epsilon_budget=1.0, delta_budget=1e-5)
    assert [c.reservation_id for c in ledger.charges] == [winner]
    assert ledger.spent_epsilon == 0.6 and ledger.open_reservations == (winner,)


def test_a_run_killed_before_settling_stays_charged_in_full(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.json"
    PrivacyLedger.create(path, silo=SILO, epsilon_budget=1.0, delta_budget=1e-5)
    procs: list[subprocess.Popen[str]] = []
    try:
        procs = [_spawn(VICTIM, str(path))]
        (victim,) = procs
        readable, _, _ = select.select([victim.stdout], [], [], TIMEOUT_S)
        assert readable, "the child never reported its reservation"
        words = victim.stdout.readline().split()
        assert words[:1] == ["reserved"], f"unexpected output {words}; stderr: {victim.stderr.read()}"
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    finally:
        _reap(procs)

    ledger = PrivacyLedger(path, silo=SILO, epsilon_budget=1.0, delta_budget=1e-5)
    assert ledger.open_reservations == (words[1],)
    (charge,) = ledger.charges
    assert (charge.settled, charge.epsilon, charge.delta, charge.purpose) == (False, 0.7, 2e-6, "train:killed")
    assert ledger.spent_epsilon == 0.7 and ledger.remaining_epsilon == pytest.approx(0.3)
    ledger.reserve(purpose="train:next", epsilon=0.3, delta=0.0)  # the lock was not left held
    assert ledger.remaining_epsilon == pytest.approx(0.0)
