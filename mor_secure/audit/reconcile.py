"""`mor audit reconcile`: does what the coordinator says it asked match what each silo says it answered?

Both sides log every call (the coordinator as client, the silo as server),
with the SHA-256 of the serialised request, so the two logs can be matched
query by query without either holding the query itself:

- every query the coordinator logged to a silo is in that silo's log with
  the same RPC, round and request digest, and the same status (a call that
  never reached the silo, UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED at the
  coordinator, may be absent there: it is counted, not a mismatch; but if
  the silo's log has it, answered, that is a mismatch of its own, "the silo
  answered a call the coordinator logged as not delivered": a call that
  broke off or timed out after the silo recorded its answer, or a
  coordinator that rewrote an answer it got, with the silo's checkpoint,
  as never delivered); identical requests (every Describe is one) are
  paired with the silo's entries by the checkpoints the answers carried
  and the order of the calls (`call_pairing`);
- every query the silo logged from a coordinator is in the coordinator's
  log (a silo cannot be asked off the record); one from a coordinator other
  than the log's party is a mismatch too, so the log of another coordinator
  identity, or one whose party was renamed, cannot stand in for the real one;
- every answer carried a checkpoint, and every one the silo handed back is signed by the
  silo's consortium certificate, covers the silo's own entry for that call,
  and the silo's log today is consistent with it (its first `size` entries
  still have the signed root; the newest is also checked with an RFC 6962
  consistency proof to the silo's current tree): a silo that
  rewrote, dropped or reordered an entry after answering is caught even
  if it re-signed its own checkpoints.

Health checks and reflection are logged by both sides but are not queries
of the silo's model, so they are not matched here.

A silo the coordinator's log says it called (a client call's `callee`) or
asked (a round's `asked`) but whose log was not given cannot be reconciled
at all: `unlogged_silos` names each, so that leaving a log out is a finding,
never a silent pass.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from mor_secure.pki.identity import SCHEME, Role, parse_identity

from .call_pairing import NOT_DELIVERED, call_key, pair_calls, status_of
from .checkpoints import Checkpoint, CheckpointError, SignedCheckpoint, verify_checkpoint
from .merkle import MerkleTree, ProofError, leaf_hash, verify_consistency
from .store import StoredLog

QUERY_PREFIX = "/mor_secure.proto.v1.SiloRewardService/"
MAX_MISMATCHES = 100
SILO_PREFIX = f"{SCHEME}://{Role.SILO.value}/"  # a round's `asked` names silos; calls name them by identity


@dataclass
class Reconciliation:
    """The coordinator's log against one silo's log."""

    silo: str
    matched: int = 0
    not_delivered: int = 0
    checkpoints_checked: int = 0
    mismatches: list[str] = field(default_factory=list)  # the first MAX_MISMATCHES found
    unlisted_mismatches: int = 0  # found beyond those `mismatches` lists

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def mismatches_found(self) -> int:
        return len(self.mismatches) + self.unlisted_mismatches

    def mismatch(self, message: str) -> None:
        if len(self.mismatches) < MAX_MISMATCHES:
            self.mismatches.append(message)
        else:
            self.unlisted_mismatches += 1


@dataclass(frozen=True)
class UnloggedSilo:
    """A silo the coordinator's log says it called `calls` times and asked in `rounds` rounds; no log given."""

    silo: str
    calls: int
    rounds: int

    def finding(self) -> str:
        return (f"the coordinator's log records {self.calls} call{'' if self.calls == 1 else 's'} to it and "
                f"{self.rounds} round{'' if self.rounds == 1 else 's'} that asked it; give its log to reconcile them")


def unlogged_silos(coordinator: StoredLog, silos: Sequence[StoredLog]) -> list[UnloggedSilo]:
    """Every silo the coordinator's log names as called or asked whose log is not among `silos`."""
    calls: Counter[str] = Counter()
    rounds: Counter[str] = Counter()
    for entry in coordinator.entries:
        fields = entry.fields()
        if fields.get("event") == "call" and fields.get("side") == "client" and isinstance(fields.get("callee"), str):
            calls[fields["callee"]] += 1
        elif fields.get("event") == "round" and isinstance(fields.get("asked"), list):
            rounds.update({SILO_PREFIX + name for name in fields["asked"] if isinstance(name, str)})
    given = {silo.party for silo in silos}
    return [UnloggedSilo(silo, calls[silo], rounds[silo]) for silo in sorted((calls.keys() | rounds.keys()) - given)]


