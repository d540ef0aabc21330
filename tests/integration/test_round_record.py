"""The silo's record of answered and decrypted round ids (`RoundRecord`): read back whole, written whole, one writer.

Real files, real `flock`, a real second process, and a real short write: a
child process under RLIMIT_FSIZE, the kernel's "disk full" for one file.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from silo_agent import secure_rounds
from silo_agent.secure_rounds import RoundRecord


def test_a_round_record_that_cannot_be_read_refuses_the_start_and_a_cut_short_last_line_is_dropped(
        tmp_path: Path) -> None:
    record = tmp_path / "secure_rounds.jsonl"
    record.write_text('{"answered": "r1"}\nnot a round id\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not a round record; the silo will not start"):
        RoundRecord(record)
    # A crash between writing a line and its newline: that round's answer never left, so it is not a round seen.
    record.write_text('{"answered": "r1"}\n{"answered": "r2', encoding="utf-8")
    rounds = RoundRecord(record)  # the refused opening above let its lock go
    assert (rounds.seen("answered", "r1"), rounds.seen("answered", "r2")) == (True, False)
    rounds.add("decrypted", "r1")
    assert record.read_text(encoding="utf-8") == '{"answered": "r1"}\n{"decrypted": "r1"}\n'
    rounds.close()


def run_python(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_a_second_process_on_the_same_record_is_refused_until_the_first_closes_it(tmp_path: Path) -> None:
    """Two silo servers on one workdir would each read the record once and each answer a round id once."""
    path = tmp_path / "secure_rounds.jsonl"
    second_server = """
        import sys
        from silo_agent.secure_rounds import RoundRecord
        try:
            RoundRecord(sys.argv[1]).add("answered", "r1")
        except ValueError as error:
            sys.exit(f"refused: {error}")
        print("answered r1")
    """
    first = RoundRecord(path)
    child = run_python(second_server, str(path))
    assert child.returncode == 1 and "is in use by another process serving this workdir" in child.stderr, child
    with pytest.raises(ValueError, match="is in use by another process"):  # within one process too
        RoundRecord(path)
    first.add("answered", "r0")  # the holder still records
    first.close()
    child = run_python(second_server, str(path))
    assert (child.returncode, child.stdout) == (0, "answered r1\n"), child
    reopened = RoundRecord(path)
    assert reopened.seen("answered", "r0") and reopened.seen("answered", "r1")
    reopened.close()


def test_a_write_cut_short_by_a_full_disk_leaves_only_whole_lines(tmp_path: Path) -> None:
    """The failed id is not recorded (its answer never leaves); the next one is a line of its own, so the record
    still opens at the next start with every id that was answered."""
    path = tmp_path / "secure_rounds.jsonl"
    child = run_python("""
        import os, resource, signal, sys
        from silo_agent.secure_rounds import RoundRecord
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal, as on a full disk
        record = RoundRecord(sys.argv[1])
        record.add("answered", "r1")
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(sys.argv[1]) + 10, hard))
        try:
            record.add("answered", "a round id longer than the ten bytes left")
        except OSError as error:
            print("refused:", error.errno == 27)
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # room again
        record.add("answered", "r3")
        print("seen:", record.seen("answered", "a round id longer than the ten bytes left"))
    """, str(path))
    assert (child.returncode, child.stdout) == (0, "refused: True\nseen: False\n"), child
    assert path.read_text(encoding="utf-8") == '{"answered": "r1"}\n{"answered": "r3"}\n'
    rounds = RoundRecord(path)
    assert (rounds.seen("answered", "r1"), rounds.seen("answered", "r3")) == (True, True)
    rounds.close()


def test_a_record_replaced_while_serving_refuses_every_later_round_and_a_second_opening_keeps_its_lock(
        tmp_path: Path) -> None:
    """The lock is on the file, not its name: after a restore from backup, `sed -i` or rsync put a new file in
    place, the serving silo must not append to the file no longer in place (those ids would be lost at its next
    start), and a second opening must not hold a lock on a file that is no longer the record."""
    path = tmp_path / "secure_rounds.jsonl"
    first = RoundRecord(path)
    first.add("answered", "r1")
    replacement = tmp_path / "restored.jsonl"
    replacement.write_text('{"answered": "r1"}\n', encoding="utf-8")
    replacement.replace(path)
    with pytest.raises(OSError, match="was replaced or removed while the silo serves; restart the silo"):
        first.add("answered", "r2")
    with pytest.raises(OSError, match="restart the silo"):  # refused from then on, not only once
        first.add("answered", "r3")
    assert path.read_text(encoding="utf-8") == '{"answered": "r1"}\n'
    second = RoundRecord(path)  # the restart: the file in place now is unlocked
    assert second.seen("answered", "r1") and not second.seen("answered", "r2")
    with pytest.raises(ValueError, match="is in use by another process"):  # and it is this file's lock it holds
        RoundRecord(path)
    second.close()
    first.close()
    third = RoundRecord(path)
    path.unlink()
    with pytest.raises(OSError, match="was replaced or removed while the silo serves"):
        third.add("answered", "r4")
    third.close()


def test_a_record_replaced_between_opening_and_locking_is_opened_again(tmp_path: Path, monkeypatch) -> None:
    """The race a test cannot time: the file is swapped at the moment of the lock (a fake flock around the real
    one, which is what this test is about), so the opening must lock and read the file in place, not the old one."""
    path = tmp_path / "secure_rounds.jsonl"
    path.write_text('{"answered": "old"}\n', encoding="utf-8")
    real_flock, swaps = secure_rounds.fcntl.flock, []

    def flock_after_a_swap(fd: int, operation: int) -> None:
        if not swaps:
            swaps.append(fd)
            (tmp_path / "new.jsonl").write_text('{"answered": "new"}\n', encoding="utf-8")
            (tmp_path / "new.jsonl").replace(path)
        real_flock(fd, operation)

    monkeypatch.setattr(secure_rounds.fcntl, "flock", flock_after_a_swap)
    rounds = RoundRecord(path)
    assert (rounds.seen("answered", "new"), rounds.seen("answered", "old")) == (True, False)
    rounds.add("answered", "r1")
    assert path.read_text(encoding="utf-8") == '{"answered": "new"}\n{"answered": "r1"}\n'
    rounds.close()
