"""A tiny GRPO run meant to be started by `accelerate launch` (it also runs as a single process).

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/integration/accelerate_grpo_run.py --policy runs/demo/vlm/reference --out /tmp/grpo-2proc --steps 2

On a machine without GPUs `--multi_gpu` still starts 2 processes (torch.distributed
with gloo, each on the CPU); `--cpu` would start only one (accelerate's simple
launcher ignores --num_processes unless given an MPI hostfile).

Every process runs the same `train_grpo` call; TRL and accelerate split the
prompts, gather rewards and synchronise gradients. The reward is a
deterministic function of the completion text (varied, so advantages are not
all zero), which needs no silo. `test_grpo.py` runs this under the `slow` marker.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

from coordinator.grpo import GRPOSettings, train_grpo
from coordinator.rewards import completion_texts
from mor_secure.data import load_easyvqa


class TextHashReward:
    """A reward in [0, 1) from a CRC of the completion text: varied, deterministic, silo-free."""

    __name__ = "text_hash_reward"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return [zlib.crc32(t.encode()) % 97 / 97 for t in completion_texts(completions)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="policy checkpoint directory (config.json, processor)")
    parser.add_argument("--out", required=True, help="GRPO output directory (must hold no checkpoint yet)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--records", type=int, default=32, help="easy-VQA train questions used as prompts")
    args = parser.parse_args()
    settings = GRPOSettings(output_dir=args.out, steps=args.steps, num_generations=2, per_device_train_batch_size=2,
                            max_completion_length=2, learning_rate=1e-3, logging_steps=1, save_steps=args.steps)
    final = train_grpo(args.policy, load_easyvqa("train")[:args.records], TextHashReward(), settings)
    run = json.loads((Path(args.out) / "grpo_run.json").read_text(encoding="utf-8"))
    print(f"GRPO done: processes={run['processes']} global_step={run['global_step']} final={final}", flush=True)


if __name__ == "__main__":
    main()
