"""serde: every wire type survives a protobuf round trip; bad bytes become INVALID_ARGUMENT, never a crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mor_secure.privacy.reports import PrivacyReport
from mor_secure.proto.v1 import silo_pb2 as pb
from mor_secure.wire import (
    BitsPair,
    BitsReply,
    BitsRequest,
    ErrorCode,
    ImageBlob,
    LedgerSummary,
    ScoreReply,
    ScoreRequest,
    ScoreRow,
    SiloDescription,
    SiloError,
)
from mor_secure.wire import serde

REPO = Path(__file__).resolve().parents[2]
text = st.text(min_size=0, max_size=40)
blobs = st.lists(st.binary(max_size=64).map(ImageBlob.of), max_size=4).map(tuple)


@given(blobs, st.lists(st.tuples(st.integers(0, 2**32 - 1), text, text), max_size=6), text)
def test_score_request_round_trip(images, rows, round_id) -> None:
    request = ScoreRequest(objective="correct", images=images, rows=tuple(ScoreRow(*r) for r in rows),
                           round_id=round_id)
    wire = pb.ScoreRequest.FromString(serde.score_request_to_proto(request).SerializeToString())
    assert serde.score_request_from_proto(wire) == request


@given(blobs, st.lists(st.tuples(st.integers(0, 9), text, text, text), max_size=6),
       st.none() | st.floats(allow_nan=False))
def test_bits_request_round_trip(images, pairs, epsilon) -> None:
    request = BitsRequest(objective="correct", images=images, pairs=tuple(BitsPair(*p) for p in pairs),
                          randomized_response_epsilon=epsilon)
    wire = pb.BitsRequest.FromString(serde.bits_request_to_proto(request).SerializeToString())
    assert serde.bits_request_from_proto(wire) == request


@given(st.lists(st.floats(allow_nan=False), max_size=8), st.lists(st.booleans(), max_size=8),
       st.none() | st.floats(0, 0.5))
def test_replies_round_trip(scores, bits, flip) -> None:
    assert serde.score_reply_from_proto(serde.score_reply_to_proto(ScoreReply(tuple(scores)))) == ScoreReply(tuple(scores))
    reply = BitsReply(bits=tuple(bits), flip_probability=flip)
    assert serde.bits_reply_from_proto(serde.bits_reply_to_proto(reply)) == reply


def test_description_round_trip_with_and_without_report() -> None:
    report = PrivacyReport(dp_enabled=True, epsilon=7.9, delta=1e-5, noise_multiplier=1.02, sample_rate=0.33,
                           steps=12, epochs=4, max_grad_norm=1.0, accountant="prv", privacy_unit="patient",
                           max_pairs_per_unit=16, noise="os-entropy", private=True, mechanisms=("DP-SGD", "scores"))
    ledger = LedgerSummary(epsilon_budget=10.0, delta_budget=2e-5, epsilon_spent=7.9, delta_spent=1e-5, charges=1,
                           open_reservations=0, head_digest="ab" * 32)
    for description in (SiloDescription("hospital-a", "small_cnn", 1234, report, ledger),
                        SiloDescription("hospital-a", "small_cnn", 1234),
                        SiloDescription("b", "x", 0, PrivacyReport(False, float("inf"), 1.0, 0.0, 0.0, 0, 0, None, None,
                                                                   None, None, None, False, ()))):
        wire = pb.SiloDescription.FromString(serde.description_to_proto(description).SerializeToString())
        assert serde.description_from_proto(wire) == description


def test_undecodable_text_and_short_digests_are_invalid_argument() -> None:
    message = pb.ScoreRequest(images=[pb.ImageBlob(sha256=b"\0" * 32, data=b"x")],
                              rows=[pb.ScoreRow(image=0, prompt=b"\xff\xfe", response=b"ok")])
    with pytest.raises(SiloError, match=r"rows\[0\].prompt is not valid UTF-8") as caught:
        serde.score_request_from_proto(message)
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT
    short = pb.BitsRequest(images=[pb.ImageBlob(sha256=b"\0" * 31, data=b"x")])
    with pytest.raises(SiloError, match=r"images\[0\].sha256 is 31 bytes"):
        serde.bits_request_from_proto(short)


def test_committed_generated_code_matches_the_proto_files() -> None:
    """CI fails on drift between proto/ and mor_secure/proto/v1/ (regenerate with scripts/gen_proto.py)."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
