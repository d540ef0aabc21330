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
  call the coordinator began after an answer came back is at or after the
  entries that answer's checkpoint covers (the coordinator's own clock: the
  answer's entry time against the call's `began`).

Answered calls are paired first, those whose signing entry is theirs (same
status) before any other, so no fallback takes another call's own entry; a
retry of a request after UNAVAILABLE is logged twice by the coordinator and
once by the silo, and the silo's entry is the answered one's.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from itertools import accumulate

from .checkpoints import Checkpoint

# Statuses the coordinator sees when its call may never have reached the silo.
NOT_DELIVERED = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})
# An answer's entry is stamped after it came back (later, if it waited for the log's lock) and a call's `began`
# before it was sent, so only a wall clock stepped back between the two can order them wrongly; NTP slews
# offsets under 128 ms and steps larger ones, rarely: a second covers all but a step of more than that.
CLOCK_MARGIN_SECONDS = 1.0

Entry = tuple[int, dict]  # (position in its log, fields)


def status_of(fields: dict) -> str:
    """The entry's gRPC status; one the log never writes (a list, a number) reads as its repr, so it differs from
    every real status and is compared, never crashes the comparison."""
    status = fields.get("status")
    return status if isinstance(status, str) else repr(status)


def call_key(fields: dict) -> tuple:
    # repr: a malformed entry's field may be a list or dict; it must still match by value, not crash.
    return tuple(repr(fields.get(name)) for name in ("rpc", "round_id", "request_digest"))


def pair_calls(calls: Sequence[Entry], waiting: Mapping[tuple, list[Entry]],
               checkpoints: Mapping[int, Checkpoint | None]) -> dict[int, Entry | None]:
    """Each coordinator call's silo entry (None: none is), taken out of `waiting` (the silo's entries by key).

    `checkpoints` holds the verified silo checkpoint each call's answer carried, by the call's position.
    """
    paired: dict[int, Entry | None] = {}
    answered = [(seq, fields) for seq, fields in calls if status_of(fields) not in NOT_DELIVERED]
    for seq, fields in answered:  # the entries answers were signed with
        checkpoint, candidates = checkpoints[seq], waiting.get(call_key(fields), [])
        own = [k for k, (position, entry) in enumerate(candidates) if checkpoint is not None
               and position == checkpoint.size - 1 and status_of(entry) == status_of(fields)]
        if own:
            paired[seq] = candidates.pop(own[0])
    for seq, fields in answered:
        if seq not in paired:
            paired[seq] = _answered_entry(waiting.get(call_key(fields), []), status_of(fields), checkpoints[seq])
    first_possible = _first_possible_entries(calls, checkpoints)
    for seq, fields in calls:
        if seq not in paired:
            candidates = waiting.get(call_key(fields), [])
            eligible = [k for k, (position, _) in enumerate(candidates) if position >= first_possible[seq]]
            paired[seq] = candidates.pop(eligible[0]) if eligible else None
    return paired


def _answered_entry(candidates: list[Entry], status: str, checkpoint: Checkpoint | None) -> Entry | None:
    """Of the entries the answer's checkpoint covers, one of the same status, then the newest (an older one is
    an earlier call's); with none covered, the first (the finding then names it)."""
    covered = [k for k, (position, _) in enumerate(candidates) if checkpoint is None or position < checkpoint.size]
    if not covered:
        return candidates.pop(0) if candidates else None
    best = max(covered, key=lambda k: (status_of(candidates[k][1]) == status, candidates[k][0]))
    return candidates.pop(best)


def _first_possible_entries(calls: Sequence[Entry], checkpoints: Mapping[int, Checkpoint | None]) -> dict[int, int]:
    """For each call, the first silo entry that can be its own: the largest checkpoint size of the answers
    recorded more than CLOCK_MARGIN_SECONDS before it began. 0 for a call whose entry does not say when it began
    (logged before entries did)."""
    ends = sorted((end, checkpoint.size) for seq, fields in calls
                  if (checkpoint := checkpoints[seq]) is not None and (end := _number(fields.get("time"))) is not None)
    times, largest = [end for end, _ in ends], list(accumulate((size for _, size in ends), max))
    first = {}
    for seq, fields in calls:
        began = _number(fields.get("began"))
        before = bisect_left(times, began - CLOCK_MARGIN_SECONDS) if began is not None else 0
        first[seq] = largest[before - 1] if before else 0
    return first


def _number(value: object) -> float | None:
    """A finite JSON number, else None (an entry's field may be any JSON value)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
