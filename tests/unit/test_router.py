"""The Mixture-of-Rewards router learns, on real easy-VQA inputs, which silo to trust for which kind.

The key check: three synthetic silos, each right exactly on one question kind;
a router trained on calibration records must, on held-out test records, put
most of its weight on the right silo for every kind (also when the objective
changes who is right, and when the bits come through randomized response).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.router import (
    ROUTER_FEATURE_DIM,
    Router,
    RouterConfig,
    RouterFeatures,
    corrected_bce,
    load_router,
    save_router,
    train_router,
)
from mor_secure.data import QUESTION_KINDS, load_consortium, make_splits
from mor_secure.privacy.randomized_response import flip_probability, randomize_bits

# 30 epochs (~170 steps) is plenty for this easy, clean task and keeps each training around a second.
CONFIG = RouterConfig(epochs=30)
SILOS = ("color-expert", "shape-expert", "yes-no-expert")  # silo k is right exactly on QUESTION_KINDS[k]
SPEC_YAML = """\
seed: 0
splits:
  sft_images: 50
  calibration_images: 150
  test_images: 60
silos:
  - name: dummy
    image_share: 0.01
    reliable_kinds: [shape]
    label_flip_rate: 0.0
"""


# The router's matrices are small: on 2 shared, busy cores a second thread only adds contention
# (measured here: ~7 ms/step on 1 thread, ~70 ms on 2).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real RouterFeatures of the calibration and held-out test records, with their kinds (computed once)."""
    root = tmp_path_factory.mktemp("router")
    (root / "consortium.yaml").write_text(SPEC_YAML, encoding="utf-8")
    splits = make_splits(load_consortium(root / "consortium.yaml"))
    encoder = RouterFeatures(root / "feature-cache")

    def encode(records):
        features = encoder.encode([r.image_path for r in records], [r.question for r in records])
        kinds = torch.tensor([QUESTION_KINDS.index(r.kind) for r in records])
        return features, kinds

    train_x, train_kind = encode(splits.calibration)
    test_x, test_kind = encode(splits.test)
    assert set(train_kind.tolist()) == set(test_kind.tolist()) == {0, 1, 2}
    return {"train_x": train_x, "train_kind": train_kind, "test_x": test_x, "test_kind": test_kind}


@pytest.fixture(scope="module")
def router(data: dict) -> Router:
    """One objective; silo k right exactly on kind k."""
    bits = data["train_kind"][:, None] == torch.arange(3)[None, :]
    ids = torch.zeros(len(bits), dtype=torch.long)
    return train_router(data["train_x"], ids, bits, silo_names=SILOS, objective_names=["accuracy"],
                        config=CONFIG)


def mean_weight_on(router: Router, data: dict, objective: int, right_silo_of_kind: list[int]) -> dict[str, float]:
    """Mean held-out weight on the right silo, per kind."""
    ids = torch.full((len(data["test_x"]),), objective, dtype=torch.long)
    with torch.no_grad():
        weights = router.weights(data["test_x"], ids)
    result = {}
    for kind, name in enumerate(QUESTION_KINDS):
        rows = data["test_kind"] == kind
        result[name] = weights[rows, right_silo_of_kind[kind]].mean().item()
    return result


