"""What a silo writes that is for its own account only is created so, whatever the umask: its workdir 0700, its
local diagnostics and its audit log (with SQLite's -wal and -shm files) 0600."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mor_secure.audit import AuditLog
from mor_secure.pki.files import PRIVATE_FILE_MODE, replace_file
from silo_agent.cli import main
from silo_agent import training

SILO_YAML = "name: hospital-a\nconsortium: consortium.yaml\nworkdir: work/hospital-a\narchitecture: small_cnn\n"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o000, 0o022], ids=["umask-000", "umask-022"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The test runs under this umask (000: every file the OS creates is open to all unless its mode says not)."""
    before = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(before)


def test_init_creates_the_workdir_for_its_owner_only(tmp_path: Path, consortium_path: Path, umask: int) -> None:
    shutil.copy(consortium_path, tmp_path / "consortium.yaml")
    (tmp_path / "hospital-a.yaml").write_text(SILO_YAML, encoding="utf-8")
    assert main(["init", "--config", str(tmp_path / "hospital-a.yaml")]) == 0
    assert mode_of(training.load_silo_config(tmp_path / "hospital-a.yaml").workdir) == 0o700


def test_an_existing_workdir_keeps_its_mode(tmp_path: Path, consortium_path: Path, umask: int) -> None:
    """The operator's own choice for a directory they made is not overruled."""
    shutil.copy(consortium_path, tmp_path / "consortium.yaml")
    (tmp_path / "hospital-a.yaml").write_text(SILO_YAML, encoding="utf-8")
    workdir = tmp_path / "work" / "hospital-a"
    workdir.mkdir(parents=True)
    os.chmod(workdir, 0o750)
    assert main(["init", "--config", str(tmp_path / "hospital-a.yaml")]) == 0
    assert mode_of(workdir) == 0o750


def test_private_text_is_written_0600_also_over_a_wider_file(tmp_path: Path, umask: int) -> None:
    """How `mor silo train` writes local_diagnostics.json: exact statistics of the private data."""
    path = tmp_path / "local_diagnostics.json"
    replace_file(path, b"{}", mode=PRIVATE_FILE_MODE)
    assert mode_of(path) == 0o600 and path.read_text(encoding="utf-8") == "{}"
    os.chmod(path, 0o644)  # a diagnostics file from before this was fixed
    replace_file(path, b'{"train_pairs": 3}', mode=PRIVATE_FILE_MODE)
    assert mode_of(path) == 0o600 and path.read_text(encoding="utf-8") == '{"train_pairs": 3}'


def test_a_new_audit_log_and_its_wal_and_shm_files_are_0600(tmp_path: Path, pki, umask: int) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog.for_kit(path, pki.kits["hospital-a"])
    try:
        log.record({"event": "call", "side": "server", "rpc": "/x/Score", "request_digest": "0" * 64, "items": 1})
        files = [path, path.with_name("audit.db-wal"), path.with_name("audit.db-shm")]
        assert all(p.is_file() for p in files)  # the log is open, so SQLite keeps its WAL and shared memory
        assert {p.name: mode_of(p) for p in files} == {p.name: 0o600 for p in files}
    finally:
        log.close()


def test_an_existing_audit_log_keeps_its_mode(tmp_path: Path, pki) -> None:
    path = tmp_path / "audit.db"
    AuditLog.for_kit(path, pki.kits["hospital-a"]).close()
    os.chmod(path, 0o640)
    AuditLog.for_kit(path, pki.kits["hospital-a"]).close()
    assert mode_of(path) == 0o640
