"""One suite, every SiloClient: the same answers, refusals and randomized response on each transport."""

from __future__ import annotations

import math
from functools import partial

import pytest

from mor_secure.policy import RequestLimits
from mor_secure.privacy.randomized_response import flip_probability
from mor_secure.wire import (
    BitsPair,
    BitsRequest,
    ErrorCode,
    ImageBlob,
    ScoreRequest,
    ScoreRow,
    SiloDescription,
    SiloError,
)
from mor_secure.wire.client import SiloClient
from silo_agent.service import SiloService

from silo_fakes import RightAnswerModel, png

# Every request names the reward objective it serves; only the last test here is about that.
Score = partial(ScoreRequest, objective="correct")
Bits = partial(BitsRequest, objective="correct")
RED, BLUE = ImageBlob.of(png((200, 30, 30))), ImageBlob.of(png((30, 30, 200)))
QUESTION = "what shape is in the image?"
# Right on pairs 0 and 2 (chosen is "right"), wrong on 1, tie on 3 (not strictly above).
PAIRS = (BitsPair(0, QUESTION, "right", "wrong"), BitsPair(1, QUESTION, "wrong", "right"),
         BitsPair(0, QUESTION, "right", "other"), BitsPair(1, QUESTION, "wrong", "other"))
EXACT = (True, False, True, False)
GOOD_SCORE = Score(images=(RED, BLUE), rows=(ScoreRow(0, QUESTION, "right"), ScoreRow(1, QUESTION, "wrong"),
                                             ScoreRow(0, QUESTION, "right")))


def service(**kwargs) -> tuple[SiloService, RightAnswerModel]:
    model = RightAnswerModel()
    return SiloService("hospital-a", model, **kwargs), model


def refused(client: SiloClient, call, request, code: ErrorCode, match: str, *, good: ScoreRequest = GOOD_SCORE,
            good_scores: tuple[float, ...] = (1.0, -1.0, 1.0)) -> None:
    """The request is refused with `code` and a message naming the problem, and the silo still serves `good`."""
    with pytest.raises(SiloError, match=match) as caught:
        call(request)
    assert caught.value.code == code
    assert client.score(good).scores == good_scores


def test_describe_names_the_silo_and_its_architecture(connect) -> None:
    client = connect(service()[0])
    assert isinstance(client, SiloClient)
    assert client.name == "hospital-a"
    assert client.describe() == SiloDescription(name="hospital-a", architecture="test_right_answer",
                                                trainable_params=0)


def test_scores_are_standardised_one_per_row_in_one_model_call(connect) -> None:
    silo, model = service()
    reply = connect(silo).score(GOOD_SCORE)
    assert reply.scores == (1.0, -1.0, 1.0)  # (raw - 0.5) / 0.5
    assert all(isinstance(s, float) for s in reply.scores)
    assert model.calls == 1


def test_correctness_bits_are_exact_without_randomized_response(connect) -> None:
    reply = connect(service()[0]).correctness_bits(Bits(images=(RED, BLUE), pairs=PAIRS))
    assert reply.bits == EXACT and reply.flip_probability is None


def test_randomized_response_flips_about_the_flip_probability_with_fresh_noise(connect) -> None:
    client = connect(service()[0])
    request = Bits(images=(RED, BLUE), pairs=PAIRS * 100, randomized_response_epsilon=1.5)
    first, second = client.correctness_bits(request), client.correctness_bits(request)
    flipped = sum(b != e for b, e in zip(first.bits, EXACT * 100, strict=True)) / 400
    assert first.flip_probability == pytest.approx(flip_probability(epsilon=1.5))
    assert abs(flipped - flip_probability(epsilon=1.5)) < 0.1
    # Fresh noise per call (p = 0.18 per bit: 400 equal bits by chance would be ~0.7 ** 400).
    assert first.bits != second.bits


def test_default_noise_is_os_entropy_and_a_seed_reproduces_it(connect) -> None:
    request = Bits(images=(RED, BLUE), pairs=PAIRS * 125, randomized_response_epsilon=1.0)
    unseeded = [connect(service()[0]).correctness_bits(request).bits for _ in range(2)]
    assert unseeded[0] != unseeded[1]
    seeded = [connect(service(randomized_response_seed=11)[0]).correctness_bits(request).bits for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.inf, math.nan])
