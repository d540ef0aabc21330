"""A party's append-only audit log: SQLite entries that are the leaves of an RFC 6962 Merkle tree.

Every call a party serves or makes is one entry (`record`), committed before
the call's answer is used: SQLite in WAL mode with `synchronous=FULL`, so a
committed entry survives `kill -9` and a power cut, and an interrupted write
leaves nothing behind (the transaction never committed). Each entry's body is
canonical JSON holding its own index and the Merkle root of every entry
before it (`prev_root`), so `mor audit verify` can name the first entry that
was altered, removed, reordered or inserted, not only say that a root
differs. Checkpoints (the party's signed tree heads, `checkpoints.py`) are
written every `checkpoint_every_entries` (at most 256) entries or
`checkpoint_every_seconds`, and at `close`; a silo writes one per entry,
since each answer carries its latest checkpoint to the coordinator. Each
states that cadence (`Checkpoint.signs_every`), which verify holds the log
to; a writer opening a log last signed at another cadence signs at once.
A writer never signs over what its newest checkpoint does not vouch for:
it refuses to extend a log whose newest checkpoint does not verify, does
not match its entries, or is followed by more entries than its cadence
leaves unsigned (entries rewritten after their checkpoints were deleted).

Entries hold digests and counts, never raw images, prompts or scores: the
caller builds the event, and this module refuses nothing but keys it owns.
One process writes a log: a writer holds `<log>.lock` (flock) from opening
to `close`, so a second one is refused when it opens, before it could
append (and the first, still running, find its next entry taken); if the
lock file is deleted meanwhile, the clash of two writers' entries is still
detected and refused.
"""

from __future__ import annotations

import fcntl
import math
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .checkpoints import (MAX_CHECKPOINT_INTERVAL, Checkpoint, CheckpointError, CheckpointSigner, SignedCheckpoint,
                          canonical_json, key_id, verify_checkpoint)
from .merkle import MerkleTree, leaf_hash
from .store import (CERTIFICATES_QUERY, CHECKPOINT_COLUMNS, FORMAT, SCHEMA, AuditLogError, connect, stored_certificate,
                    stored_entries)

# The keys this module writes into every entry; an event may not set them itself.
OWN_KEYS = ("index", "prev_root")
# A coordinator writes a checkpoint at least this often; 256 entries is ~2 GRPO steps' calls of the demo. It is also
# the most any writer may wait (`checkpoints.MAX_CHECKPOINT_INTERVAL`): `mor audit verify` refuses a log whose newest
# unsigned stretch is longer than its newest checkpoint's cadence allows, since only a removed checkpoint can leave one.
DEFAULT_CHECKPOINT_ENTRIES = MAX_CHECKPOINT_INTERVAL
DEFAULT_CHECKPOINT_SECONDS = 30.0


