"""ClearFusion: each silo gets only its own weights, answers w_k r_k; absent silos' weight goes to the others."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from silo_fakes import RightAnswerModel, png

from coordinator.fusion import ClearFusion, FusionItems, RoundFailedError
from mor_secure.audit import AuditLog, read_log
from mor_secure.wire import ErrorCode, SiloError
from silo_agent.in_process import InProcessSiloClient
from silo_agent.service import SiloService


class Recording(InProcessSiloClient):
    """The real service behind the in-process adapter, recording the weights each request carried."""

    def __init__(self, name: str, *, down: bool = False, refuses: bool = False) -> None:
        super().__init__(SiloService(name, RightAnswerModel()))
        self.down, self.refuses, self.weights = down, refuses, []

    def score(self, request):
        if self.down:
            raise SiloError(ErrorCode.UNAVAILABLE, f"silo {self.name!r}: connection refused")
        if self.refuses:
            raise SiloError(ErrorCode.PERMISSION_DENIED, f"silo {self.name!r}: its policy refuses this objective")
        self.weights.append(request.weights)
        return super().score(request)


def rounds(path: Path) -> list[dict]:
    return [e.fields() for e in read_log(path).entries if e.fields().get("event") == "round"]


@pytest.fixture
def items(tmp_path: Path) -> FusionItems:
    image = tmp_path / "a.png"
    image.write_bytes(png())
    # Rows 0 and 2 are the same (image, prompt, response): sent once. Scores: right -> 1, wrong -> -1.
    return FusionItems(images=(image,) * 3, prompts=("q",) * 3, responses=("right", "wrong", "right"))


def test_each_silo_is_sent_only_its_own_weights_and_the_sum_is_the_fused_reward(items: FusionItems) -> None:
    silos = [Recording("a"), Recording("b")]
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.25, 0.75]])
    fused = ClearFusion(silos).fuse(items, weights)
    assert fused.tolist() == pytest.approx([1.0, -1.0, 1.0])
    assert silos[0].weights == [(0.25, 0.5)] and silos[1].weights == [(0.75, 0.5)]  # distinct rows only


def test_an_absent_silos_weight_goes_to_the_others_and_orphan_rows_get_their_plain_average(items) -> None:
    silos = [Recording("a"), Recording("b"), Recording("c", down=True)]
    # Row "right": weight split a/c, so a's term is rescaled to a's weight alone; row "wrong": all on c (orphan).
    weights = torch.tensor([[0.25, 0.0, 0.75], [0.0, 0.0, 1.0], [0.25, 0.0, 0.75]])
    fusion = ClearFusion(silos, minimum_participants=2)
    assert fusion.fuse(items, weights).tolist() == pytest.approx([1.0, -1.0, 1.0])
    assert fusion.last_round == {"a": True, "b": True, "c": False}
    # The orphan row was asked again of the present silos only, with equal weights.
    assert silos[0].weights == [(0.25, 0.0), (0.5,)] and silos[1].weights == [(0.0, 0.0), (0.5,)]
    with pytest.raises(RoundFailedError, match="only 2 of 3 silos answered, fewer than the consortium's minimum of 3"):
        ClearFusion(silos, minimum_participants=3).fuse(items, weights)


def test_a_refused_round_is_on_the_record_with_who_answered(items, pki, tmp_path: Path) -> None:
    log = AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"])
    silos = [Recording("a"), Recording("b", refuses=True)]
    try:
        with pytest.raises(SiloError) as refused:
            ClearFusion(silos, audit=log, method="mor").fuse(items, torch.full((3, 2), 0.5))
        assert refused.value.code == ErrorCode.PERMISSION_DENIED
    finally:
        log.close()
    (entry,) = rounds(tmp_path / "coordinator.db")
    assert (entry["asked"], entry["answered"]) == (["a", "b"], ["a"])


class Malformed(Recording):
    """Answers one score too few: not a refusal, an answer that does not check out."""

    def score(self, request):
        reply = super().score(request)
        return replace(reply, scores=reply.scores[:-1])


def test_a_round_a_silo_answers_malformed_fails_on_the_record(items, pki, tmp_path: Path) -> None:
    """The round used to fail with a RuntimeError before it was recorded: a silo could keep a round off the
    coordinator's record by answering malformed."""
    log = AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"])
    try:
        with pytest.raises(SiloError, match="silo 'b' returned 1 scores for 2 rows") as failed:
            ClearFusion([Recording("a"), Malformed("b")], audit=log, method="mor").fuse(items, torch.full((3, 2), 0.5))
        assert failed.value.code == ErrorCode.INTERNAL
    finally:
        log.close()
    (entry,) = rounds(tmp_path / "coordinator.db")
    assert (entry["asked"], entry["answered"]) == (["a", "b"], ["a"])


