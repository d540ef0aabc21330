"""GRPO step time with the fused Mixture-of-Rewards against a constant reward, as a ratio in one run.

A constant reward costs nothing, so the constant-reward step is GRPO's own
cost (generation, reference log-probs, KL, backward, optimizer). The fused
step adds what MoR adds: router features and weights for each prompt, and one
batched `score` call per silo with every completion of the step. Both runs
use the same policy, prompts, seed and settings, alternate in short blocks in
one process (so background load hits both alike), and report the median of
TRL's own per-step `step_time`. Target: fused / constant <= 1.3.

With `--network` it compares the same fused reward in process against the
fused reward over mutual TLS: the demo's silos are started as `mor silo
serve` processes and reached through the networked pool, which aggregates
securely (masked, encrypted sums; issue 11's target: secure / in-process <=
1.3). `--network --clear-aggregation` fuses the networked scores in the
clear instead (target: network / in-process <= 1.15).

Caches are warmed first (each silo's and the router's image features of the
prompt images): a silo computes an image's features once, so the steady state
is what a long run pays; the cold first pass is printed separately.

Needs the demo's artefacts (`make demo` writes them):

    .venv/bin/python benchmarks/grpo_step.py --workdir runs/demo
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from coordinator.answer_eval import balanced_sample
from coordinator.grpo import GRPOSettings, train_grpo
from coordinator.pool import load_pool, pool_clients, pool_fusion
from coordinator.rewards import ConstantReward, FusedSiloReward
from coordinator.router import RouterFeatures, load_router
from mor_cli.roles import allow_in_process_silos
from mor_secure.data import load_consortium, make_splits

TARGET_RATIO = 1.3
NETWORK_TARGET_RATIO = 1.15
SECURE_TARGET_RATIO = 1.3


def _step_times(policy: Path, prompts: list, reward, steps: int, seed: int) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        settings = GRPOSettings(output_dir=Path(out), steps=steps, seed=seed, save_steps=10**6, logging_steps=1,
                                trl_overrides={"disable_tqdm": True})
        train_grpo(policy, prompts, reward, settings)
        history = json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]
    return [h["step_time"] for h in history if "step_time" in h]


def _fused(pool, router, features) -> FusedSiloReward:
    """MoR over the pool's silos, fused as the pool says (networked: secure unless `aggregation: clear`)."""
    return FusedSiloReward(pool_fusion(pool)(pool_clients(pool), objective="correct", method="mor"), router,
                           features, objective="correct")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo", help="demo working directory (consortium, pool, router)")
    parser.add_argument("--steps", type=int, default=20, help="GRPO steps per block")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks per reward")
    parser.add_argument("--prompts-per-kind", type=int, default=200)
    parser.add_argument("--network", action="store_true",
                        help="compare the fused reward over mTLS gRPC (silos as processes) with in-process")
    parser.add_argument("--clear-aggregation", action="store_true",
                        help="with --network: fuse the networked scores in the clear instead of securely")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    allow_in_process_silos()  # the in-process side runs the silos in this process (pool.yaml)
    for needed in ("consortium.yaml", "pool.yaml", "router", "vlm/reference", "pki"):
        if not (workdir / needed).exists():
            raise SystemExit(f"{workdir / needed} not found: run `make demo` first (it writes the demo artefacts)")
    if args.network:
        from mor_cli.demo import serve_silos, write_pool

        with serve_silos(Path(args.workdir)) as served:
            network_pool = write_pool(Path(args.workdir), addresses={n: s.address for n, s in served.silos.items()},
                                      clear_aggregation=args.clear_aggregation)
            label = "fused_network_clear" if args.clear_aggregation else "fused_network_secure"
            compare(args, {"fused": Path(args.workdir) / "pool.yaml", label: network_pool}, baseline="fused",
                    target=NETWORK_TARGET_RATIO if args.clear_aggregation else SECURE_TARGET_RATIO)
        return
    compare(args, {"constant": None, "fused": Path(args.workdir) / "pool.yaml"}, baseline="constant",
            target=TARGET_RATIO)


def compare(args: argparse.Namespace, pools: dict[str, Path | None], *, baseline: str, target: float) -> None:
    """Alternate GRPO blocks under each reward (None: constant); print the median step of each and the ratio."""
    workdir = Path(args.workdir)
    splits = make_splits(load_consortium(workdir / "consortium.yaml"))
    prompts = balanced_sample(list(splits.sft), args.prompts_per_kind, seed=0)
    features = RouterFeatures(workdir / "router_cache")
    router = load_router(workdir / "router")
    rewards = {name: ConstantReward() if pool is None else _fused(load_pool(pool), router, features)
               for name, pool in pools.items()}
    images = [str(r.image_path) for r in prompts]
    for name, reward in rewards.items():
        started = time.perf_counter()
        reward(prompts=[r.question for r in prompts], completions=[r.answer for r in prompts], image_path=images,
               question=[r.question for r in prompts])
        print(f"{name}: cold pass over {len(prompts)} prompts (features computed once per image): "
              f"{time.perf_counter() - started:.1f} s")

    policy = workdir / "vlm" / "reference"
    times: dict[str, list[float]] = {name: [] for name in rewards}
    for block in range(args.blocks):
        for name, reward in rewards.items():
            block_times = _step_times(policy, prompts, reward, args.steps, seed=block)
            times[name].extend(block_times[1:])  # the first step of a run pays start-up
            print(f"block {block} {name}: median step {statistics.median(block_times[1:]):.3f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    other = next(name for name in medians if name != baseline)
    ratio = medians[other] / medians[baseline]
    print(f"median GRPO step: {baseline} {medians[baseline]:.3f} s, {other} {medians[other]:.3f} s "
          f"-> ratio {ratio:.2f}x (target <= {target}x: {'met' if ratio <= target else 'MISSED'})")


if __name__ == "__main__":
    main()