class AuditLog:
    """The writing side of one party's log (thread-safe; one process per log)."""

    def __init__(self, path: str | Path, signer: CheckpointSigner, *,
                 checkpoint_every_entries: int = DEFAULT_CHECKPOINT_ENTRIES,
                 checkpoint_every_seconds: float = DEFAULT_CHECKPOINT_SECONDS) -> None:
        if not 1 <= checkpoint_every_entries <= DEFAULT_CHECKPOINT_ENTRIES or checkpoint_every_seconds <= 0:
            raise ValueError(f"checkpoint_every_entries must be 1 to {DEFAULT_CHECKPOINT_ENTRIES} (mor audit verify "
                             "refuses a longer unsigned stretch) and checkpoint_every_seconds > 0")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.signer = signer
        self.checkpoint_every_entries = checkpoint_every_entries
        self.checkpoint_every_seconds = checkpoint_every_seconds
        self._lock = threading.Lock()
        self._tree = MerkleTree()
        self._writer_lock = _writer_lock(self.path)
        # A log dropped without close() (a start that failed part way) still lets go of its lock.
        self._release_lock = weakref.finalize(self, os.close, self._writer_lock)
        self._closed = False
        self._failed_commit_in_wal = False
        self._connection: sqlite3.Connection | None = None
        try:
            self._connection = connect(self.path, read_only=False)
            self._initialise()
            self._load()
        except BaseException as exc:
            if self._connection is not None:
                self._connection.close()
            self._release_lock()
            if isinstance(exc, sqlite3.DatabaseError):  # not a database, a directory, a read-only file
                raise _unopenable(self.path, exc) from None
            raise

    @classmethod
    def for_kit(cls, path: str | Path, kit, **kwargs) -> AuditLog:
        """The log at `path`, checkpoints signed with `kit`'s key."""
        return cls(path, CheckpointSigner.from_kit(kit), **kwargs)

    # --- opening -------------------------------------------------------------------------
    def _initialise(self) -> None:
        c = self._connection
        c.executescript(SCHEMA)
        meta = dict(c.execute("SELECT key, value FROM meta"))
        if not meta:
            with self._transaction():
                c.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                              [("format", FORMAT), ("party", self.signer.party)])
            meta = {"format": FORMAT, "party": self.signer.party}
        if meta.get("format") != FORMAT:
            raise AuditLogError(f"{self.path}: not a {FORMAT} log (format {meta.get('format')!r})")
        if meta.get("party") != self.signer.party:
            raise AuditLogError(f"{self.path} is the log of {meta.get('party')}, not of {self.signer.party}; "
                                "each party keeps its own log")
        with self._transaction():
            self._store_certificate()

    def _load(self) -> None:
        """Rebuild the tree from the stored entries, refusing to extend a log that is already damaged."""
        for position, entry in enumerate(stored_entries(self.path, self._connection)):
            seq, body, stored_leaf, fields = entry.seq, entry.body, entry.leaf_hash, entry.fields()
            if (seq != position or leaf_hash(body) != stored_leaf or fields.get("index") != position
                    or fields.get("prev_root") != self._tree.root().hex()):
                raise AuditLogError(f"{self.path}: entry {position} does not check out, so the log will not be "
                                    "extended; run `mor audit verify` on it and keep the file as evidence")
            self._tree.append(stored_leaf)
        last = self._connection.execute(f"SELECT size, {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY seq DESC "
                                        "LIMIT 1").fetchone()
        self._checkpointed_size = last[0] if last else -1
        self._latest_checkpoint = SignedCheckpoint(last[1], last[2]) if last else None
        # Checkpoint times never go back, even if the clock did while the party was down (verify checks the order).
        certificates = [stored_certificate(self.path, pem) for (pem,) in self._connection.execute(CERTIFICATES_QUERY)]
        own = _own_checkpoint(self._latest_checkpoint, certificates)
        self._refuse_unsigned_changes(last is not None, own)
        self._last_checkpoint_time = own.time if own else 0.0
        # The cadence runs on the monotonic clock: a wall clock stepped back (NTP) would hold it up that long.
        self._checkpointed_at = time.monotonic() if last else -math.inf
        if own is not None and own.signs_every != self.checkpoint_every_entries:
            # A writer with another cadence (or one from before checkpoints stated it) signed last: say this one's
            # now, before the unsigned stretch it may leave outgrows what the last checkpoint allows.
            with self._atomically():
                self._write_checkpoint()

    def _refuse_unsigned_changes(self, any_checkpoint: bool, newest: Checkpoint | None) -> None:
        """Refuse to extend a log its newest checkpoint does not vouch for, before this writer signs over it.

        Extended, it would be signed as it is: entries rewritten after their
        checkpoints were deleted (no key needed) would then verify. So the
        newest checkpoint must verify, match the entries it covers, and be
        followed by no more entries than its writer leaves unsigned (for a
        silo, none), as `mor audit verify` checks.
        """
        evidence = "so the log will not be extended; run `mor audit verify` on it and keep the file as evidence"
        if any_checkpoint and newest is None:
            raise AuditLogError(f"{self.path}: its newest checkpoint does not verify under the certificates stored "
                                f"in it, {evidence}")
        if newest is None:
            return
        if newest.size > self._tree.size or self._tree.root_at(newest.size) != newest.root:
            raise AuditLogError(f"{self.path}: its entries are not those its newest checkpoint (size {newest.size}) "
                                f"signed, {evidence}")
        if self._tree.size - newest.size > newest.unsigned_allowed:
            raise AuditLogError(f"{self.path}: {self._tree.size - newest.size} entries follow its newest checkpoint "
                                f"(size {newest.size}), more than the {newest.unsigned_allowed} its writer leaves "
                                f"unsigned: newer checkpoints were removed, {evidence}")

    def _transaction(self):
        return _Transaction(self._connection)

    # --- writing -------------------------------------------------------------------------
    @property
    def party(self) -> str:
        return self.signer.party

    @property
    def size(self) -> int:
        with self._lock:
            return self._tree.size

    def record(self, event: Mapping[str, Any]) -> int:
        """Append `event` (JSON values, digests not data) as the next entry; returns its index once durable."""
        clashes = [key for key in OWN_KEYS if key in event]
        if clashes:
            raise ValueError(f"audit events may not set {clashes}; the log writes them")
        with self._lock:
            if self._closed:
                raise AuditLogError(f"{self.path}: the log is closed")
            index = self._tree.size
            fields = {"time": time.time(), **event, "index": index, "prev_root": self._tree.root().hex()}
            body = canonical_json(fields)
            leaf = leaf_hash(body)
            due = (index + 1 - max(self._checkpointed_size, 0) >= self.checkpoint_every_entries
                   or time.monotonic() - self._checkpointed_at >= self.checkpoint_every_seconds)
            with self._atomically():
                self._insert_entry(index, body, leaf)
                self._tree.append(leaf)
                if due:
                    self._write_checkpoint(checked=True)
            return index

    @contextmanager
    def _atomically(self) -> Iterator[None]:
        """One transaction; if anything in it fails, its COMMIT included, the in-memory tree, checkpoint and
        signer go back to what is on disk, so no checkpoint is ever handed out over an entry that is not."""
        if self._failed_commit_in_wal and not self._discard_failed_commit():
            raise AuditLogError(f"{self.path}: a write that failed (a disk I/O error) may still be in the log's WAL "
                                "file, where a crash would bring it back as written; nothing more is recorded until "
                                "SQLite can sync the log again (check the disk)")
        mark = self._tree.mark()
        saved = (self._checkpointed_size, self._checkpointed_at, self._last_checkpoint_time,
                 self._latest_checkpoint, self.signer)
        transaction = self._transaction()
        try:
            with transaction:
                yield
        except BaseException:
            self._tree.rewind(mark)
            (self._checkpointed_size, self._checkpointed_at, self._last_checkpoint_time,
             self._latest_checkpoint, self.signer) = saved
            if transaction.commit_failed:
                self._failed_commit_in_wal = not self._discard_failed_commit()
            raise

    def _discard_failed_commit(self) -> bool:
        """Drop what a failed COMMIT left in the WAL file; whether that worked.

        A COMMIT whose sync failed (EIO) leaves its frames, commit marker included, past the end SQLite's WAL
        index knows: rolled back in this process, but the recovery after a crash reads them as committed, and
        the entry of a call that was refused would come back as written. Folding the WAL into the database and
        truncating it to nothing (it needs the sync to work again) removes them.
        """
        try:
            busy = self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.DatabaseError:
            return False
        return busy == 0

    def checkpoint(self) -> SignedCheckpoint | None:
        """Sign and store a checkpoint of the current tree if it grew since the last one; the latest one."""
        with self._lock:
            if self._tree.size != self._checkpointed_size:
                with self._atomically():
                    self._write_checkpoint()
            return self._latest_checkpoint

    def latest_checkpoint(self) -> SignedCheckpoint | None:
        """The newest stored checkpoint (None before the first)."""
        with self._lock:
            return self._latest_checkpoint

    def close(self) -> None:
        """Write a final checkpoint and close (idempotent)."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._tree.size != self._checkpointed_size:
                    with self._atomically():
                        self._write_checkpoint()
            finally:
                self._closed = True
                self._connection.close()
                self._release_lock()  # and with it the lock

    def _store_certificate(self) -> None:
        """Keep the signer's certificate in the log, so a reviewer can check every checkpoint, renewals included."""
        pem = self.signer.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        self._connection.execute("INSERT OR IGNORE INTO certificates(key, pem) VALUES (?, ?)",
                                 (key_id(self.signer.certificate.public_key()), pem))

    def _write_checkpoint(self, *, checked: bool = False) -> None:
        if not checked:
            self._check_single_writer(self._tree.size)  # never sign a tree head another writer has moved past
        renewed = self.signer.refreshed()
        if renewed is not self.signer:
            self.signer = renewed
            self._store_certificate()
        stamped = max(time.time(), self._last_checkpoint_time)  # a clock stepped back (NTP) must not reorder heads
        signed = self.signer.sign(size=self._tree.size, root=self._tree.root(), time=stamped,
                                  signs_every=self.checkpoint_every_entries)
        self._connection.execute("INSERT INTO checkpoints(size, body, signature) VALUES (?, ?, ?)",
                                 (self._tree.size, signed.body, signed.signature))
        self._checkpointed_size, self._checkpointed_at, self._last_checkpoint_time = (self._tree.size,
                                                                                    time.monotonic(), stamped)
        self._latest_checkpoint = signed

    def _insert_entry(self, index: int, body: bytes, leaf: bytes) -> None:
        try:
            self._connection.execute("INSERT INTO entries(seq, body, leaf_hash) VALUES (?, ?, ?)", (index, body, leaf))
        except sqlite3.IntegrityError:
            # Only a row with this seq can clash, so another writer appended it: say so in the usual words. The
            # primary key is the check on this path (a SELECT per entry would cost another 0.02 ms a call).
            self._check_single_writer(index)
            raise

    def _check_single_writer(self, index: int) -> None:
        # The newest seq, not COUNT(*): O(log n) on the primary key, so appending stays cheap as the log grows.
        last = self._connection.execute("SELECT seq FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        stored = 0 if last is None else last[0] + 1
        if stored != index:
            raise AuditLogError(f"{self.path}: holds {stored} entries but this writer expected {index}: another "
                                "process is appending to the same log; each party runs one writer")


def _writer_lock(path: Path) -> int:
    """The open, flock-held `<log>.lock` of the one process writing `path` (AuditLogError if another holds it)."""
    real = path.resolve()  # one lock per file, however it is reached (a symlink)
    lock = real.with_name(f"{real.name}.lock")
    try:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise AuditLogError(f"{path}: cannot open the audit log for writing ({exc.strerror}: {lock}); check the "
                            "directory exists and the party may write there") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise AuditLogError(f"{path}: another process is writing this log ({lock} is locked); each party runs "
                            "one writer") from None
    return descriptor


def _unopenable(path: Path, exc: sqlite3.DatabaseError) -> AuditLogError:
    return AuditLogError(f"{path}: cannot open the audit log for writing ({exc}); check that it is a mor-secure "
                         "audit log and that the party may write the file and its directory")


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (nothing half-written)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self.commit_failed = False

    def __enter__(self) -> None:
        self._connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            try:
                self._connection.execute("COMMIT")
            except BaseException:
                self.commit_failed = True
                # A COMMIT that fails (disk full, I/O error) may leave the transaction open: end it, so the
                # next one starts from what is on disk.
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                raise
        elif self._connection.in_transaction:
            self._connection.execute("ROLLBACK")


def _own_checkpoint(signed: SignedCheckpoint | None, certificates: list[x509.Certificate]) -> Checkpoint | None:
    """The newest checkpoint if it is this log's own (signed under a certificate stored in it), else None."""
    if signed is None:
        return None
    try:
        return verify_checkpoint(signed, certificates)
    except CheckpointError:  # forged or damaged: `mor audit verify` names it; nothing in it is to be trusted
        return None

