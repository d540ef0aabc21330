"""`mor audit verify`: is this log whole, in order, unaltered, and are its checkpoints the party's?

Checks, in one pass over the entries in storage order:

- numbering: entry k is stored at position k (a gap names the deleted entries);
- content: its leaf hash is SHA-256(0x00 || body) and the body is canonical JSON
  naming index k (an edited byte, a reordered or inserted entry is named: an
  entry at k naming an earlier index i follows the inserted entries i..k-1);
- chain: its `prev_root` is the Merkle root of entries 0..k-1 as stored now,
  so an entry altered together with its leaf hash is named by the first
  entry after it whose recorded tree head no longer matches (entry k itself,
  if a checkpoint at size k confirms entries 0..k-1, or if entry k+1's tree
  head covers entry k with the right root put back: then only entry k's
  record of the root was edited);
- checkpoints: each signature verifies under one of the given certificates
  (which must be the log's party), its size is not beyond the newest stored
  entry (a truncated log is named; a gap in the middle is not a truncation),
  and its root equals the root of the first
  `size` entries. Equal roots at every checkpoint's size mean every later
  checkpoint is consistent with every earlier one (RFC 6962 §2.1.2: the
  consistency proofs of one tree always verify), so no proof needs storing;
- signed at all: the writer signs a checkpoint in the same transaction as its
  first entry, so a log with entries and no checkpoint was stripped of
  them or rebuilt without the party's key. A newest stretch of fewer than
  `checkpoint_every_entries` (or `checkpoint_every_seconds` of) entries is
  legitimately not yet covered (the party is running, or was killed before
  its next checkpoint); `uncovered_entries` counts it. No writer leaves
  more than the newest valid checkpoint's `signs_every - 1` (its writer's
  cadence, signed with it: 0 for a silo, which signs with every entry) or,
  in a checkpoint that states none, 255 (every writer signs at least every
  `MAX_CHECKPOINT_INTERVAL` = 256 entries; across a restart it counts from its
  last stored checkpoint, and one with another cadence signs a checkpoint
  stating its own when it opens), so a longer stretch means newer
  checkpoints were removed, and the entries they covered could then be
  rewritten unseen: that is a problem, naming the first of them.

A log can pass this and still have been rewritten wholesale by its own party
(who can re-sign): checkpoints another party holds catch that
(`reconcile.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509

from .checkpoints import (MAX_CHECKPOINT_INTERVAL, Checkpoint, CheckpointError, canonical_json, parse_json,
                          verify_checkpoint)
from .merkle import MerkleTree, leaf_hash
from .store import StoredLog

# A log is judged by its first problems; after a broken chain every later entry would repeat the same news.
MAX_PROBLEMS = 50


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a log; `entry` is the entry it names (None for a checkpoint-only problem)."""

    entry: int | None
    message: str


@dataclass
class Verification:
    """The result of verifying one log."""

    party: str
    entries: int
    checkpoints: int
    problems: list[Problem] = field(default_factory=list)
    latest: Checkpoint | None = None
    latest_signature_ok: bool = False
    uncovered_entries: int = 0
    unlisted_problems: int = 0  # found beyond the first MAX_PROBLEMS, counted but not kept
    # The lowest entry any problem names, unlisted ones too (checkpoint problems, listed first, name none).
    first_bad_entry: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def problem_count(self) -> int:
        return len(self.problems) + self.unlisted_problems


