"""The in-process silo client: exact correctness bits; randomized response from OS entropy, charged to no ledger."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from coordinator import silo_client
from coordinator.silo_client import InProcessSiloClient, SiloClient, SiloDescription
from mor_secure.data.records import PreferencePair
from mor_secure.models.reward_model import RewardModel, Standardisation
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


def test_correctness_bits_are_exact_without_randomized_response() -> None:
    client = InProcessSiloClient("hospital-a", RightAnswerModel())
    bits = client.correctness_bits(PAIRS)
    assert bits.dtype == torch.bool and bits.tolist() == EXACT


def test_randomized_response_flips_some_bits_with_fresh_noise_per_call() -> None:
    model = RightAnswerModel()
    client = InProcessSiloClient("hospital-a", model, seed=0)
    many = PAIRS * 50
    bits = client.correctness_bits(many, randomized_response_epsilon=1.5)
    assert bits.dtype == torch.bool and bits.shape == (len(many),)
    # The bits really went through noise at about the flip probability: some differ, most do not.
    flipped = (bits != torch.tensor(EXACT * 50)).float().mean().item()
    assert abs(flipped - flip_probability(epsilon=1.5)) < 0.1
    # The generator is created once: a second call draws fresh noise.
    assert not torch.equal(bits, client.correctness_bits(many, randomized_response_epsilon=1.5))


def test_an_explicit_seed_gives_the_same_noise() -> None:
    """For tests and simulations only: a seeded client's noise is reproducible, hence removable."""
    answers = [InProcessSiloClient("hospital-a", RightAnswerModel(), seed=11)
               .correctness_bits(PAIRS * 20, randomized_response_epsilon=0.5) for _ in range(2)]
    assert torch.equal(answers[0], answers[1])


def test_default_noise_is_from_os_entropy_and_nothing_is_charged(tmp_path: Path, monkeypatch) -> None:
    """Two default clients on the same 500 pairs disagree: the noise is not seeded. No ledger is touched.

    The bits are post-processing of a DP-trained model on public pairs, so
    randomized response is charged to no ledger: the client has none to
    charge, and answering writes nothing to disk.
    """
    monkeypatch.chdir(tmp_path)
    many = (PAIRS * 125)[:500]
    first, second = (InProcessSiloClient("hospital-a", RightAnswerModel()) for _ in range(2))
    bits = [client.correctness_bits(many, randomized_response_epsilon=1.0) for client in (first, second)]
    # Each bit flips with p = 0.27, so two independent answers agree on a pair with probability ~0.6:
    # identical answers on all 500 pairs by chance would have probability ~0.6 ** 500.
    assert not torch.equal(bits[0], bits[1])
    assert "ledger" not in inspect.signature(InProcessSiloClient).parameters
    assert not any("ledger" in name for name in vars(first))
    assert not any(getattr(value, "__module__", "") == "mor_secure.privacy.ledger"
                   for value in vars(silo_client).values())
    assert list(tmp_path.iterdir()) == []


def test_an_invalid_epsilon_is_refused_before_anything_is_scored() -> None:
    model = RightAnswerModel()
    client = InProcessSiloClient("hospital-a", model)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="0 < epsilon < inf"):
            client.correctness_bits(PAIRS, randomized_response_epsilon=bad)
    assert model.calls == 0


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