def test_features_are_image_then_prompt_with_unit_norm_halves(data: dict) -> None:
    x = data["test_x"]
    assert x.shape == (len(data["test_kind"]), ROUTER_FEATURE_DIM) == (x.shape[0], 1280 + 384)
    assert torch.allclose(x[:, :1280].norm(dim=-1), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(x[:, 1280:].norm(dim=-1), torch.ones(len(x)), atol=1e-5)


def test_router_routes_each_kind_to_its_silo_on_held_out_records(router: Router, data: dict) -> None:
    per_kind = mean_weight_on(router, data, 0, [0, 1, 2])
    for kind, weight in per_kind.items():
        assert weight >= 0.8, (kind, per_kind)


def test_weights_are_a_distribution_over_silos(router: Router, data: dict) -> None:
    ids = torch.zeros(len(data["test_x"]), dtype=torch.long)
    with torch.no_grad():
        weights = router.weights(data["test_x"], ids)
        logits = router(data["test_x"], ids)
    assert weights.shape == logits.shape == (len(data["test_x"]), 3)
    assert (weights >= 0).all()
    assert torch.allclose(weights.sum(dim=-1), torch.ones(len(weights)), atol=1e-5)
    assert torch.allclose(weights, torch.softmax(logits / 0.5, dim=-1))
    assert router.silo_names == SILOS and router.objective_names == ("accuracy",)


def test_objective_changes_the_routing(data: dict) -> None:
    # Objective 1 ("alt") disagrees on colour questions only: there the shape expert is right, the colour one wrong.
    kind = data["train_kind"]
    accuracy_bits = kind[:, None] == torch.arange(3)[None, :]
    alt_bits = accuracy_bits.clone()
    colour = kind == 0
    alt_bits[colour, 0], alt_bits[colour, 1] = False, True
    features = torch.cat([data["train_x"], data["train_x"]])
    ids = torch.cat([torch.zeros(len(kind), dtype=torch.long), torch.ones(len(kind), dtype=torch.long)])
    router = train_router(features, ids, torch.cat([accuracy_bits, alt_bits]), silo_names=SILOS,
                          objective_names=["accuracy", "alt"], config=CONFIG)

    under_accuracy = mean_weight_on(router, data, 0, [0, 1, 2])
    under_alt = mean_weight_on(router, data, 1, [1, 1, 2])
    assert min(under_accuracy.values()) >= 0.8, under_accuracy
    assert min(under_alt.values()) >= 0.8, under_alt
    # Same colour question, different objective, different silo.
    assert mean_weight_on(router, data, 1, [0, 1, 2])["color"] < 0.2
    assert router.objective_id("alt") == 1


def test_randomized_response_bits_with_forward_correction(data: dict) -> None:
    epsilon = 2.0
    p = flip_probability(epsilon=epsilon)
    exact = data["train_kind"][:, None] == torch.arange(3)[None, :]
    noisy = randomize_bits(exact, epsilon=epsilon, generator=torch.Generator().manual_seed(0))
    assert 0.08 < (noisy != exact).float().mean().item() < 0.16  # p ~ 0.119
    router = train_router(data["train_x"], torch.zeros(len(noisy), dtype=torch.long), noisy,
                          silo_names=SILOS, objective_names=["accuracy"], config=CONFIG,
                          flip_probabilities=[p, p, p])
    per_kind = mean_weight_on(router, data, 0, [0, 1, 2])
    for kind, weight in per_kind.items():
        assert weight >= 0.7, (kind, per_kind)

    # The correction makes sigmoid(logit) estimate the TRUE correctness (1 for the right silo, 0 for the
    # others); fitting the noisy bits directly would learn the noisy rates (~1 - p and ~p) instead.
    uncorrected = train_router(data["train_x"], torch.zeros(len(noisy), dtype=torch.long), noisy,
                               silo_names=SILOS, objective_names=["accuracy"], config=CONFIG)
    right = data["test_kind"][:, None] == torch.arange(3)[None, :]
    ids = torch.zeros(len(data["test_x"]), dtype=torch.long)
    with torch.no_grad():
        q = torch.sigmoid(router(data["test_x"], ids))
        q_noisy = torch.sigmoid(uncorrected(data["test_x"], ids))
    assert q[right].mean() >= 0.92 and q[~right].mean() <= 0.06, (q[right].mean(), q[~right].mean())
    assert q_noisy[right].mean() <= 0.9 and q_noisy[~right].mean() >= 0.1, (q_noisy[right].mean(),
                                                                            q_noisy[~right].mean())


def test_corrected_bce_reduces_to_bce_without_noise_and_is_finite_for_huge_logits() -> None:
    logits = torch.tensor([[-3.0, 0.2, 5.0], [1.0, -0.5, 2.0]])
    reported = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, reported)
    assert torch.allclose(corrected_bce(logits, reported, torch.zeros(3)), expected)
    # With noise p, a confident wrong-looking report costs at most -log p, never infinity.
    p = torch.full((3,), 0.1)
    loss = corrected_bce(torch.full((1, 3), 1e4), torch.zeros(1, 3), p)
    assert loss.item() == pytest.approx(-torch.log(torch.tensor(0.1)).item(), rel=1e-4)