def test_a_round_that_fails_the_reward_records_no_router_weights(items, pki, tmp_path: Path) -> None:
    """Below the minimum, the round scored no row: its weights would be counted in the report's mean router weight."""
    log = AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"])
    kinds = FusionItems(images=items.images, prompts=items.prompts, responses=items.responses, kinds=("color",) * 3)
    try:
        with pytest.raises(RoundFailedError, match="fewer than the consortium's minimum of 2"):
            ClearFusion([Recording("a"), Recording("b", down=True)], audit=log, method="mor").fuse(
                kinds, torch.full((3, 2), 0.5))
        ClearFusion([Recording("a"), Recording("b")], audit=log, method="mor").fuse(kinds, torch.full((3, 2), 0.5))
    finally:
        log.close()
    failed, scored = rounds(tmp_path / "coordinator.db")
    assert (failed["answered"], "mean_weight" in failed) == (["a"], False)
    assert scored["mean_weight"] == {"a": {"color": [0.5, 2]}, "b": {"color": [0.5, 2]}}


def test_the_fallback_round_records_only_the_silos_it_asked_and_no_router_weights(items, pki, tmp_path: Path) -> None:
    """The orphan rows' second round goes to the present silos with equal weights, which are not the router's."""
    log = AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"])
    silos = [Recording("a"), Recording("b"), Recording("c", down=True)]
    weights = torch.tensor([[0.25, 0.0, 0.75], [0.0, 0.0, 1.0], [0.25, 0.0, 0.75]])
    kinds = FusionItems(images=items.images, prompts=items.prompts, responses=items.responses,
                        kinds=("color",) * 3)
    try:
        ClearFusion(silos, minimum_participants=2, audit=log, method="mor").fuse(kinds, weights)
    finally:
        log.close()
    first, fallback = rounds(tmp_path / "coordinator.db")
    assert (first["asked"], first["answered"]) == (["a", "b", "c"], ["a", "b"])
    # The router's weights, for every silo asked, over the rows they scored (row 0; row 2 is the same row, sent
    # once): not the orphan (row 1), whose reward is the fallback's plain average.
    assert first["mean_weight"] == {"a": {"color": [0.25, 1]}, "b": {"color": [0.0, 1]}, "c": {"color": [0.75, 1]}}
    assert (fallback["asked"], fallback["answered"]) == (["a", "b"], ["a", "b"])
    assert set(fallback["requests"]) == set(fallback["weights_digest"]) == {"a", "b"}
    assert "mean_weight" not in fallback



def test_a_row_whose_present_silos_hold_almost_no_weight_gets_their_plain_average(items: FusionItems) -> None:
    """Rescaling a weight of 1e-13 to 1 trusts a silo the router did not; and it used to shrink the reward."""
    silos = [Recording("a"), Recording("b", down=True)]
    weights = torch.tensor([[1e-13, 1.0], [0.5, 0.5], [1e-13, 1.0]])
    assert ClearFusion(silos, minimum_participants=1).fuse(items, weights).tolist() == pytest.approx([1.0, -1.0, 1.0])


def test_secure_rounding_divided_by_the_present_weight_stays_within_a_thousandth() -> None:
    """Secure terms are rounded to 2^-20 before the sum; renormalising divides that error by the present weight."""
    from coordinator.fusion import MIN_PRESENT_WEIGHT, renormalised
    from mor_secure.secagg.fixed_point import decode, encode

    score, present = 0.7, torch.tensor([True, False])
    for weight in (MIN_PRESENT_WEIGHT, 0.3):
        summed = torch.tensor(decode(encode([weight * score])), dtype=torch.float32)
        fused, orphans = renormalised(summed, torch.tensor([[weight, 1 - weight]]), present)
        assert not orphans.item() and abs(fused.item() - score) <= 1e-3
    for weight in (3e-7, MIN_PRESENT_WEIGHT / 2):
        summed = torch.tensor(decode(encode([weight * score])), dtype=torch.float32)
        assert renormalised(summed, torch.tensor([[weight, 1 - weight]]), present)[1].item()
