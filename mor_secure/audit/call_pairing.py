"""Which silo entry is the silo's record of each call the coordinator logged (`reconcile` then compares them).

A call and the silo's entry for it share a key: RPC, round and request
digest. Identical requests share it too (every Describe and AgreementKey
has one digest and no round), so the key alone can pair a call with another
call's entry, one made off the coordinator's record say, and name the wrong
entries in every finding. What else ties a call to its entry:

- an answer carries the silo's checkpoint, read after the silo recorded the
  call, so the call's entry is one that checkpoint covers, usually the one
  it was signed with (one before its size; another call's entry can come in
  between);
- the silo commits a call's entry before it answers and only appends, so a
  call sent after an answer came back is at or after every entry that
  answer's checkpoint covers. "After" is exact, on the coordinator's own
  log: a client entry says how many entries the log held when the call was
  sent (`sent_after_entries`), and an answer recorded before that came back
  before the call was sent.

Answered calls are paired first, those whose signing entry is theirs (same
status) before any other; a retry of a request after UNAVAILABLE is logged
twice by the coordinator and once by the silo, and the silo's entry is the
answered one's. A call that was not delivered then takes the first entry it
can be, after swapping an answered call onto another entry its checkpoint
covers if that frees one (the answered call's checkpoint may have been read
late, covering the undelivered call's entry too). For an honest pair of
logs the undelivered calls only change which entries a finding names, never
how many findings there are: the silo logs no call as not delivered. A chain
of late reads the one swap cannot undo may still name a late answer as a
call off the record (a review's simulation of stalled handlers: 21 to 59 in
15,000 runs, every count right; first-come-first-served pairing had wrong
counts in 535 to 8,329 of them).
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping, Sequence
from itertools import accumulate

from .checkpoints import Checkpoint

# Statuses the coordinator sees when its call may never have reached the silo.
NOT_DELIVERED = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})

Entry = tuple[int, dict]  # (position in its log, fields)


def status_of(fields: dict) -> str:
    """The entry's gRPC status; one the log never writes (a list, a number) reads as its repr, so it differs from
    every real status and is compared, never crashes the comparison."""
    status = fields.get("status")
    return status if isinstance(status, str) else repr(status)


def call_key(fields: dict) -> tuple:
    # repr: a malformed entry's field may be a list or dict; it must still match by value, not crash.
    return tuple(repr(fields.get(name)) for name in ("rpc", "round_id", "request_digest"))


class _Unpaired:
    """One key's silo entries not yet paired, by status, in log order (a bisect per lookup: a log of many
    identical requests is paired in n log n, not n^2)."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.fields: dict[int, dict] = {}
        self.by_status: dict[str, list[int]] = {}
        for position, fields in entries:
            self.put(position, fields)

    def put(self, position: int, fields: dict) -> None:
        self.fields[position] = fields
        insort(self.by_status.setdefault(status_of(fields), []), position)

    def take(self, position: int) -> Entry:
        fields = self.fields.pop(position)
        positions = self.by_status[status_of(fields)]
        positions.pop(bisect_left(positions, position))
        return position, fields

    def newest_below(self, size: float, status: str | None = None) -> int | None:
        """The newest unpaired position under `size` (of `status`, if given)."""
        lists = [self.by_status.get(status, [])] if status is not None else self.by_status.values()
        below = [positions[k - 1] for positions in lists if (k := bisect_left(positions, size))]
        return max(below, default=None)

    def first_from(self, first: int) -> int | None:
        found = [positions[k] for positions in self.by_status.values() if (k := bisect_left(positions, first))
                 < len(positions)]
        return min(found, default=None)


def pair_calls(calls: Sequence[Entry], silo_entries: Mapping[tuple, Sequence[Entry]],
               checkpoints: Mapping[int, Checkpoint | None]) -> dict[int, Entry | None]:
    """Each coordinator call's silo entry (None: none is). `silo_entries` are the silo's entries by key,
    `checkpoints` the verified silo checkpoint each call's answer carried, by the call's position."""
    unpaired = {key: _Unpaired(entries) for key, entries in silo_entries.items()}
    none = _Unpaired(())
    paired: dict[int, Entry | None] = {}
    answered = [(seq, fields) for seq, fields in calls if status_of(fields) not in NOT_DELIVERED]
    for seq, fields in answered:  # the entries the answers' checkpoints were signed with
        checkpoint, entries = checkpoints[seq], unpaired.get(call_key(fields), none)
        own = None if checkpoint is None else entries.fields.get(checkpoint.size - 1)
        if own is not None and status_of(own) == status_of(fields):
            paired[seq] = entries.take(checkpoint.size - 1)
    for seq, fields in answered:  # then the newest its checkpoint covers, same status first; an older one is an
        if seq in paired:         # earlier call's, off the record perhaps
            continue
        checkpoint, entries = checkpoints[seq], unpaired.get(call_key(fields), none)
        size = checkpoint.size if checkpoint is not None else math.inf  # no checkpoint: a finding of its own
        position = entries.newest_below(size, status_of(fields))
        position = entries.newest_below(size) if position is None else position
        if position is None:  # none it covers: the first, which the finding then names
            position = entries.first_from(0)
        paired[seq] = None if position is None else entries.take(position)
    first_possible = _first_possible_entries(calls, checkpoints)
    answered_by_key: dict[tuple, list[int]] = {}
    for seq, fields in answered:
        answered_by_key.setdefault(call_key(fields), []).append(seq)
    failed_from: dict[tuple, float] = {}  # per key: no swap frees a position at or after this (until one does)
    for seq, fields in calls:
        if seq in paired:
            continue
        key, first = call_key(fields), first_possible[seq]
        entries = unpaired.get(key, none)
        position = entries.first_from(first)
        if position is None and first < failed_from.get(key, math.inf):
            position = _freed_by_a_swap(first, answered_by_key.get(key, []), paired, checkpoints, entries)
            failed_from[key] = first if position is None else math.inf
        paired[seq] = None if position is None else entries.take(position)
    return paired


def _freed_by_a_swap(first: int, answered: Sequence[int], paired: dict[int, Entry | None],
                     checkpoints: Mapping[int, Checkpoint | None], entries: _Unpaired) -> int | None:
    """A position at or after `first` that one of the `answered` calls (of one key) holds and gives up for an
    unpaired entry of the same status its checkpoint also covers, now its own; None if there is none."""
    for other in answered:
        held, checkpoint = paired.get(other), checkpoints[other]
        if held is None or held[0] < first or checkpoint is None:
            continue
        instead = entries.newest_below(checkpoint.size, status_of(held[1]))
        if instead is not None:
            paired[other] = entries.take(instead)
            entries.put(*held)
            return held[0]
    return None


def _first_possible_entries(calls: Sequence[Entry], checkpoints: Mapping[int, Checkpoint | None]) -> dict[int, int]:
    """For each call, the first silo entry that can be its own: the largest checkpoint size of the answers the
    coordinator recorded before it sent the call. 0 for a call whose entry does not say when it was sent
    (logged before entries did)."""
    in_order = sorted(calls, key=lambda call: call[0])
    positions = [seq for seq, _ in in_order]
    largest = list(accumulate((0 if checkpoints[seq] is None else checkpoints[seq].size for seq, _ in in_order),
                              max))
    first = {}
    for seq, fields in calls:
        sent_after = fields.get("sent_after_entries")
        known = isinstance(sent_after, int) and not isinstance(sent_after, bool)
        before = bisect_left(positions, sent_after) if known else 0
        first[seq] = largest[before - 1] if before else 0
    return first
