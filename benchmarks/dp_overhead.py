"""Per-step cost of Opacus DP-SGD against the same model trained with plain Adam, in one run.

What is timed is one Bradley-Terry training step as `train_bradley_terry` runs
it: fetch a batch of pairs, two forward passes (chosen, rejected), the loss of
`mor_secure.privacy.bradley_terry_loss`, backward and optimizer step. With DP
the model is wrapped by `PrivacyEngine.make_private` (per-sample gradients,
clipping, Gaussian noise, Poisson sampling); without DP it is the bare module
with Adam and a shuffled fixed-size loader. The two are measured in
alternating blocks in the same process, after warm-up steps, so background
load hits both alike; the headline is the ratio of medians.

The models are the DP-trained parts of the silo architectures on random
inputs of their real shapes (the frozen encoders / trunk are outside DP-SGD):

- frozen_encoders: `InteractionHead(1280, 384, 384)` on EfficientNet-Lite0 /
  MiniLM-sized features.
- small_cnn: `WordsAndHead(32, 64, 64)` on trunk features and hashed word ids.

    .venv/bin/python benchmarks/dp_overhead.py
    .venv/bin/python benchmarks/dp_overhead.py --architecture small_cnn --steps 60
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import opacus
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mor_secure.models.encoders import EFFICIENTNET_FEATURES, MINILM_FEATURES
from mor_secure.models.reward_architectures.small_cnn import MAX_WORDS, WORD_BUCKETS, WordsAndHead
from mor_secure.models.reward_heads import InteractionHead
from mor_secure.privacy import bradley_terry_loss

TARGET_RATIO = 2.5
# SmallCNNRewardModel's defaults: trunk channels, word-embedding width, head width.
CNN_CHANNELS, CNN_TEXT_DIM, CNN_WIDTH = 32, 64, 64


def _side_frozen_encoders(n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    def unit(dim: int) -> torch.Tensor:  # the model sees L2-normalised features
        return nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1)

    return unit(EFFICIENTNET_FEATURES), unit(MINILM_FEATURES), unit(MINILM_FEATURES)


def _side_small_cnn(n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    def word_ids(max_len: int) -> torch.Tensor:
        ids = torch.randint(1, WORD_BUCKETS, (n, MAX_WORDS), generator=gen)
        lengths = torch.randint(1, max_len + 1, (n, 1), generator=gen)
        return ids.masked_fill(torch.arange(MAX_WORDS) >= lengths, 0)  # 0 = padding

    features = torch.relu(torch.randn(n, CNN_CHANNELS, generator=gen))  # post-ReLU, pooled trunk output
    return features, word_ids(10), word_ids(2)  # questions up to 10 words, one- or two-word answers


ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], Callable[[int, torch.Generator], tuple]]] = {
    "frozen_encoders": (lambda: InteractionHead(EFFICIENTNET_FEATURES, MINILM_FEATURES, MINILM_FEATURES),
                        _side_frozen_encoders),
    "small_cnn": (lambda: WordsAndHead(CNN_CHANNELS, CNN_TEXT_DIM, CNN_WIDTH), _side_small_cnn),
}


def _batches(loader: DataLoader) -> Iterator[list[torch.Tensor]]:
    while True:
        yield from loader


class Stepper:
    """One training setup (DP or not); `run(k)` takes k steps and returns each step's seconds."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, n_inputs: int):
        self.model, self.optimizer, self.n_inputs = model, optimizer, n_inputs
        self.batches = _batches(loader)
        self.rows: list[int] = []
        self.fetch: list[float] = []  # seconds spent drawing each batch (part of each step's time)

    def run(self, k: int) -> list[float]:
        times = []
        for _ in range(k):
            start = time.perf_counter()
            batch = next(self.batches)
            fetched = time.perf_counter()
            chosen, rejected = batch[:self.n_inputs], batch[self.n_inputs:]
            self.optimizer.zero_grad(set_to_none=True)
            loss = bradley_terry_loss(self.model, chosen, rejected)
            loss.backward()
            self.optimizer.step()
            end = time.perf_counter()
            times.append(end - start)
            self.fetch.append(fetched - start)
            self.rows.append(chosen[0].shape[0])
        return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="frozen_encoders")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per setup (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setup first")
    parser.add_argument("--batch-size", type=int, default=256, help="(expected) pairs per step")
    parser.add_argument("--batches-per-epoch", type=int, default=8,
                        help="dataset size = batch size x this (DP sample rate = 1 / this)")
    parser.add_argument("--block", type=int, default=10, help="steps per alternating DP / non-DP block")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice). On a busy machine the "
                        "default can make every op wait for a descheduled thread, hiding the DP cost")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.steps <= 0 or args.batch_size <= 0 or args.block <= 0 or args.batches_per_epoch < 2:
        parser.error("--steps, --batch-size and --block must be positive; --batches-per-epoch at least 2")

    make_model, make_side = ARCHITECTURES[args.architecture]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    n_pairs = args.batch_size * args.batches_per_epoch
    chosen, rejected = make_side(n_pairs, gen), make_side(n_pairs, gen)
    dataset = TensorDataset(*chosen, *rejected)
    n_inputs = len(chosen)

    torch.manual_seed(args.seed)
    plain_model = make_model()
    torch.manual_seed(args.seed)
    dp_model = make_model()  # same initial weights as plain_model
    params = sum(p.numel() for p in plain_model.parameters())

    plain = Stepper(plain_model, torch.optim.Adam(plain_model.parameters(), lr=args.learning_rate),
                    DataLoader(dataset, batch_size=args.batch_size, shuffle=True), n_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's "secure RNG turned off" notice
        engine = PrivacyEngine(accountant="prv")
        private_model, private_optimizer, private_loader = engine.make_private(
            module=dp_model, optimizer=torch.optim.Adam(dp_model.parameters(), lr=args.learning_rate),
            data_loader=DataLoader(dataset, batch_size=args.batch_size),
            noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm, poisson_sampling=True)
    private = Stepper(private_model, private_optimizer, private_loader, n_inputs)

    print(f"torch {torch.__version__}, opacus {opacus.__version__}, intra-op threads {torch.get_num_threads()}")
    print(f"architecture {args.architecture}: {type(plain_model).__name__}, {params:,} trainable parameters; "
          f"{n_pairs} pairs, batch size {args.batch_size} (DP: Poisson, sample rate {private_loader.sample_rate:.4f}), "
          f"noise {args.noise_multiplier}, clip {args.max_grad_norm}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.run(args.warmup)
        private.run(args.warmup)
        for stepper in (plain, private):
            stepper.rows.clear()
            stepper.fetch.clear()
        dp_times: list[float] = []
        plain_times: list[float] = []
        start = time.perf_counter()
        while len(dp_times) < args.steps:
            k = min(args.block, args.steps - len(dp_times))
            dp_times += private.run(k)
            plain_times += plain.run(k)
        elapsed = time.perf_counter() - start

    def line(label: str, times: list[float], stepper: Stepper) -> str:
        return (f"{label:<8} median {1e3 * statistics.median(times):8.2f} ms/step  "
                f"mean {1e3 * statistics.fmean(times):8.2f}  p90 {1e3 * sorted(times)[int(0.9 * (len(times) - 1))]:8.2f}  "
                f"of which batch fetch {1e3 * statistics.median(stepper.fetch):7.2f}  "
                f"(mean batch {statistics.fmean(stepper.rows):.1f} pairs)")

    print(f"{args.steps} timed steps each, alternating blocks of {args.block}, {elapsed:.1f} s")
    print(line("non-DP", plain_times, plain))
    print(line("DP-SGD", dp_times, private))
    ratio = statistics.median(dp_times) / statistics.median(plain_times)
    print(f"dp/non-dp = {ratio:.2f}x (target <= {TARGET_RATIO}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
