"""Bradley-Terry training with DP-SGD: privacy, learning, cleanup, refusals."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS
from pydantic import ValidationError
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from mor_secure.config import ConfigError, load_config
from mor_secure.privacy import (
    BudgetExceededError,
    DPConfig,
    PrivacyLedger,
    PrivacySpend,
    TrainingConfig,
    bradley_terry_loss,
    epsilon_spent,
    train_bradley_terry,
)

DIM = 8


class TinyRewardModel(nn.Module):
    """A frozen "encoder" and a trainable scoring head, like a reward head on a frozen VLM."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(DIM, DIM)
        self.encoder.requires_grad_(False)
        self.head = nn.Linear(DIM, 1)
        self.rows_seen: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.rows_seen.append(x.shape[0])
        return self.head(torch.tanh(self.encoder(x))).squeeze(-1)


def make_pairs(n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Pairs whose chosen side has a larger first feature."""
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randn(n, DIM, generator=gen)
    rejected = torch.randn(n, DIM, generator=gen)
    chosen[:, 0] += 3.0
    return chosen, rejected


def make_model() -> TinyRewardModel:
    torch.manual_seed(0)
    return TinyRewardModel()


def pairwise_accuracy(model: nn.Module, chosen: Tensor, rejected: Tensor) -> float:
    with torch.no_grad():
        return (model(chosen) > model(rejected)).float().mean().item()


def assert_plain_module(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
        for attr in ("activations", "max_batch_len", "autograd_grad_sample_hooks", "ft_compute_sample_grad"):
            assert attr not in vars(module), attr
    for p in model.parameters():
        leftovers = [a for a in (*OPACUS_PARAM_MONKEYPATCH_ATTRS, "summed_grad") if hasattr(p, a)]
        assert leftovers == []
        assert p.grad is None


def dp_config(**dp: object) -> TrainingConfig:
    return TrainingConfig(epochs=10, batch_size=60, learning_rate=0.05, dp=DPConfig(**dp))


def test_two_forward_passes_give_one_per_pair_gradient() -> None:
    """Opacus adds the per-sample gradients of both passes row by row: row i is pair i's gradient."""
    model = make_model()
    chosen, rejected = make_pairs(5)
    gsm = GradSampleModule(model)
    bradley_terry_loss(gsm, [chosen], [rejected]).backward()
    per_sample = model.head.weight.grad_sample
    assert per_sample.shape == (5, 1, DIM)
    gsm.to_standard_module()

    for i in range(5):
        model.zero_grad()
        bradley_terry_loss(model, [chosen[i : i + 1]], [rejected[i : i + 1]]).backward()
        assert torch.allclose(per_sample[i], model.head.weight.grad, atol=1e-6)
    # Sanity: the chosen-side pass alone would give a different per-sample gradient.
    gsm = GradSampleModule(model)
    gsm(chosen).sum().backward()
    assert not torch.allclose(model.head.weight.grad_sample, per_sample)
    gsm.to_standard_module()


def test_dp_run_learns_spends_its_target_and_returns_a_clean_module(tmp_path: Path) -> None:
    chosen, rejected = make_pairs(600)
    model = make_model()
    frozen_before = copy.deepcopy(model.encoder.state_dict())
    head_before = model.head.weight.detach().clone()
    ledger = PrivacyLedger(tmp_path / "ledger.json", epsilon_budget=20.0, delta_budget=1e-4)

    result = train_bradley_terry(
        model, TensorDataset(chosen, rejected), dp_config(target_epsilon=8.0, target_delta=1e-5),
        ledger=ledger, progress=False,
    )

    report = result.report
    assert report.dp_enabled and report.accountant == "prv"
    assert 8.0 * 0.95 <= report.epsilon <= 8.0 * 1.05
    assert (report.sample_rate, report.steps, report.expected_batch_size, report.n_pairs) == (0.1, 100, 60, 600)
    assert report.noise_multiplier > 0.5
    # An independent accountant on the reported parameters gives the reported epsilon.
    assert epsilon_spent(noise_multiplier=report.noise_multiplier, sample_rate=0.1, steps=100, delta=1e-5,
                         accountant="prv") == pytest.approx(report.epsilon, rel=1e-6)
    assert len(result.loss_history) == 10 and result.loss_history[-1] < result.loss_history[0]
    assert result.seconds > 0

    assert pairwise_accuracy(model, chosen, rejected) > 0.8
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, frozen_before[name])
    assert not torch.equal(model.head.weight, head_before)

    assert type(model) is TinyRewardModel and model.training
    assert_plain_module(model)
    model(chosen[:4]).sum().backward()  # a second, ordinary forward/backward
    assert model.head.weight.grad is not None and not hasattr(model.head.weight, "grad_sample")
    model.zero_grad(set_to_none=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert set(torch.load(io.BytesIO(buffer.getvalue()))) == {"encoder.weight", "encoder.bias", "head.weight", "head.bias"}

    (entry,) = ledger.spends
    assert entry.purpose == "train:reward-model"
    assert (entry.epsilon, entry.delta) == (report.epsilon, 1e-5)
    assert entry.details == report.to_dict()


def test_unaffordable_run_is_refused_before_training(tmp_path: Path) -> None:
    chosen, rejected = make_pairs(600)
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    ledger = PrivacyLedger(tmp_path / "ledger.json", epsilon_budget=10.0, delta_budget=1e-4)
    ledger.record(PrivacySpend.now(purpose="earlier", epsilon=5.0, delta=1e-5))

    with pytest.raises(BudgetExceededError, match="requested epsilon=8, delta=1e-05; already spent epsilon=5 of 10"):
        train_bradley_terry(model, TensorDataset(chosen, rejected), dp_config(accountant="rdp"), ledger=ledger,
                            progress=False)

    assert model.rows_seen == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert [s.purpose for s in ledger.spends] == ["earlier"]
    assert_plain_module(model)


def test_empty_poisson_batches_are_trained_through_and_accounted() -> None:
    """With 20 pairs sampled at rate 1/20, about a third of the batches are empty."""
    chosen, rejected = make_pairs(20)
    model = make_model()
    config = TrainingConfig(epochs=2, batch_size=1, learning_rate=0.05,
                            dp=DPConfig(target_epsilon=8.0, target_delta=1e-3, accountant="rdp"))

    # progress=True also exercises the bar's per-epoch epsilon.
    result = train_bradley_terry(model, TensorDataset(chosen, rejected), config, progress=True)

    assert model.rows_seen.count(0) >= 2  # both passes of at least one empty batch reached the model
    assert (result.report.sample_rate, result.report.steps) == (1 / 20, 40)
    assert result.report.epsilon == pytest.approx(
        epsilon_spent(noise_multiplier=result.report.noise_multiplier, sample_rate=1 / 20, steps=40,
                      delta=1e-3, accountant="rdp"))
    assert all(math.isfinite(loss) for loss in result.loss_history)
    assert_plain_module(model)


def test_run_that_fails_part_way_still_records_what_it_spent(tmp_path: Path) -> None:
    class Failing(TinyRewardModel):
        def forward(self, x: Tensor) -> Tensor:
            if len(self.rows_seen) == 2 * 7:  # the 8th step's first pass
                raise RuntimeError("disk full")
            return super().forward(x)

    chosen, rejected = make_pairs(600)
    torch.manual_seed(0)
    model = Failing()
    ledger = PrivacyLedger(tmp_path / "ledger.json", epsilon_budget=20.0, delta_budget=1e-4)

    with pytest.raises(RuntimeError, match="disk full"):
        train_bradley_terry(model, TensorDataset(chosen, rejected), dp_config(accountant="rdp"), ledger=ledger,
                            progress=False)

    (entry,) = ledger.spends
    assert entry.details["steps"] == 7
    assert entry.epsilon == pytest.approx(epsilon_spent(noise_multiplier=entry.details["noise_multiplier"],
                                                        sample_rate=0.1, steps=7, delta=1e-5, accountant="rdp"))
    assert 0 < entry.epsilon < 8.0
    assert_plain_module(model)


def test_batchnorm_is_rejected_with_the_fix_to_apply() -> None:
    model = nn.Sequential(nn.Linear(DIM, 4), nn.BatchNorm1d(4), nn.Linear(4, 1), nn.Flatten(0))
    chosen, rejected = make_pairs(100)
    with pytest.raises(ValueError, match=r"BatchNorm.*ModuleValidator\.fix\(model\)"):
        train_bradley_terry(model, TensorDataset(chosen, rejected), TrainingConfig(epochs=1, batch_size=10),
                            progress=False)


def test_trainable_layer_with_buffers_is_rejected_before_opacus_touches_it() -> None:
    class BufferedScore(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(DIM))
            self.register_buffer("scale", torch.ones(DIM))

        def forward(self, x: Tensor) -> Tensor:
            return (x * self.weight * self.scale).sum(-1)

    model = BufferedScore()
    chosen, rejected = make_pairs(100)
    with pytest.raises(ValueError, match="not compatible with DP-SGD.*trainable layer with buffers"):
        train_bradley_terry(model, TensorDataset(chosen, rejected), TrainingConfig(epochs=1, batch_size=10),
                            progress=False)
    assert_plain_module(model)


def test_dp_off_warns_trains_and_charges_nothing(tmp_path: Path) -> None:
    chosen, rejected = make_pairs(600)
    model = make_model()
    ledger = PrivacyLedger(tmp_path / "ledger.json", epsilon_budget=1.0, delta_budget=1e-4)
    with pytest.warns(UserWarning, match="DP is OFF"):
        config = TrainingConfig(epochs=5, batch_size=60, learning_rate=0.05, dp=DPConfig(enabled=False))
    with pytest.warns(UserWarning, match="WITHOUT differential privacy; nothing is charged"):
        result = train_bradley_terry(model, TensorDataset(chosen, rejected), config, ledger=ledger, progress=False)

    report = result.report
    assert not report.dp_enabled
    assert report.epsilon == math.inf and report.noise_multiplier == 0.0 and report.accountant is None
    assert report.steps == 50
    assert pairwise_accuracy(model, chosen, rejected) > 0.9
    assert ledger.spends == ()


def test_batch_size_must_be_below_the_number_of_pairs() -> None:
    chosen, rejected = make_pairs(50)
    with pytest.raises(ValueError, match=r"batch_size \(50\) must be smaller than the number of pairs \(50\)"):
        train_bradley_terry(make_model(), TensorDataset(chosen, rejected), TrainingConfig(batch_size=50),
                            progress=False)


def test_data_and_model_contracts_are_checked() -> None:
    chosen, rejected = make_pairs(50)
    with pytest.raises(ValueError, match="same number of tensors for the chosen and the rejected side, got 3"):
        train_bradley_terry(make_model(), TensorDataset(chosen, rejected, rejected), TrainingConfig(batch_size=10),
                            progress=False)

    column_scores = nn.Sequential(nn.Linear(DIM, 1))  # returns (n, 1), not (n,)
    with pytest.raises(ValueError, match=r"1-D tensor of 10 scores .* got shape \(10, 1\)"):
        bradley_terry_loss(column_scores, [chosen[:10]], [rejected[:10]])


def test_configs_are_strict_and_bounded(tmp_path: Path) -> None:
    assert TrainingConfig().dp == DPConfig(enabled=True, target_epsilon=8.0, target_delta=1e-5,
                                           max_grad_norm=1.0, accountant="prv")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TrainingConfig.model_validate({"epochs": 1, "learning_rat": 0.1})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TrainingConfig.model_validate({"dp": {"epsilon": 1.0}})
    for bad in ({"target_epsilon": 0}, {"target_delta": 1.0}, {"max_grad_norm": -1}, {"accountant": "gdp"},
                {"target_epsilon": float("inf")}):
        with pytest.raises(ValidationError):
            DPConfig.model_validate(bad)
    with pytest.raises(ValidationError):
        TrainingConfig(batch_size=0)

    path = tmp_path / "train.yaml"
    path.write_text("epochs: 3\ndp:\n  target_epsilon: 2.0\n  noise: 1.0\n")
    with pytest.raises(ConfigError, match=r"dp\.noise: Extra inputs are not permitted"):
        load_config(path, TrainingConfig)
