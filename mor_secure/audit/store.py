"""The SQLite file of a party's audit log: its tables, how it is opened, and reading it whole (`read_log`).

Opened for writing in WAL mode with `synchronous=FULL` (a committed entry
survives `kill -9` and a power cut; `log.AuditLog` writes it); opened
read-only, in one read transaction, for `mor audit verify`, `reconcile` and
`report`, which may read a live party's log. A SQLite file holding any other
table is not a log and is never written to.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from mor_secure.pki.files import PRIVATE_FILE_MODE
from mor_secure.pki.kits import identity_of

from .checkpoints import SignedCheckpoint, parse_json

FORMAT = "mor-secure/audit-log/v1"

# SQLite folds its WAL into the database every this many pages (default 1000), and the next commit then reuses
# the WAL file from its start. A commit that overwrites WAL bytes already on disk is fsynced without a journal
# commit for the file's growth: 0.10 to 0.19 ms here against 0.20 to 0.32 ms for one that appends. With the
# default, a silo's first ~400 entries after every start append (each is 2 to 3 pages) and a coordinator's
# first ~1000; with 100 pages (400 KB) it is the first ~40 and ~100, and a fold every 40 to 100 entries costs
# less than the appends it saves: timed right after a forward pass over 800 entries, folds included, 0.13 ms
# less per silo entry and 0.14 ms less per coordinator entry (docs/benchmarks.md, "Audit log").
WAL_CHECKPOINT_PAGES = 100

# The tables of a log; a SQLite file holding any other is not one, and is never written to.
_TABLES = frozenset({"meta", "entries", "checkpoints", "certificates"})
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (seq INTEGER PRIMARY KEY, body BLOB NOT NULL, leaf_hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (seq INTEGER PRIMARY KEY, size INTEGER NOT NULL, body BLOB NOT NULL,
                                        signature BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS certificates (key TEXT PRIMARY KEY, pem TEXT NOT NULL);
"""
# As blobs whatever their storage class: a body rewritten as TEXT (the sqlite3 shell, a script) reads as its bytes,
# and verification then names the altered entry instead of failing on the type; a NULL (in a table rebuilt without
# its NOT NULL) reads as no bytes, which no entry, checkpoint or certificate the log writes is.
_ENTRIES_QUERY = ("SELECT seq, COALESCE(CAST(body AS BLOB), X''), COALESCE(CAST(leaf_hash AS BLOB), X'') "
                  "FROM entries ORDER BY seq")
CHECKPOINT_COLUMNS = "COALESCE(CAST(body AS BLOB), X''), COALESCE(CAST(signature AS BLOB), X'')"
_CHECKPOINTS_QUERY = f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY seq"
CERTIFICATES_QUERY = "SELECT COALESCE(CAST(pem AS BLOB), X'') FROM certificates ORDER BY rowid"


class AuditLogError(RuntimeError):
    """The log cannot be opened or appended to safely (another party's log, damaged, a second writer)."""


@dataclass(frozen=True)
class StoredEntry:
    """One row of the entries table, as stored (not yet checked)."""

    seq: int
    body: bytes
    leaf_hash: bytes

    def fields(self) -> dict[str, Any]:
        """The entry's JSON fields ({} when the body does not parse: verification says why)."""
        try:
            value = parse_json(self.body)
        except ValueError:  # UnicodeDecodeError is one
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class StoredLog:
    """Everything a log file holds, read without changing it."""

    path: Path
    party: str
    entries: tuple[StoredEntry, ...]
    checkpoints: tuple[SignedCheckpoint, ...]
    certificates: tuple[x509.Certificate, ...]

    def certificates_issued_by(self, ca: x509.Certificate) -> list[x509.Certificate]:
        """The certificates this log holds that the consortium CA issued to the log's own party (a renewed
        kit's old ones too): the keys its checkpoints may be signed with."""
        trusted = []
        for certificate in self.certificates:
            try:
                certificate.verify_directly_issued_by(ca)
                if identity_of(certificate).uri == self.party and isinstance(certificate.public_key(),
                                                                            ec.EllipticCurvePublicKey):
                    trusted.append(certificate)
            except (ValueError, TypeError, InvalidSignature):  # not issued by this CA, or names no party
                continue
        return trusted


def connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    if read_only:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no audit log there")
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    _create_private(path)
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # Before anything writes (the switch to WAL rewrites the file's header): another database is left as it was.
    foreign = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
               if not name.startswith("sqlite_")} - _TABLES  # sqlite_stat1 etc. are SQLite's own (ANALYZE)
    if foreign:
        connection.close()
        raise AuditLogError(f"{path} is a SQLite database but not an audit log (it holds {', '.join(sorted(foreign))}"
                            "); it is left as it was: point the party at its own log file")
    mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise AuditLogError(f"{path}: SQLite would not switch to WAL mode (got {mode}); put the log on a local disk")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    return connection


def _create_private(path: Path) -> None:
    """Create a missing log file empty and mode 0600, whatever the umask: SQLite would create it 0644, and gives
    its -wal and -shm files the database file's mode. The log names every caller and call of the party."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:  # an existing log keeps the mode its owner gave it
        return
    except OSError as exc:
        raise AuditLogError(f"{path}: cannot open the audit log for writing ({exc.strerror}); check that the party "
                            "may write its directory") from None
    try:
        os.fchmod(descriptor, PRIVATE_FILE_MODE)
    finally:
        os.close(descriptor)


def read_log(path: str | Path) -> StoredLog:
    """The log at `path`, read-only (a reviewer's copy, or a live party's log)."""
    path = Path(path)
    connection = connect(path, read_only=True)
    try:
        # One read transaction: every SELECT sees the same snapshot, so a live party's commit between
        # two of them cannot show a checkpoint beyond the entries read (which would look like a truncation).
        connection.execute("BEGIN")
        meta = dict(connection.execute("SELECT key, value FROM meta"))
        if meta.get("format") != FORMAT:
            raise AuditLogError(f"{path}: not a {FORMAT} log (format {meta.get('format')!r})")
        entries = stored_entries(path, connection)
        checkpoints = tuple(SignedCheckpoint(body, signature) for body, signature in connection.execute(
            _CHECKPOINTS_QUERY))
        certificates = tuple(stored_certificate(path, pem) for (pem,) in connection.execute(CERTIFICATES_QUERY))
    except sqlite3.DatabaseError as exc:
        raise AuditLogError(f"{path}: not a readable audit log ({exc})") from None
    finally:
        connection.close()
    return StoredLog(path=path, party=meta.get("party", ""), entries=entries, checkpoints=checkpoints,
                     certificates=certificates)


def stored_entries(path: Path, connection: sqlite3.Connection) -> tuple[StoredEntry, ...]:
    """The entries table as stored; AuditLogError naming the row if one's number is not an integer (the table was
    rebuilt without its INTEGER PRIMARY KEY: no numbering, order or gap can be read from it)."""
    entries = []
    for position, (seq, body, leaf) in enumerate(connection.execute(_ENTRIES_QUERY)):
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise AuditLogError(f"{path}: the entry stored at position {position} is numbered {seq!r:.40}, not by "
                                "an integer: the entries table was altered; keep the file as evidence")
        entries.append(StoredEntry(seq, body, leaf))
    return tuple(entries)


def stored_certificate(path: Path, pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise AuditLogError(f"{path}: a certificate stored in the log does not parse ({exc})") from None