def test_save_load_round_trip_gives_identical_weights(router: Router, data: dict, tmp_path: Path) -> None:
    save_router(router, tmp_path / "router")
    loaded = load_router(tmp_path / "router")
    ids = torch.zeros(len(data["test_x"]), dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(loaded.weights(data["test_x"], ids), router.weights(data["test_x"], ids))
    assert loaded.silo_names == SILOS and loaded.objective_names == ("accuracy",)
    assert loaded.config == router.config and loaded.feature_dim == ROUTER_FEATURE_DIM
    with pytest.raises(FileNotFoundError, match="not a saved router"):
        load_router(tmp_path / "nowhere")


def test_training_is_deterministic_from_the_seed(data: dict) -> None:
    x, kind = data["train_x"][:200], data["train_kind"][:200]
    bits = kind[:, None] == torch.arange(3)[None, :]
    ids = torch.zeros(len(x), dtype=torch.long)
    runs = [train_router(x, ids, bits, silo_names=SILOS, objective_names=["a"], config=RouterConfig(epochs=3, seed=s))
            for s in (5, 5, 6)]
    first, again, other = ({k: v for k, v in r.state_dict().items()} for r in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_bad_inputs_are_rejected() -> None:
    x = torch.randn(4, 10)
    ids = torch.zeros(4, dtype=torch.long)
    bits = torch.ones(4, 2, dtype=torch.bool)
    kwargs = {"silo_names": ["a", "b"], "objective_names": ["o"], "config": RouterConfig(epochs=1)}
    with pytest.raises(ValueError, match=r"bits must be a bool tensor of shape \[N=4, K=2\]"):
        train_router(x, ids, bits.float(), **kwargs)
    with pytest.raises(ValueError, match=r"flip_probabilities\[1\] must be in \[0, 0.5\)"):
        train_router(x, ids, bits, flip_probabilities=[0.1, 0.5], **kwargs)
    with pytest.raises(ValueError, match=r"objective_ids must be in \[0, 1\)"):
        train_router(x, torch.ones(4, dtype=torch.long), bits, **kwargs)
    with pytest.raises(ValueError, match="silo_names must be unique"):
        train_router(x, ids, bits, **{**kwargs, "silo_names": ["a", "a"]})
    router = Router(10, 2, 1, RouterConfig())
    with pytest.raises(ValueError, match=r"features must be a \[N, 10\] tensor, got \(4, 9\)"):
        router(torch.randn(4, 9), ids)
    with pytest.raises(ValueError, match=r"objective_ids must be a \[N=4\] tensor"):
        router(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        RouterConfig(temperature=0.0)
    with pytest.raises(ValueError, match="extra"):
        RouterConfig(temprature=1.0)  # type: ignore[call-arg]


@pytest.fixture
def fake_cuda_generator(monkeypatch) -> dict:
    """One CUDA device whose generator state is a number (the test is about the code around the RNG, not CUDA)."""
    generator = {"state": 7}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: generator.update(state=seed))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([generator["state"]]))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": generator.update(state=int(state[0])))
    return generator


def test_training_leaves_the_cuda_generator_as_it_was(fake_cuda_generator: dict) -> None:
    """GRPO samples with the CUDA generator: seeding the router's initialisation must not reseed it."""
    features, bits = torch.randn(8, 4), torch.rand(8, 2) > 0.5
    train_router(features, torch.zeros(8, dtype=torch.long), bits, silo_names=["a", "b"],
                 objective_names=["correct"], config=RouterConfig(epochs=1, seed=1234))
    assert fake_cuda_generator["state"] == 7


def test_seeded_answer_generation_leaves_the_cuda_generator_as_it_was(fake_cuda_generator: dict, tiny_vlm_dir: Path,
                                                                      consortium) -> None:
    """The in-training accuracy probes sample with their own seed, between GRPO steps that sample on CUDA."""
    from coordinator.answer_eval import generate_answers
    from mor_secure.models.tiny_vlm import load_vlm

    model, processor = load_vlm(tiny_vlm_dir)
    generate_answers(model, processor, consortium[1].dev[:1], samples=1, seed=3)
    assert fake_cuda_generator["state"] == 7