def verify_log(log: StoredLog, certificates: Sequence[x509.Certificate]) -> Verification:
    """Every check of the module docstring on `log`, with checkpoint signatures checked against `certificates`."""
    result = Verification(party=log.party, entries=len(log.entries), checkpoints=len(log.checkpoints))

    def problem(entry: int | None, message: str) -> None:
        if entry is not None and (result.first_bad_entry is None or entry < result.first_bad_entry):
            result.first_bad_entry = entry
        if len(result.problems) < MAX_PROBLEMS:
            result.problems.append(Problem(entry, message))
        else:
            result.unlisted_problems += 1

    checkpoints = _checked_checkpoints(log, certificates, problem)
    wanted_sizes = {c.size for c in checkpoints if c is not None}
    roots: dict[int, bytes] = {}
    tree = MerkleTree()
    chain_broken = False
    if 0 in wanted_sizes:
        roots[0] = tree.root()
    for position, entry in enumerate(log.entries):
        if entry.seq < position:
            problem(position, f"entry {position} is stored numbered {entry.seq}: the entries were renumbered")
            break
        if entry.seq > position:
            jump = f"jump from {position - 1} to {entry.seq}" if position else f"start at {entry.seq}"
            problem(position, f"entry {position} is missing: the stored entries {jump} (entries "
                    f"{position}..{entry.seq - 1} were deleted)")
            break  # every later position is shifted; the first gap is the finding
        body_leaf = leaf_hash(entry.body)
        if body_leaf != entry.leaf_hash:
            problem(position, f"entry {position} was altered: its content does not match its recorded leaf hash")
        fields = _canonical_fields(entry.body)
        if fields is None:
            problem(position, f"entry {position} was altered: its content is not the canonical JSON the log writes")
        elif fields.get("index") != position:
            problem(*_misplaced(position, fields.get("index")))
        elif not chain_broken and fields.get("prev_root") != tree.root().hex():
            chain_broken = True
            pinned = next((number for number, c in enumerate(checkpoints)
                           if c is not None and c.size == position and c.root == tree.root()), None)
            if pinned is not None:  # entries 0..position-1 are as signed, so this entry's own record was edited
                problem(position, f"entry {position} was altered: the Merkle root it records for the entries "
                        f"before it is not theirs, which checkpoint #{pinned} (size {position}) confirms")
            elif _own_root_record_edited(log.entries, position, fields, tree):
                problem(position, f"entry {position} was altered: the Merkle root it records for the entries "
                        f"before it is not theirs; with their root put back, entry {position} is the one entry "
                        f"{position + 1}'s recorded tree head covers, so only that record was edited")
            else:
                culprit = max(position - 1, 0)
                problem(culprit, f"entry {culprit} was altered, removed or inserted: entry {position} recorded a "
                        "different Merkle root for the entries before it (or entry "
                        f"{position}'s own record of that root was edited; no checkpoint at size {position} "
                        "tells which)")
        tree.append(body_leaf)
        if tree.size in wanted_sizes:
            roots[tree.size] = tree.root()

    # Where the stored entries end: past the newest stored one, so a gap deleted in the middle (named above) is
    # not also taken for a cut-off tail.
    end = max(len(log.entries), log.entries[-1].seq + 1) if log.entries else 0
    covered = 0
    for number, checkpoint in enumerate(checkpoints):
        if checkpoint is None:
            continue
        if checkpoint.size > end:
            now = f"the log now ends with entry {end - 1}" if end else "the log now holds no entries"
            problem(end, f"the log was truncated: checkpoint #{number} covers {checkpoint.size} entries but {now} "
                    f"(entries {end}..{checkpoint.size - 1} are gone)")
        elif checkpoint.size in roots and roots[checkpoint.size] != checkpoint.root:
            # The newest matching checkpoint below bounds where the altered entry is.
            lo = max((c.size for c in checkpoints[:number] if c is not None and c.size < checkpoint.size
                      and roots.get(c.size) == c.root), default=0)
            where = f"entry {lo}" if checkpoint.size - lo == 1 else f"one of entries {lo}..{checkpoint.size - 1}"
            problem(lo if checkpoint.size - lo == 1 else None,
                    f"checkpoint #{number} (size {checkpoint.size}) does not match the entries it covers: {where} "
                    "was altered after the checkpoint was signed")
        covered = max(covered, checkpoint.size)
    if log.entries and not log.checkpoints:  # stored but invalid ones are each a problem already
        problem(None, f"none of the {len(log.entries)} entries is covered by a signed checkpoint: the party signs "
                "one with its first entry, so its checkpoints were removed or the log was rebuilt without its key")
    if log.checkpoints:
        result.latest_signature_ok = checkpoints[-1] is not None
        result.latest = checkpoints[-1] or _parsed_or_none(log.checkpoints[-1])
    result.uncovered_entries = max(len(log.entries) - covered, 0)
    newest = next((c for c in reversed(checkpoints) if c is not None), None)
    if newest is not None:
        allowed = newest.unsigned_allowed  # a silo signs with every entry: 0
        if newest.signs_every is None:  # signed before checkpoints stated their writer's cadence
            reason = f"a writer signs at least every {MAX_CHECKPOINT_INTERVAL} entries"
        else:
            reason = (f"the newest valid checkpoint, at size {newest.size}, states that its writer signs at least "
                      f"every {newest.signs_every}")
        if result.uncovered_entries > allowed:
            first = (f"entry {covered} is" if result.uncovered_entries == 1 else
                     f"entries {covered}..{len(log.entries) - 1} ({result.uncovered_entries}) are")
            problem(covered, f"{first} covered by no signed checkpoint, more than the {allowed} newest its writer "
                    f"can leave unsigned ({reason}): newer checkpoints were removed, and these entries may have "
                    "been rewritten or added since")
    return result