def _calls(log: StoredLog, side: str, peer_field: str, is_peer: Callable[[object], bool]) -> list[tuple[int, dict]]:
    """(position, fields) of each query entry on `side` whose `peer_field` passes `is_peer`.

    Entries are named by their position in storage order, the order the tree is built in, never by their stored
    `seq`: a renumbered log (verify names that) must not move an entry into the range a checkpoint covers.
    """
    calls = []
    for position, entry in enumerate(log.entries):
        fields = entry.fields()
        if (fields.get("event") == "call" and fields.get("side") == side and is_peer(fields.get(peer_field))
                and str(fields.get("rpc", "")).startswith(QUERY_PREFIX)):
            calls.append((position, fields))
    return calls


def _short(fields: dict) -> str:
    rpc = str(fields.get("rpc", "")).removeprefix(QUERY_PREFIX)
    digest = str(fields.get("request_digest", ""))[:12]
    return f"{rpc} (round {fields.get('round_id') or '-'}, request {digest}...)"


def _role(party: object) -> Role | None:
    """The role a party URI names; None for anything that is not one (an entry's field may be any JSON value)."""
    try:
        return parse_identity(party).role if isinstance(party, str) else None
    except ValueError:
        return None


def check_parties(coordinator: StoredLog, silos: Sequence[StoredLog]) -> None:
    """ValueError saying how to fix it unless `coordinator` is a coordinator's log and `silos` distinct silos' logs.

    Each log says whose it is; matching two logs in the wrong roles (swapped,
    or the coordinator's against itself) would compare the wrong sides of
    every call and could call an unchecked record reconciled.
    """
    if _role(coordinator.party) is not Role.COORDINATOR:
        raise ValueError(f"{coordinator.path} is the log of {coordinator.party or 'no party'}, not of a "
                         "coordinator: give the coordinator's log first, then each silo's")
    seen: dict[str, Path] = {}
    for silo in silos:
        if _role(silo.party) is not Role.SILO:
            raise ValueError(f"{silo.path} is the log of {silo.party or 'no party'}, not of a silo: give the "
                             "coordinator's log first, then each silo's")
        if silo.party in seen:
            raise ValueError(f"{seen[silo.party]} and {silo.path} are both logs of {silo.party}: give each "
                             "silo's log once")
        seen[silo.party] = silo.path


def reconcile(coordinator: StoredLog, silo: StoredLog, ca: x509.Certificate) -> Reconciliation:
    """Every check of the module docstring between `coordinator`'s log and `silo`'s (`check_parties` first)."""
    check_parties(coordinator, [silo])
    result = Reconciliation(silo=silo.party)
    silo_certificates = silo.certificates_issued_by(ca)
    if not silo_certificates:
        result.mismatch(f"{silo.path.name} holds no certificate the consortium CA issued to {silo.party}: its "
                        "checkpoints cannot be trusted")
    asked = _calls(coordinator, "client", "callee", lambda callee: callee == silo.party)
    # Every query the silo answered a coordinator, whichever coordinator it names: only those of the log given can
    # match, so a log that is another coordinator's, or one whose party was renamed, leaves the real one's unmatched.
    answered = _calls(silo, "server", "caller", lambda caller: _role(caller) is Role.COORDINATOR)
    waiting: dict[tuple, list[tuple[int, dict]]] = defaultdict(list)
    for seq, fields in answered:
        waiting[fields["caller"], *call_key(fields)].append((seq, fields))

    held: list[tuple[int, Checkpoint, int | None]] = []  # (coordinator entry, silo checkpoint, silo entry it answers)
    checkpoints = {seq: _held_checkpoint(fields, silo_certificates, result.silo) for seq, fields in asked}
    pairs = pair_calls(asked, {key[1:]: entries for key, entries in waiting.items() if key[0] == coordinator.party},
                       {seq: checkpoint for seq, (checkpoint, _) in checkpoints.items()})
    paired = {entry[0] for entry in pairs.values() if entry is not None}
    for seq, fields in sorted(asked, key=lambda call: status_of(call[1]) in NOT_DELIVERED):
        status = status_of(fields)
        checkpoint, problem = checkpoints[seq]
        picked = pairs[seq]
        silo_entry = None
        if picked is not None:
            silo_seq, silo_fields = picked
            silo_entry = silo_seq
            result.matched += 1
            silo_status = status_of(silo_fields)
            if silo_status != status and status in NOT_DELIVERED:  # so no checkpoint either: this is the one finding
                result.mismatch(f"coordinator entry {seq}: {_short(fields)} is logged {status}, as not delivered, "
                                f"but {silo.party}'s entry {silo_seq} says it answered {silo_status}: the silo "
                                "answered a call the coordinator logged as not delivered (benign only if the call "
                                "broke off or timed out after the silo recorded its answer)")
            elif silo_status != status:
                result.mismatch(f"coordinator entry {seq}: {_short(fields)} ended {status}, but "
                                f"{silo.party}'s entry {silo_seq} says {silo_status}")
        elif status in NOT_DELIVERED:
            result.not_delivered += 1
        else:
            result.mismatch(f"coordinator entry {seq}: {_short(fields)} answered {status} is not in "
                            f"{silo.party}'s log")
        if not fields.get("peer_checkpoint") and status not in NOT_DELIVERED:
            # Every answer, a refusal too, carries the silo's signed tree head; without them a silo could
            # rewrite its log and re-sign it unnoticed.
            result.mismatch(f"coordinator entry {seq}: {_short(fields)} was answered {status} "
                            f"without {silo.party}'s checkpoint")
        if problem is not None:
            result.mismatch(f"coordinator entry {seq}: {problem}")
        if checkpoint is not None:
            held.append((seq, checkpoint, silo_entry))
    for candidates in waiting.values():
        for silo_seq, silo_fields in (entry for entry in candidates if entry[0] not in paired):
            caller = silo_fields["caller"]
            given = "" if caller == coordinator.party else f" given (it is {coordinator.party}'s)"
            result.mismatch(f"{silo.party}'s entry {silo_seq}: {_short(silo_fields)} from {caller} is "
                            f"not in the coordinator's log{given}")
    _check_consistency(silo, held, result)
    return result


