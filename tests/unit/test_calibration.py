"""Router calibration end to end: objective pairs -> one bits call per silo and objective -> a router.

The silos here are fakes (this is a test of the calibration code around
them): silo k is right exactly on kind k for "which answer is correct"
pairs, and only `brief-expert` is right on "terse vs padded" pairs. Features
are the real `RouterFeatures` of real easy-VQA records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.calibration import (
    OBJECTIVES,
    CalibrationConfig,
    calibrate_router,
    calibration_records,
    collect_bits,
    mean_weights_by_kind,
    objective_pairs,
)
from coordinator.router import RouterConfig, RouterFeatures
from mor_secure.data import QUESTION_KINDS
from mor_secure.data.easyvqa import kind_of_answer
from mor_secure.privacy.randomized_response import debiased_mean, flip_probability, randomize_bits
from mor_secure.wire import BitsReply, BitsRequest, SiloDescription

SILO_OF_KIND = {"color": "color-expert", "shape": "shape-expert", "yes_no": "yes-no-expert"}


class KindExpert:
    """Right on correct-vs-wrong pairs of one kind; on terse-vs-padded pairs right only if `likes_brief`."""

    def __init__(self, name: str, kind: str | None, *, likes_brief: bool = False) -> None:
        self.name, self.kind, self.likes_brief = name, kind, likes_brief
        self.calls: list[int] = []

    def describe(self) -> SiloDescription:
        return SiloDescription(name=self.name, architecture="fake", trainable_params=0)

    def score(self, request):
        raise AssertionError("calibration must ask for bits, never for raw scores")

    def correctness_bits(self, request: BitsRequest) -> BitsReply:
        pairs = request.pairs
        self.calls.append(len(pairs))
        padded = [p.chosen in p.rejected and p.chosen != p.rejected for p in pairs]
        # Calibration pairs keep the true one-word answer as `chosen`, so it names the question's kind.
        return BitsReply(bits=tuple(self.likes_brief if is_padded else kind_of_answer(p.chosen) == self.kind
                                    for p, is_padded in zip(pairs, padded, strict=True)))


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> RouterFeatures:
    return RouterFeatures(tmp_path_factory.mktemp("router-cache"))


def test_objective_pairs_keep_the_true_answer_chosen(consortium) -> None:
    _, splits = consortium
    records = list(splits.calibration)
    correct = objective_pairs(records, "correct", seed=0)
    brief = objective_pairs(records, "correct_and_brief", seed=0)
    assert [p.chosen for p in correct] == [p.chosen for p in brief] == [r.answer for r in records]
    assert all(p.rejected != p.chosen and len(p.rejected.split()) == 1 for p in correct)
    padded = [p for p in brief if p.chosen in p.rejected and p.rejected != p.chosen]
    assert 0.3 < len(padded) / len(brief) < 0.7  # about half the pairs test brevity
    with pytest.raises(ValueError, match="unknown objective"):
        objective_pairs(records, "kind", seed=0)


def test_calibration_records_cap_and_exclusion(consortium) -> None:
    _, splits = consortium
    capped = calibration_records(splits.calibration, CalibrationConfig(max_records_per_kind=5))
    assert {k: sum(r.kind == k for r in capped) for k in QUESTION_KINDS} == dict.fromkeys(QUESTION_KINDS, 5)
    without_shape = calibration_records(splits.calibration, CalibrationConfig(exclude_kinds=["shape"]))
    assert without_shape and all(r.kind != "shape" for r in without_shape)
    with pytest.raises(ValueError, match="leaves no calibration data"):
        CalibrationConfig(exclude_kinds=list(QUESTION_KINDS))
    with pytest.raises(ValueError, match="without repeats"):
        CalibrationConfig(objectives=["correct", "correct"])


def test_router_routes_each_kind_to_its_silo_and_objective_changes_routing(consortium, features) -> None:
    _, splits = consortium
    silos = [KindExpert(SILO_OF_KIND[k], k) for k in QUESTION_KINDS] + [KindExpert("brief-expert", None,
                                                                                  likes_brief=True)]
    config = CalibrationConfig(max_records_per_kind=None, router=RouterConfig(epochs=60))
    result = calibrate_router(silos, splits.calibration, features, config)

    assert all(len(s.calls) == len(OBJECTIVES) for s in silos), "one batched bits call per silo per objective"
    assert result.silo_accuracy["correct"]["shape-expert"]["shape"] == 1.0
    test = list(splits.test)
    test_features = features.encode([r.image_path for r in test], [r.question for r in test])
    kinds = [r.kind for r in test]
    correct = mean_weights_by_kind(result.router, test_features, kinds, "correct")
    for kind, silo in SILO_OF_KIND.items():
        assert correct[kind][silo] >= 0.8, (kind, correct[kind])
    brief = mean_weights_by_kind(result.router, test_features, kinds, "correct_and_brief")
    for kind in QUESTION_KINDS:
        assert brief[kind]["brief-expert"] > correct[kind]["brief-expert"] + 0.2, (kind, brief[kind])


def test_leave_one_kind_out_never_shows_that_kind(consortium, features) -> None:
    _, splits = consortium
    silos = [KindExpert(SILO_OF_KIND[k], k) for k in QUESTION_KINDS]
    config = CalibrationConfig(exclude_kinds=["shape"], router=RouterConfig(epochs=5))
    result = calibrate_router(silos, splits.calibration, features, config)
    assert all("shape" not in by_kind for by_silo in result.silo_accuracy.values() for by_kind in by_silo.values())
    assert result.records == sum(r.kind != "shape" for r in splits.calibration)


def test_randomized_response_needs_no_ledger_and_config_checks(consortium, features, tmp_path: Path,
                                                               monkeypatch) -> None:
    """Bits on public pairs from a DP-trained model are post-processing: randomized response charges nothing."""
    from mor_secure.models.reward_architectures import SmallCNNRewardModel
    from silo_agent.in_process import InProcessSiloClient
    from silo_agent.service import SiloService
    from mor_secure.privacy.randomized_response import flip_probability

    _, splits = consortium
    monkeypatch.chdir(tmp_path)
    client = InProcessSiloClient(SiloService("no-ledger", SmallCNNRewardModel(seed=0)))
    config = CalibrationConfig(randomized_response_epsilon=1.0, max_records_per_kind=3, router=RouterConfig(epochs=1))
    result = calibrate_router([client], splits.calibration, features, config)
    assert result.records == 3 * len(QUESTION_KINDS)
    assert list(tmp_path.iterdir()) == []  # nothing written: no ledger charged
    bits = collect_bits([client], splits.calibration, features, config)
    assert bits.flip_probabilities == [pytest.approx(flip_probability(epsilon=1.0))]
    with pytest.raises(ValueError):
        CalibrationConfig(randomized_response_epsilon=0.0)
    with pytest.raises(ValueError, match="at least one silo"):
        calibrate_router([], splits.calibration, features, config)


class NoisyKindExpert(KindExpert):
    """A `KindExpert` answering through randomized response, seeded (a test of the calibration code around it)."""

    def __init__(self, name: str, kind: str, *, epsilon: float) -> None:
        super().__init__(name, kind)
        self.epsilon, self.generator = epsilon, torch.Generator().manual_seed(5)
        self.reported: list[bool] = []

    def correctness_bits(self, request: BitsRequest) -> BitsReply:
        true_bits = torch.tensor(super().correctness_bits(request).bits, dtype=torch.bool)
        noisy = randomize_bits(true_bits, epsilon=self.epsilon, generator=self.generator)
        self.reported += noisy.tolist()
        return BitsReply(bits=tuple(noisy.tolist()), flip_probability=flip_probability(epsilon=self.epsilon))


def test_the_reported_share_ranked_right_is_debiased_under_randomized_response(consortium, features) -> None:
    """A silo right on every shape pair: the raw share of its noisy bits is about 0.73 at epsilon 1, the share
    calibration reports is the unbiased estimate of the true share, 1."""
    _, splits = consortium
    silo = NoisyKindExpert("shape-expert", "shape", epsilon=1.0)
    config = CalibrationConfig(objectives=["correct"], randomized_response_epsilon=1.0, max_records_per_kind=None,
                               router=RouterConfig(epochs=1))
    result = calibrate_router([silo], splits.calibration, features, config)
    shape = [kind_of_answer(p.chosen) == "shape" for p in objective_pairs(
        calibration_records(splits.calibration, config), "correct", seed=config.seed)]
    noisy = torch.tensor([bit for bit, is_shape in zip(silo.reported, shape, strict=True) if is_shape])
    reported = result.silo_accuracy["correct"]["shape-expert"]["shape"]
    assert reported == round(debiased_mean(noisy, epsilon=1.0), 4)
    assert noisy.float().mean().item() < 0.85 and abs(reported - 1.0) < 0.3



def test_leaving_a_kind_out_keeps_the_other_kinds_calibration_records(consortium) -> None:
    """Leave-one-silo-out compares routers that differ in the held-out kind only, not in a reshuffled subsample."""
    _, splits = consortium
    full = calibration_records(splits.calibration, CalibrationConfig(max_records_per_kind=3))
    for held_out in QUESTION_KINDS:
        config = CalibrationConfig(max_records_per_kind=3, exclude_kinds=[held_out])
        assert calibration_records(splits.calibration, config) == [r for r in full if r.kind != held_out]


class PairRecorder(KindExpert):
    """A kind expert that keeps every pair it was asked about, as (image bytes, prompt, chosen, rejected)."""

    def __init__(self, name: str, kind: str | None) -> None:
        super().__init__(name, kind)
        self.asked: list[tuple[bytes, str, str, str]] = []

    def correctness_bits(self, request: BitsRequest) -> BitsReply:
        self.asked.extend((request.images[p.image].data, p.prompt, p.chosen, p.rejected) for p in request.pairs)
        return super().correctness_bits(request)


def test_leaving_a_kind_out_keeps_the_other_kinds_pairs(consortium, features) -> None:
    """The rejected answers (and padded answers) of the other kinds are the full calibration's, not a redraw."""
    _, splits = consortium

    def asked(exclude_kinds: list[str]) -> list[tuple[bytes, str, str, str]]:
        silo = PairRecorder("recorder", None)
        collect_bits([silo], splits.calibration, features,
                     CalibrationConfig(max_records_per_kind=20, exclude_kinds=exclude_kinds))
        return silo.asked

    full = asked([])
    for held_out in QUESTION_KINDS:
        assert asked([held_out]) == [pair for pair in full if kind_of_answer(pair[2]) != held_out], held_out