def test_a_bad_epsilon_is_refused_before_anything_is_scored(connect, epsilon: float) -> None:
    silo, model = service()
    client = connect(silo)
    refused(client, client.correctness_bits,
            Bits(images=(RED, BLUE), pairs=PAIRS, randomized_response_epsilon=epsilon),
            ErrorCode.INVALID_ARGUMENT, "randomized_response_epsilon must be a finite number > 0")
    assert model.calls == 1  # only the good request of `refused`


def _bad_score_requests() -> list[tuple[str, ScoreRequest, str]]:
    row = ScoreRow(0, QUESTION, "right")
    forged = ImageBlob(sha256=BLUE.sha256, data=RED.data)
    return [
        ("no rows", Score(images=(RED,), rows=()), "rows is empty"),
        ("no images", Score(images=(), rows=(row,)), "images is empty"),
        ("index out of range", Score(images=(RED,), rows=(ScoreRow(1, QUESTION, "x"),)),
         r"rows\[0\].image is 1; the request has images 0..0"),
        ("digest mismatch", Score(images=(forged,), rows=(row,)), r"images\[0\]: sha256 does not match"),
        ("repeated image", Score(images=(RED, RED), rows=(row, ScoreRow(1, QUESTION, "x"))),
         r"images\[1\] repeats an earlier image"),
        ("unused image", Score(images=(RED, BLUE), rows=(row,)), r"images \[1\] are not referred to"),
        ("undecodable image", Score(images=(ImageBlob.of(b"not an image"),), rows=(row,)),
         r"images\[0\] could not be decoded as an image \(UnidentifiedImageError: cannot identify image file "
         r"<_io\.BytesIO object>\)$"),  # no address of the silo's process
        ("empty image", Score(images=(ImageBlob.of(b""),), rows=(row,)), r"images\[0\] is empty"),
        ("blank response", Score(images=(RED,), rows=(ScoreRow(0, QUESTION, "  "),)), r"responses\[0\] is empty"),
        ("empty prompt", Score(images=(RED,), rows=(ScoreRow(0, "", "x"),)), r"prompts\[0\] is empty"),
    ]


@pytest.mark.parametrize("case", _bad_score_requests(), ids=lambda case: case[0])
def test_bad_score_requests_are_invalid_argument_and_the_silo_still_serves(connect, case) -> None:
    _, request, match = case
    client = connect(service()[0])
    refused(client, client.score, request, ErrorCode.INVALID_ARGUMENT, match)


def test_policy_limits_refuse_oversize_requests(connect) -> None:
    limits = RequestLimits(max_items=3, max_images=2, max_image_bytes=len(RED.data) + 10, max_image_pixels=100,
                           max_text_chars=30)
    client = connect(service(limits=limits)[0])
    row = ScoreRow(0, QUESTION, "right")
    refused(client, client.score, Score(images=(RED,), rows=(row,) * 4), ErrorCode.INVALID_ARGUMENT,
            "4 rows in one request; this silo's policy allows at most 3")
    third = ImageBlob.of(png((1, 2, 3)))
    refused(client, client.score,
            Score(images=(RED, BLUE, third), rows=(row, ScoreRow(1, QUESTION, "x"), ScoreRow(2, QUESTION, "x"))),
            ErrorCode.INVALID_ARGUMENT, "3 images in one request; this silo's policy allows at most 2")
    big = ImageBlob.of(png((5, 5, 5)) + b"\0" * 64)
    refused(client, client.score, Score(images=(big,), rows=(row,)), ErrorCode.INVALID_ARGUMENT,
            r"images\[0\] is \d+ bytes; this silo's policy allows at most")
    wide = ImageBlob.of(png((5, 5, 5), size=(20, 20)))
    limits_pixels = RequestLimits(max_image_pixels=100)
    wide_client = connect(service(limits=limits_pixels)[0])
    refused(wide_client, wide_client.score, Score(images=(wide,), rows=(row,)), ErrorCode.INVALID_ARGUMENT,
            r"images\[0\] is 20x20 pixels; this silo's policy allows at most 100 pixels")
    refused(client, client.score, Score(images=(RED,), rows=(ScoreRow(0, QUESTION, "r" * 31),)),
            ErrorCode.INVALID_ARGUMENT, r"responses\[0\] is 31 characters; this silo's policy allows at most 30")
    refused(client, client.correctness_bits, Bits(images=(RED, BLUE), pairs=PAIRS), ErrorCode.INVALID_ARGUMENT,
            "4 pairs in one request; this silo's policy allows at most 3")