def _held_checkpoint(fields: dict, certificates, silo: str) -> tuple[Checkpoint | None, str | None]:
    """(the silo's checkpoint the call's answer carried, verified, or None; what is wrong with it, if anything)."""
    held = fields.get("peer_checkpoint")
    if not held:
        return None, None
    try:
        signed = SignedCheckpoint(body=bytes.fromhex(held["body"]), signature=bytes.fromhex(held["signature"]))
        checkpoint = verify_checkpoint(signed, certificates)
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        return None, f"the checkpoint the silo sent with its answer does not verify ({exc})"
    if checkpoint.log != silo:
        return None, f"the answer carried {checkpoint.log}'s checkpoint, not {silo}'s"
    return checkpoint, None


def _check_consistency(silo: StoredLog, held: list[tuple[int, Checkpoint, int | None]],
                       result: Reconciliation) -> None:
    """The silo's current tree extends every checkpoint the coordinator holds from it.

    One pass over the silo's entries gives its tree's root at every held
    checkpoint's size; a tree extends a checkpoint exactly when its first
    `size` leaves still have the signed root (so this is O(n log n) for any
    number of checkpoints). The newest held checkpoint is also checked with
    an RFC 6962 consistency proof to the current tree, the form in which a
    silo would prove it without showing its entries.
    """
    sizes = {checkpoint.size for _, checkpoint, _ in held}
    tree, roots = MerkleTree(), {0: MerkleTree().root()}
    for entry in silo.entries:
        tree.append(leaf_hash(entry.body))
        if tree.size in sizes:
            roots[tree.size] = tree.root()
    for seq, checkpoint, silo_entry in held:
        result.checkpoints_checked += 1
        if silo_entry is not None and silo_entry >= checkpoint.size:
            result.mismatch(f"coordinator entry {seq}: the silo's checkpoint (size {checkpoint.size}) does not "
                            f"cover its own entry {silo_entry} for that call")
        if checkpoint.size > tree.size:
            failure = (f"the log now holds {tree.size} entries, fewer than the {checkpoint.size} it signed for "
                       "(entries were removed)")
        elif roots[checkpoint.size] != checkpoint.root:
            failure = f"entries before {checkpoint.size} were rewritten after it was signed"
        else:
            continue
        result.mismatch(f"coordinator entry {seq}: {silo.party}'s log is not consistent with the checkpoint it "
                        f"signed then (size {checkpoint.size}): {failure}")
    newest = max((checkpoint for _, checkpoint, _ in held), key=lambda c: c.size, default=None)
    if newest is not None and 0 < newest.size <= tree.size and roots[newest.size] == newest.root:
        try:
            verify_consistency(old_size=newest.size, new_size=tree.size, old_root=newest.root,
                               new_root=tree.root(), proof=tree.consistency_proof(newest.size))
        except ProofError as exc:  # pragma: no cover - equal roots always prove; a failure here is a tree bug
            result.mismatch(f"the consistency proof from {silo.party}'s newest checkpoint does not verify ({exc})")
