"""The in-process silo client: exact correctness bits, randomized response charged before answering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from coordinator.silo_client import (
    RANDOMIZED_RESPONSE_PURPOSE,
    InProcessSiloClient,
    SiloClient,
    SiloDescription,
)
from mor_secure.data.records import PreferencePair
from mor_secure.models.reward_model import RewardModel, Standardisation
from mor_secure.privacy.ledger import BudgetExceededError, PrivacyLedger, PrivacySpend
from mor_secure.privacy.randomized_response import flip_probability


class RightAnswerModel(RewardModel):
    """Raw score 1 for the response "right", 0 otherwise; counts how often it is asked."""

    architecture = "test_right_answer"

    def __init__(self) -> None:
        super().__init__(nn.Identity(), Standardisation(mean=0.5, std=0.5))
        self.calls = 0

    def side_inputs(self, images, prompts, responses):
        self.calls += 1
        return (torch.tensor([1.0 if r == "right" else 0.0 for r in responses]),)

    def _save_weights(self, directory: Path) -> dict:
        return {}

    @classmethod
    def _load(cls, directory: Path, settings: dict, standardisation: Standardisation) -> RightAnswerModel:
        return cls()


def pair(chosen: str, rejected: str, index: int = 0) -> PreferencePair:
    return PreferencePair(image_id=f"img/{index}", image_path=Path(f"/data/{index}.png"),
                          prompt="what shape is in the image?", chosen=chosen, rejected=rejected, kind="shape")


# Right on pairs 0 and 2 (chosen is "right"), wrong on 1 (rejected is "right"), tie on 3 (not strictly above).
PAIRS = [pair("right", "wrong", 0), pair("wrong", "right", 1), pair("right", "other", 2), pair("wrong", "other", 3)]
EXACT = [True, False, True, False]


@pytest.fixture
def ledger(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "ledger.json", epsilon_budget=3.0, delta_budget=1e-5)


def test_client_satisfies_the_protocol_and_describes_itself() -> None:
    client = InProcessSiloClient("hospital-a", RightAnswerModel())
    assert isinstance(client, SiloClient)
    assert client.name == "hospital-a"
    assert client.describe() == SiloDescription(name="hospital-a", architecture="test_right_answer",
                                                trainable_params=0)


def test_score_is_standardised_one_per_row_in_one_call() -> None:
    model = RightAnswerModel()
    client = InProcessSiloClient("hospital-a", model)
    scores = client.score(["/a.png", "/b.png", "/c.png"], ["q?", "q?", "q?"], ["right", "wrong", "right"])
    assert scores.dtype == torch.float32
    assert scores.tolist() == [1.0, -1.0, 1.0]  # (raw - 0.5) / 0.5
    assert model.calls == 1


def test_correctness_bits_are_exact_without_randomized_response(ledger: PrivacyLedger) -> None:
    client = InProcessSiloClient("hospital-a", RightAnswerModel(), ledger=ledger)
    bits = client.correctness_bits(PAIRS)
    assert bits.dtype == torch.bool and bits.tolist() == EXACT
    assert ledger.spends == ()  # exact bits are not randomized response: nothing charged here


def test_randomized_response_charges_once_per_call_with_its_purpose(ledger: PrivacyLedger) -> None:
    model = RightAnswerModel()
    client = InProcessSiloClient("hospital-a", model, ledger=ledger, seed=0)
    many = PAIRS * 50
    bits = client.correctness_bits(many, randomized_response_epsilon=1.5)
    assert bits.dtype == torch.bool and bits.shape == (len(many),)
    (spend,) = ledger.spends
    assert (spend.purpose, spend.epsilon, spend.delta) == (RANDOMIZED_RESPONSE_PURPOSE, 1.5, 0.0)
    assert spend.purpose == "answer:correctness-bits:randomized-response"
    assert spend.details["pairs"] == len(many)
    assert spend.details["flip_probability"] == pytest.approx(flip_probability(epsilon=1.5))
    # The bits really went through noise: some differ from the exact answer, most do not.
    flipped = (bits != torch.tensor(EXACT * 50)).float().mean().item()
    assert 0.05 < flipped < 0.4
    # A second call is a second mechanism: charged again, with fresh noise.
    again = client.correctness_bits(many, randomized_response_epsilon=1.5)
    assert len(ledger.spends) == 2 and ledger.spent_epsilon == pytest.approx(3.0)
    assert not torch.equal(bits, again)


def test_same_seed_same_noise(tmp_path: Path) -> None:
    answers = []
    for run in range(2):
        ledger = PrivacyLedger(tmp_path / f"ledger{run}.json", epsilon_budget=3.0, delta_budget=1e-5)
        client = InProcessSiloClient("hospital-a", RightAnswerModel(), ledger=ledger, seed=11)
        answers.append(client.correctness_bits(PAIRS * 20, randomized_response_epsilon=0.5))
    assert torch.equal(answers[0], answers[1])


def test_unaffordable_randomized_response_is_refused_before_answering(ledger: PrivacyLedger) -> None:
    ledger.record(PrivacySpend.now(purpose="train:reward-model", epsilon=2.5, delta=1e-6))
    before = ledger.path.read_text()
    model = RightAnswerModel()
    client = InProcessSiloClient("hospital-a", model, ledger=ledger)
    with pytest.raises(BudgetExceededError) as refused:
        client.correctness_bits(PAIRS, randomized_response_epsilon=1.0)
    assert refused.value.requested_epsilon == 1.0 and refused.value.spent_epsilon == 2.5
    assert model.calls == 0  # nothing was scored, so nothing could leak
    assert ledger.path.read_text() == before
    assert [s.purpose for s in ledger.spends] == ["train:reward-model"]


def test_randomized_response_needs_a_ledger_and_a_valid_epsilon(ledger: PrivacyLedger) -> None:
    model = RightAnswerModel()
    with pytest.raises(RuntimeError, match="no privacy ledger"):
        InProcessSiloClient("hospital-a", model).correctness_bits(PAIRS, randomized_response_epsilon=1.0)
    client = InProcessSiloClient("hospital-a", model, ledger=ledger)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="0 < epsilon < inf"):
            client.correctness_bits(PAIRS, randomized_response_epsilon=bad)
    assert model.calls == 0 and ledger.spends == ()
    assert json.loads(ledger.path.read_text())["spends"] == []


def test_bad_inputs_are_rejected_with_what_is_wrong() -> None:
    client = InProcessSiloClient("hospital-a", RightAnswerModel())
    with pytest.raises(ValueError, match="one entry per row, got lengths 2, 2, 1"):
        client.score(["/a.png", "/b.png"], ["q?", "q?"], ["right"])
    with pytest.raises(ValueError, match="empty"):
        client.score([], [], [])
    with pytest.raises(ValueError, match=r"responses\[1\] must be a non-empty string"):
        client.score(["/a.png", "/b.png"], ["q?", "q?"], ["right", "  "])
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a non-empty string"):
        client.score(["/a.png"], [""], ["right"])
    with pytest.raises(ValueError, match="prompts must be a sequence"):
        client.score(["/a.png"], "q?", ["right"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one pair"):
        client.correctness_bits([])
    with pytest.raises(ValueError, match=r"pairs\[1\] is a str"):
        client.correctness_bits([PAIRS[0], "not a pair"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"rejected\[0\] must be a non-empty string"):
        client.correctness_bits([pair("right", "")])
    with pytest.raises(ValueError, match="non-empty string"):
        InProcessSiloClient("", RightAnswerModel())
    with pytest.raises(ValueError, match="must be a RewardModel"):
        InProcessSiloClient("hospital-a", object())  # type: ignore[arg-type]
