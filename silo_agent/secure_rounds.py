"""The silo's side of secure aggregation: one masked, encrypted answer per round; each round decrypted once.

`SecureScore` (DESIGN §4 step 3): the silo checks the round (a round id it
has not answered; at least its policy's `minimum_participants` silos, itself
among them; every participant's key-agreement key signed by that silo's
consortium certificate, so the coordinator cannot swap one, and that
certificate unrevoked on the silo server's CRL and within its validity
window, since a revoked kit's holder could unmask this silo's terms), scores and
pre-weights through the same `SiloService` checks as a clear Score (objective,
weights and their cap, limits), adds its pairwise masks for this round and
participant set, packs the terms into one BFV vector and encrypts it. Alone,
the ciphertext decrypts to values uniform mod t.

`Decrypt` (step 4): the round's decryptor, one of its participants,
decrypts the coordinator's blinded sum (one ciphertext) once per round id,
and only for a round it took part in with at least the minimum
participants. It sees sum + blinding, uniformly random to it.

Both "once"s survive a restart: the masks depend only on the round id and
the participants, so a restarted silo that answered a round id again would
give two answers whose difference is its own terms. Every answered and
decrypted round id goes to an append-only record in the silo's workdir
(`RoundRecord`), flushed to disk before the answer leaves. A round id is
recorded as answered once its ciphertext is built, not when the round
arrives: a round refused on its checks is not one the silo took part in,
so it decrypts nothing for it (it is held in memory meanwhile, so a
concurrent replay is refused too).

Scores of a DP-trained model are post-processing: a secure round spends no
privacy budget, like a clear one.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from mor_secure.pki.identity import Role
from mor_secure.pki.kits import CertKit, identity_of
from mor_secure.secagg import aggregation, masks
from mor_secure.secagg.agreement import AgreementKeyError, SignedAgreementKey, verified_agreement_key
from mor_secure.secagg.fixed_point import MAX_PARTICIPANTS
from mor_secure.secagg.he_context import SLOTS
from mor_secure.secagg.provisioning import silo_agreement, silo_context
from mor_secure.transport.revocation import RevocationList
from mor_secure.wire.errors import ErrorCode, SiloError, invalid
from mor_secure.wire.messages import (
    AgreementKeyReply,
    DecryptReply,
    DecryptRequest,
    SecureScoreReply,
    SecureScoreRequest,
)

from .service import SiloService

# Round ids remembered for replay refusal: a GRPO run makes ~600 rounds, a year of daily runs well under this.
REMEMBERED_ROUNDS = 1_000_000
# The record of answered and decrypted round ids, in the silo's workdir (`RoundRecord`).
ROUND_RECORD = "secure_rounds.jsonl"


def no_secure_rounds(name: str):
    """The refusal of a silo whose kit holds no secure-aggregation material."""
    raise SiloError(ErrorCode.FAILED_PRECONDITION, f"silo {name!r} has no secure-aggregation keys in its kit; "
                    "provision them with `mor pki init` (or `mor pki issue`)")


def check_participant_count(count: int) -> None:
    """At most MAX_PARTICIPANTS participants (INVALID_ARGUMENT); the servicer checks it before converting them."""
    if count > MAX_PARTICIPANTS:
        raise invalid(f"a secure round has at most {MAX_PARTICIPANTS} participants (its sum would overflow "
                      f"the fixed-point range); this one has {count}")


def check_ciphertext_count(count: int) -> None:
    """A Decrypt carries exactly one ciphertext (INVALID_ARGUMENT)."""
    if count != 1:
        raise invalid(f"a Decrypt request carries one ciphertext, the round's blinded sum; this one has {count}")


class _Seen:
    """A bounded set of round ids (oldest forgotten first)."""

    def __init__(self) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, round_id: str) -> bool:
        return round_id in self._ids

    def add(self, round_id: str) -> None:
        self._ids[round_id] = None
        while len(self._ids) > REMEMBERED_ROUNDS:
            self._ids.popitem(last=False)


class RoundRecord:
    """The round ids a silo answered and decrypted, kept across restarts: one JSON line per id, appended.

    Opening it reads every earlier id back; a record that cannot be read or
    holds a line that is not a round id refuses the start (starting empty
    would answer every earlier round again). A last line without its newline
    is a write cut short by a crash: its answer never left (each line is on
    disk before its answer is sent), so it is dropped. A missing file is a
    first start.

    The record is the only memory of what was answered, so it has one
    writer: it holds an exclusive lock on the file until `close()` (or the
    process's end), and a second opening, by another `mor silo serve` on
    the same workdir or within one process, is refused. Two processes each
    reading the record at start would each answer a round id once.
    `flock` locks a file, not a name, so the file is checked to be still
    the one at `path` when locked and before every write (`add`).
    """

    KINDS = ("answered", "decrypted")
    # A file put in place between opening and locking is opened again; more than this many in a row is not an
    # accident of timing but something rewriting the record in a loop.
    _OPEN_ATTEMPTS = 5

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen = {kind: _Seen() for kind in self.KINDS}
        self._refusal: str | None = None  # why every add is refused until a restart, once one is
        self._file = self._open_locked()
        try:
            self._read()
        except BaseException:
            self.close()
            raise

    def _open_locked(self):
        """The record's file, locked, and still the file at `path` once locked (flock locks a file, not a name)."""
        for _ in range(self._OPEN_ATTEMPTS):
            # Unbuffered, appending: a failed write leaves no bytes in a buffer to land after the cut (see `add`).
            file = self.path.open("a+b", buffering=0)
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                raise ValueError(f"{self.path} is in use by another process serving this workdir; run one `mor "
                                 "silo serve` per workdir (two would each answer the same round id once)") from None
            if self._in_place(file):
                return file
            file.close()
        raise ValueError(f"{self.path} was replaced {self._OPEN_ATTEMPTS} times while the silo opened it; stop "
                         "whatever rewrites it (edit or restore the record only while the silo is stopped)")

    def _in_place(self, file) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(file.fileno())
        return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

    def _read(self) -> None:
        self._file.seek(0)
        data = self._file.read()  # the locked file, not whatever the name points to by now
        complete = data[:data.rfind(b"\n") + 1]
        for number, line in enumerate(complete.splitlines(), start=1):
            try:
                entry = json.loads(line)  # bytes: bad UTF-8 is a ValueError too
                ((kind, round_id),) = entry.items()
                if kind not in self.KINDS or not isinstance(round_id, str):
                    raise ValueError
            except (ValueError, AttributeError):
                raise ValueError(f"{self.path}: line {number} is not a round record; the silo will not start "
                                 "without the round ids it already answered (restore the file from backup)") from None
            self._seen[kind].add(round_id)
        if len(complete) < len(data):
            self._truncate(len(complete))

    def _truncate(self, size: int) -> None:
        os.ftruncate(self._file.fileno(), size)
        os.fsync(self._file.fileno())

    def seen(self, kind: str, round_id: str) -> bool:
        return round_id in self._seen[kind]

    def add(self, kind: str, round_id: str) -> None:
        """Record `round_id` as `kind` and wait until it is on disk (the answer may leave only after).

        A write that fails (a full disk) is cut back to the last whole line,
        so the next id does not land on its fragment (the record would then
        refuse the next start); if even that fails, every later add is
        refused until a restart, whose read drops the fragment. A record
        replaced or removed under the running silo (restored from backup,
        `sed -i`, rsync) refuses this and every later add too: the ids
        would go to a file the next start never reads.
        """
        if self._refusal is None and not self._in_place(self._file):
            # An id appended now would go to a file no longer in place and be forgotten at the next start.
            self._refusal = (f"{self.path} was replaced or removed while the silo serves; restart the silo (it "
                             "reads the record in place then; edit or restore the record only while it is stopped)")
        if self._refusal is not None:
            raise OSError(self._refusal)
        line = (json.dumps({kind: round_id}) + "\n").encode()
        size = os.fstat(self._file.fileno()).st_size
        try:
            written = 0
            while written < len(line):  # a short write (the disk filling up) is followed by the error
                written += self._file.write(line[written:])
            os.fsync(self._file.fileno())
        except OSError:
            try:
                self._truncate(size)
            except OSError:
                self._refusal = f"{self.path}: an earlier write failed and could not be undone; restart the silo"
            raise
        self._seen[kind].add(round_id)

    def close(self) -> None:
        """Release the record (and its lock); it is read again at the next start."""
        self._file.close()


class SecureRounds:
    """A silo's secure-aggregation answers, over its `SiloService` and its kit's secret material.

    `revocations` is the silo server's own CRL (the one it checks callers
    against), so a revocation reaches the participants it masks against as
    soon as it reaches its callers. `rounds` is the durable record of the
    round ids already answered and decrypted (`RoundRecord`).
    """

    def __init__(self, service: SiloService, kit: CertKit, *, minimum_participants: int,
                 revocations: RevocationList, rounds: RoundRecord) -> None:
        self.service = service
        self.revocations = revocations
        self.rounds = rounds
        self.name = service.name
        self._context = silo_context(kit)
        self._private, self._own_key = silo_agreement(kit)
        self._certificate_pem = kit.cert_path.read_bytes()
        self._ca = kit.ca_certificate()
        self.minimum_participants = minimum_participants
        self._lock = threading.Lock()
        self._answering: set[str] = set()  # round ids being answered now (recorded once their answer exists)

    def agreement_key(self) -> AgreementKeyReply:
        return AgreementKeyReply(agreement_key=self._own_key.to_json(), certificate_pem=self._certificate_pem)

    def _check_participants(self, names: list[str]) -> None:
        # The count first: the checks after it then look at no more than MAX_PARTICIPANTS names.
        check_participant_count(len(names))
        repeated = sorted(name for name, count in Counter(names).items() if count > 1)
        if repeated:
            raise invalid(f"participants repeat a silo: {repeated}")
        if self.name not in names:
            raise invalid(f"silo {self.name!r} is not among the round's participants {names}")
        if len(names) < self.minimum_participants:
            raise SiloError(ErrorCode.FAILED_PRECONDITION, f"a secure round needs at least "
                            f"{self.minimum_participants} participants under this silo's policy; this one has "
                            f"{len(names)} (with fewer, one silo's terms could be isolated)")

    def _peer_keys(self, request: SecureScoreRequest) -> dict:
        keys = {}
        for participant in request.participants:
            try:
                certificate = x509.load_pem_x509_certificate(participant.certificate_pem)
                certificate.verify_directly_issued_by(self._ca)
                identity = identity_of(certificate)
            except (ValueError, TypeError, InvalidSignature):
                raise SiloError(ErrorCode.PERMISSION_DENIED, f"participant {participant.name!r} has no certificate "
                                "issued by this consortium's CA") from None
            if (identity.role, identity.name) != (Role.SILO, participant.name):  # any name, even no party's
                raise SiloError(ErrorCode.PERMISSION_DENIED, f"participant {participant.name!r} came with the "
                                f"certificate of {identity}")
            self._check_current(participant.name, certificate)
            try:
                signed = SignedAgreementKey.from_json(participant.agreement_key)
                keys[participant.name] = verified_agreement_key(signed, certificate)
            except (AgreementKeyError, ValueError, KeyError, TypeError) as exc:
                raise SiloError(ErrorCode.PERMISSION_DENIED, f"participant {participant.name!r}: {exc}") from None
            if participant.name == self.name and signed.public_key != self._own_key.public_key:
                raise SiloError(ErrorCode.PERMISSION_DENIED, "this silo's own key-agreement key in the round is "
                                "not its key (swapped on the way, or fetched by the coordinator before the silo "
                                "was renewed with a new one: restart the coordinator)")
        return keys

    def _check_current(self, name: str, certificate: x509.Certificate) -> None:
        """Refuse a participant whose certificate is revoked, expired or not yet valid.

        PERMISSION_DENIED, like every other refusal of a relayed participant
        here: the caller (the coordinator) is authenticated, the round it asks
        for is not allowed (UNAUTHENTICATED would blame the caller's own
        certificate).
        """
        if self.revocations.is_revoked(certificate.serial_number):
            raise SiloError(ErrorCode.PERMISSION_DENIED, f"participant {name!r}: certificate "
                            f"{certificate.serial_number:x} is revoked on this silo's CRL")
        now = dt.datetime.now(dt.timezone.utc)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise SiloError(ErrorCode.PERMISSION_DENIED, f"participant {name!r}: certificate "
                            f"{certificate.serial_number:x} is valid only from "
                            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")

    def secure_score(self, request: SecureScoreRequest) -> SecureScoreReply:
        score = request.score
        if not score.round_id:
            raise invalid("a secure round needs a round id")
        if not score.weights:
            raise invalid("a secure round sends each silo its own weights; this request has none")
        if len(score.rows) > SLOTS:
            raise invalid(f"{len(score.rows)} rows in one secure round; one ciphertext holds at most {SLOTS}")
        self._check_participants([p.name for p in request.participants])
        with self._lock:
            if self.rounds.seen("answered", score.round_id) or score.round_id in self._answering:
                raise SiloError(ErrorCode.FAILED_PRECONDITION, f"round {score.round_id!r} was already answered; "
                                "a restart uses a new round id")
            self._answering.add(score.round_id)  # reserved now: a concurrent replay is refused too
        try:
            peers = self._peer_keys(request)
            terms = self.service.score(score).scores  # the same checks as a clear Score; pre-weighted
            mask = masks.mask(self._private, peers, me=self.name, round_id=score.round_id, count=len(terms))
            try:
                ciphertext = aggregation.contribution(terms, mask, self._context)
            except ValueError as exc:  # standardised scores are O(1), weights at most 1: only a broken model
                raise SiloError(ErrorCode.FAILED_PRECONDITION, f"silo {self.name!r} cannot encode its scores for "
                                f"round {score.round_id!r}: {exc}; check its reward model") from None
            # Recorded once there is an answer, and on disk before it leaves: a round refused above used no masks,
            # and it is not one this silo took part in, so it is not decrypted here either.
            self._record("answered", score.round_id)
        finally:
            with self._lock:
                self._answering.discard(score.round_id)
        return SecureScoreReply(ciphertexts=(ciphertext,))

    def decrypt(self, request: DecryptRequest) -> DecryptReply:
        self._check_participants(list(request.participants))
        check_ciphertext_count(len(request.ciphertexts))
        with self._lock:  # a replay is refused before it costs a decryption
            self._check_decryptable(request.round_id)
        # Decrypted before the round is marked, so a malformed request does not use up its one decryption; the
        # values leave only once the mark is on disk.
        try:
            values = tuple(int(v) for v in aggregation.decrypt(request.ciphertexts[0], self._context))
        except (ValueError, RuntimeError, TypeError) as exc:  # TenSEAL's and `aggregation.vector`'s, no data in them
            raise invalid(f"the ciphertext of the request is not a BFV vector of this consortium's context: {exc}"
                          ) from None
        with self._lock:
            self._check_decryptable(request.round_id)  # again: a concurrent request may have decrypted it meanwhile
            self._record("decrypted", request.round_id)
        return DecryptReply(values=(values,))

    def _check_decryptable(self, round_id: str) -> None:
        if not self.rounds.seen("answered", round_id):
            raise SiloError(ErrorCode.FAILED_PRECONDITION, f"this silo took no part in round {round_id!r}; only a "
                            "participant decrypts it")
        if self.rounds.seen("decrypted", round_id):
            raise SiloError(ErrorCode.FAILED_PRECONDITION, f"round {round_id!r} was already decrypted; each round "
                            "is decrypted once")

    def _record(self, kind: str, round_id: str) -> None:
        """`rounds.add`, a write that fails (a full disk) refused as the silo's, not the request's, failure."""
        try:
            self.rounds.add(kind, round_id)
        except OSError as exc:
            raise SiloError(ErrorCode.FAILED_PRECONDITION, f"silo {self.name!r} could not record round "
                            f"{round_id!r} as {kind} ({exc}); it answers no secure round until it can") from None
