"""`call_pairing`: which silo entry is the record of each coordinator call, for identical requests above all.

Every Describe has one digest and no round, so the key alone pairs calls in order; these cases are the honest
logs on which that, or a first fix of it, named the wrong entries or found a mismatch where there was none
(review probes /work/probes_s38/docs and /work/probes_s38/diffreview/p1_pick.py).
"""

from __future__ import annotations

from mor_secure.audit.call_pairing import call_key, pair_calls
from mor_secure.audit.checkpoints import Checkpoint

DESCRIBE = "/mor_secure.proto.v1.SiloRewardService/Describe"


def silo_entry(status: str) -> dict:
    return {"event": "call", "side": "server", "rpc": DESCRIBE, "round_id": None, "request_digest": "e3b0",
            "status": status}


def call(status: str, *, size: int | None, sent_after: int) -> dict:
    """A coordinator call; `size` stands for the checkpoint its answer carried, `sent_after` for how many entries
    the coordinator's log held when it was sent."""
    return {"event": "call", "side": "client", "rpc": DESCRIBE, "round_id": None, "request_digest": "e3b0",
            "status": status, "sent_after_entries": sent_after, "size": size}


def paired(calls: list[dict], silo: list[dict]) -> dict[int, int | None]:
    """Coordinator call position -> silo entry position (None: unpaired)."""
    waiting = {}
    for position, fields in enumerate(silo):
        waiting.setdefault(call_key(fields), []).append((position, fields))
    checkpoints = {seq: None if c["size"] is None else Checkpoint(log="mor://silo/hospital-a", size=c["size"],
                                                                    root=b"", time=0.0, key="k", signs_every=1)
                   for seq, c in enumerate(calls)}
    pairs = pair_calls(list(enumerate(calls)), waiting, checkpoints)
    return {seq: None if entry is None else entry[0] for seq, entry in pairs.items()}


def test_two_calls_in_flight_at_once_are_paired_by_status_when_both_answers_carry_one_checkpoint() -> None:
    """A answered OK at entry 0, B refused at entry 1 before A read its checkpoint: both carry size 2. Pairing by
    the checkpoint alone swapped them, two false mismatches."""
    calls = [call("OK", size=2, sent_after=0), call("RESOURCE_EXHAUSTED", size=2, sent_after=0)]
    assert paired(calls, [silo_entry("OK"), silo_entry("RESOURCE_EXHAUSTED")]) == {0: 0, 1: 1}


def test_an_off_record_call_before_an_answered_one_is_left_over_even_if_another_entry_came_in_between() -> None:
    """Entry 0 an identical call off the coordinator's record, entry 1 the coordinator's; an entry of another
    kind (a health check) came before its checkpoint was read, so the checkpoint (size 3) signs neither."""
    assert paired([call("OK", size=3, sent_after=0)], [silo_entry("OK"), silo_entry("OK")]) == {0: 1}


def test_a_call_not_delivered_after_an_answer_came_back_cannot_claim_an_entry_before_it() -> None:
    """Entry 0 off the record, entry 1 the coordinator's answered call; then the silo stops and the next call,
    sent after that answer was recorded, is UNAVAILABLE: it must not claim entry 0 as the silo's answer to it."""
    calls = [call("OK", size=2, sent_after=0), call("UNAVAILABLE", size=None, sent_after=1)]
    assert paired(calls, [silo_entry("OK"), silo_entry("OK")]) == {0: 1, 1: None}


def test_a_call_in_flight_when_an_answer_came_back_may_still_be_the_silos_earlier_entry() -> None:
    """Y was sent before X's answer was recorded and timed out after the silo answered it (entry 0): the benign
    case, paired, whatever the clocks said (the order is the coordinator log's own)."""
    calls = [call("OK", size=2, sent_after=0), call("DEADLINE_EXCEEDED", size=None, sent_after=0)]
    assert paired(calls, [silo_entry("OK"), silo_entry("OK")]) == {0: 1, 1: 0}


def test_an_answer_whose_checkpoint_was_read_late_gives_up_an_undelivered_calls_entry() -> None:
    """A recorded (entry 0) and stalled; B answered (entry 1, checkpoint 2) and was recorded; Y was sent, timed
    out, and the silo answered it late (entry 2); A then read checkpoint 3, signed with Y's entry. A took entry
    2 as its own and Y, sent after B's answer, could not be entry 0: the silo's late answer read as a call off the
    coordinator's record (review helper-69)."""
    calls = [call("OK", size=2, sent_after=0), call("DEADLINE_EXCEEDED", size=None, sent_after=1),
             call("OK", size=3, sent_after=0)]
    assert paired(calls, [silo_entry("OK")] * 3) == {0: 1, 1: 2, 2: 0}


def test_a_retry_after_unavailable_leaves_the_silos_one_entry_to_the_answered_call() -> None:
    calls = [call("UNAVAILABLE", size=None, sent_after=0), call("OK", size=1, sent_after=1)]
    assert paired(calls, [silo_entry("OK")]) == {0: None, 1: 0}


def test_a_call_whose_entry_does_not_say_when_it_was_sent_is_paired_as_before() -> None:
    """Logs from before client entries held `sent_after_entries`: no order is known, so any same-keyed entry may
    be its."""
    unsent = {k: v for k, v in call("UNAVAILABLE", size=None, sent_after=0).items() if k != "sent_after_entries"}
    assert paired([call("OK", size=2, sent_after=0), unsent], [silo_entry("OK"), silo_entry("OK")]) == {0: 1, 1: 0}


def test_many_identical_requests_are_paired_in_about_linear_time() -> None:
    """A log of 20,000 identical Describes (a crafted one, say) must not hold the reviewer up for minutes."""
    calls = [call("OK", size=k + 1, sent_after=k) for k in range(20_000)]
    assert paired(calls, [silo_entry("OK")] * 20_000) == {k: k for k in range(20_000)}