def _misplaced(position: int, index: object) -> tuple[int, str]:
    """(the first bad entry, the problem) for entry `position` whose body says it is entry `index`.

    An earlier index means position - index entries came in before it (inserted), the first at `index` or
    earlier, so that is the entry to name: without a checkpoint at that size, nothing else points at it. A later
    or unreadable index is this entry's own problem (it was moved here, or entries before it were removed and the
    rest renumbered).
    """
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < position:
        inserted = ("an entry was inserted before it, at" if position - index == 1
                    else f"{position - index} entries were inserted before it, the first at")
        return index, (f"entry {position} says it is entry {index}: {inserted} entry {index} or earlier (or "
                       "entries were reordered)")
    return position, (f"entry {position} says it is entry {index}: entries were reordered, or one was inserted or "
                      "removed here")


def _own_root_record_edited(entries, position: int, fields: dict, tree: MerkleTree) -> bool:
    """Whether entry `position`'s record of the root before it is what was edited (rather than an entry before it).

    Put the root the entries before it have now back into its body: if the entry after it then records exactly
    the tree head those entries and this restored one make, only this entry's record of the root had changed.
    If an entry before it was altered instead, the restored body holds the altered root and the tree head the
    next entry recorded (over the unaltered entries) does not match.
    """
    following = _canonical_fields(entries[position + 1].body) if position + 1 < len(entries) else None
    if following is None:
        return False
    mark = tree.mark()
    tree.append(leaf_hash(canonical_json({**fields, "prev_root": tree.root().hex()})))
    matches = following.get("prev_root") == tree.root().hex()
    tree.rewind(mark)
    return matches


def _checked_checkpoints(log: StoredLog, certificates, problem) -> list[Checkpoint | None]:
    """Each stored checkpoint, verified (None where it is bad, with the problem recorded)."""
    checked: list[Checkpoint | None] = []
    previous: Checkpoint | None = None
    for number, signed in enumerate(log.checkpoints):
        try:
            checkpoint = verify_checkpoint(signed, certificates)
        except CheckpointError as exc:
            problem(None, f"checkpoint #{number}: {exc}")
            checked.append(None)
            continue
        if checkpoint.log != log.party:
            problem(None, f"checkpoint #{number} is of {checkpoint.log}'s log, not {log.party}'s")
        if previous is not None and checkpoint.size < previous.size:
            problem(None, f"checkpoint #{number} (size {checkpoint.size}) goes back from #{number - 1} (size "
                    f"{previous.size}): checkpoints were reordered or the log was reset")
        elif previous is not None and checkpoint.time < previous.time:
            problem(None, f"checkpoint #{number} is dated {previous.time - checkpoint.time:.3f} s before "
                    f"#{number - 1}: checkpoints were reordered (the writer never dates one before the last)")
        previous = checkpoint
        checked.append(checkpoint)
    return checked


def _canonical_fields(body: bytes) -> dict | None:
    """The body's fields, or None unless it is a JSON object in exactly the canonical form the log writes."""
    try:
        fields = parse_json(body)
        if not isinstance(fields, dict) or canonical_json(fields) != body:
            return None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: too deep to re-encode
        return None
    return fields


def _parsed_or_none(signed) -> Checkpoint | None:
    try:
        return signed.checkpoint
    except CheckpointError:
        return None