def test_texts_are_checked_before_any_image_is_decoded(connect) -> None:
    """Decoding the images (up to max_request_pixels of them) came right after the counts, so a request with a bad
    text cost the silo a decode of every image before it was refused; the cheap checks now come first."""
    client = connect(service()[0])
    undecodable = ImageBlob.of(b"not an image")
    refused(client, client.score, Score(images=(undecodable,), rows=(ScoreRow(0, QUESTION, " "),)),
            ErrorCode.INVALID_ARGUMENT, r"responses\[0\] is empty")
    refused(client, client.correctness_bits, Bits(images=(undecodable,), pairs=(BitsPair(0, QUESTION, "right", " "),)),
            ErrorCode.INVALID_ARGUMENT, r"rejected\[0\] is empty")


def test_bad_bits_requests_name_the_field(connect) -> None:
    client = connect(service()[0])
    refused(client, client.correctness_bits, Bits(images=(RED,), pairs=()), ErrorCode.INVALID_ARGUMENT,
            "pairs is empty")
    refused(client, client.correctness_bits,
            Bits(images=(RED,), pairs=(BitsPair(0, QUESTION, "right", " "),)), ErrorCode.INVALID_ARGUMENT,
            r"rejected\[0\] is empty")


def test_objectives_are_named_and_limited_by_the_policy(connect) -> None:
    # A hospital that lets its model judge correctness, not brevity: purpose limitation on every request.
    client = connect(service(allowed_objectives=frozenset({"correct"}))[0])
    brief = ScoreRequest(objective="correct_and_brief", images=GOOD_SCORE.images, rows=GOOD_SCORE.rows)
    refused(client, client.score, brief, ErrorCode.PERMISSION_DENIED,
            "does not allow its model to be used for 'correct_and_brief'")
    refused(client, client.correctness_bits,
            BitsRequest(objective="correct_and_brief", images=(RED, BLUE), pairs=PAIRS), ErrorCode.PERMISSION_DENIED,
            "does not allow its model to be used for 'correct_and_brief'")
    for unnamed in ("", "anything"):
        refused(client, client.score, ScoreRequest(objective=unnamed, images=GOOD_SCORE.images, rows=GOOD_SCORE.rows),
                ErrorCode.INVALID_ARGUMENT, f"objective '{unnamed}' is not one this consortium knows")


def test_weighted_requests_are_answered_pre_weighted_and_bad_weights_are_refused(connect) -> None:
    client = connect(service(max_weight=0.8)[0])
    weighted = Score(images=GOOD_SCORE.images, rows=GOOD_SCORE.rows, weights=(0.5, 0.25, 0.0))
    assert client.score(weighted).scores == (0.5, -0.25, 0.0)  # w * (1, -1, 1)
    # An unweighted request is the score at weight 1, so under a cap below 1 the silo still serves the weighted one.
    still_serves = {"good": weighted, "good_scores": (0.5, -0.25, 0.0)}
    for weights, match in (((0.5, float("nan"), 0.1), r"weights\[1\] is nan; a weight must be a finite number >= 0"),
                           ((0.5, float("inf"), 0.1), r"weights\[1\] is inf"), ((0.5, -0.1, 0.1), r"weights\[1\] is -0.1"),
                           ((0.5, 0.5), "2 weights for 3 rows")):
        refused(client, client.score, Score(images=GOOD_SCORE.images, rows=GOOD_SCORE.rows, weights=weights),
                ErrorCode.INVALID_ARGUMENT, match, **still_serves)
    refused(client, client.score, Score(images=GOOD_SCORE.images, rows=GOOD_SCORE.rows, weights=(0.5, 0.9, 0.1)),
            ErrorCode.PERMISSION_DENIED, r"weights\[1\] is 0.9; this silo's policy allows its score a weight of at most 0.8",
            **still_serves)
    refused(client, client.score, GOOD_SCORE, ErrorCode.PERMISSION_DENIED, "a request without weights", **still_serves)
