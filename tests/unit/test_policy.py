"""Silo policies: every shipped example validates; the engine refuses with the right status and releases slots."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import pytest

from mor_secure.config import ConfigError
from mor_secure.pki import PartyIdentity
from mor_secure.policy import RateLimit, SiloAdmission, SiloPolicy, load_policy
from mor_secure.wire import ErrorCode, SiloError

REPO = Path(__file__).resolve().parents[2]
COORDINATOR = SimpleNamespace(identity=PartyIdentity("coordinator", "coordinator"), serial=1)
SCORE = "/mor_secure.proto.v1.SiloRewardService/Score"


@pytest.mark.parametrize("path", sorted((REPO / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_policy_validates(path: Path) -> None:
    policy = load_policy(path)
    assert policy.allowed_callers["Score"] == ["mor://coordinator/coordinator"]


def test_default_yaml_is_the_schema_default() -> None:
    assert load_policy(REPO / "policies" / "default.yaml") == SiloPolicy()


def test_bad_policies_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    for text, match in (("allowed_callers: {Scores: []}\n", "unknown RPC"),
                        ("allowed_callers: {Score: [https://evil]}\n", "not a consortium identity"),
                        ("daily_cap: 0\n", "daily_cap"), ("max_items: 3\n", "max_items"),
                        ("max_concurrent_requests: 65\n", "max_concurrent_requests"),
                        ("limits: {max_request_pixels: 0}\n", "max_request_pixels"),
                        ("allowed_objectives: [correct, gossip]\n", r"unknown objective\(s\) \['gossip'\]")):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=match):
            load_policy(path)


def test_the_default_pixel_limit_holds_the_largest_request_of_the_consortiums_images() -> None:
    """The consortium's images are 64x64 (easy-VQA): a request of as many as max_images allows fits."""
    for limits in (SiloPolicy().limits, load_policy(REPO / "policies" / "hospital-strict.yaml").limits):
        assert limits.max_images * 64 * 64 <= limits.max_request_pixels < 1 << 25


def refused(admission: SiloAdmission, code: ErrorCode, match: str, caller=COORDINATOR) -> None:
    with pytest.raises(SiloError, match=match) as caught:
        admission.admit(caller, SCORE)
    assert caught.value.code == code


def test_rate_limit_refills_with_time_and_refusals_cost_nothing() -> None:
    now = [0.0]
    admission = SiloAdmission(SiloPolicy(rate_limit=RateLimit(per_second=2, burst=2)), clock=lambda: now[0])
    admission.admit(COORDINATOR, SCORE)()
    admission.admit(COORDINATOR, SCORE)()
    refused(admission, ErrorCode.RESOURCE_EXHAUSTED, "rate limit")
    now[0] = 0.5  # one token back after 0.5 s at 2/s
    admission.admit(COORDINATOR, SCORE)()
    refused(admission, ErrorCode.RESOURCE_EXHAUSTED, "rate limit")


def test_daily_cap_resets_with_the_utc_day_and_concurrency_slots_are_released() -> None:
    day = [dt.date(2026, 12, 1)]
    admission = SiloAdmission(SiloPolicy(daily_cap=2, max_concurrent_requests=1), today=lambda: day[0])
    release = admission.admit(COORDINATOR, SCORE)
    refused(admission, ErrorCode.RESOURCE_EXHAUSTED, "at most 1 requests at once")
    release()
    release()  # releasing twice frees one slot, not two
    admission.admit(COORDINATOR, SCORE)()
    refused(admission, ErrorCode.RESOURCE_EXHAUSTED, "daily cap of 2")
    day[0] = dt.date(2026, 12, 2)
    admission.admit(COORDINATOR, SCORE)()


def test_callers_not_in_the_policy_are_permission_denied() -> None:
    rogue = SimpleNamespace(identity=PartyIdentity("coordinator", "rogue"), serial=2)
    refused(SiloAdmission(SiloPolicy()), ErrorCode.PERMISSION_DENIED, "not allowed to call Score", caller=rogue)
