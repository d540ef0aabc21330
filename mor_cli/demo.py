"""`mor demo run`: the whole consortium on one machine with embedded defaults.

Stage of the project: the coordinator builds the tiny VLM and SFTs the
reference policy; three silos with different architectures train DP reward
models on their private partitions; every reward model (and the same model
without DP, for comparison) is scored on clean held-out pairs.

This module is the only place, besides the `mor` entry point, that uses both
roles; they still share nothing but files on disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from transformers.utils import logging as hf_logging

from coordinator.answer_eval import evaluate_answers
from coordinator.cli import vlm_corpus
from coordinator.reference import train_reference
from mor_secure.cli_errors import run_command
from mor_secure.data import load_consortium, make_pairs, make_splits
from mor_secure.data.records import QUESTION_KINDS, PreferencePair
from mor_secure.models.reward_model import RewardModel
from mor_secure.models.tiny_vlm import build_tiny_vlm, load_vlm
from silo_agent.training import feature_cache_dir, load_silo_config, train_silo

PROG = "mor demo"
SILOS = ("hospital-a", "bank-b", "hospital-c")
# Held-out pairs scored per kind: enough for +-0.02 at 95% (binomial), bounded for CPU time.
EVAL_PAIRS_PER_KIND = 1000
EVAL_SEED = 12345


def _install_configs(workdir: Path) -> Path:
    """Copy the embedded consortium and silo YAMLs into a fresh workdir; return the consortium path."""
    source = resources.files("mor_cli") / "demo_configs"
    (workdir / "silos").mkdir(parents=True)
    shutil.copyfile(source / "consortium.yaml", workdir / "consortium.yaml")
    for silo in SILOS:
        shutil.copyfile(source / "silos" / f"{silo}.yaml", workdir / "silos" / f"{silo}.yaml")
    return workdir / "consortium.yaml"


def _accuracy_split(model: RewardModel, pairs_by_kind: dict[str, list[PreferencePair]],
                    reliable: Sequence[str]) -> tuple[float, float, dict[str, float]]:
    """Pairwise accuracy on the reliable kinds and on the other kinds (pair-weighted), and per kind."""
    per_kind = {kind: model.pairwise_accuracy(pairs) for kind, pairs in pairs_by_kind.items()}

    def pooled(kinds: Sequence[str]) -> float:
        n = sum(len(pairs_by_kind[k]) for k in kinds)
        return sum(per_kind[k] * len(pairs_by_kind[k]) for k in kinds) / n if n else float("nan")

    return pooled(reliable), pooled([k for k in QUESTION_KINDS if k not in reliable]), per_kind


def _print_table(rows: list[dict]) -> None:
    header = (f"{'silo':<11} {'architecture':<16} {'trainable':>9} {'epsilon':>7} "
              f"{'DP rel':>6} {'DP oth':>6} {'noDP rel':>8} {'noDP oth':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['name']:<11} {r['architecture']:<16} {r['trainable_params']:>9,} {r['epsilon']:>7.2f} "
              f"{r['dp_acc_reliable']:>6.3f} {r['dp_acc_other']:>6.3f} "
              f"{r['nondp_acc_reliable']:>8.3f} {r['nondp_acc_other']:>8.3f}")
    print("(held-out pairwise accuracy on the silo's reliable kind / on the other kinds; delta = 1e-5)")


def run_demo(workdir: Path, *, write_results: Path | None, progress: bool) -> int:
    started = time.monotonic()
    if not progress:
        hf_logging.disable_progress_bar()  # checkpoint save/load bars too, not only ours
    if workdir.exists():
        # Demo runs own their workdir; a stale ledger would (rightly) refuse a second training.
        print(f"demo: removing the previous demo run in {workdir}")
        shutil.rmtree(workdir)
    consortium_path = _install_configs(workdir)
    splits = make_splits(load_consortium(consortium_path))

    print("== coordinator: tiny VLM and reference policy ==")
    base = build_tiny_vlm(workdir / "vlm" / "base", vlm_corpus(consortium_path))
    reference = train_reference(base, splits.sft, workdir / "vlm" / "reference", progress=progress)
    reference_accuracy = evaluate_answers(*load_vlm(reference), splits.test)
    print("reference policy, held-out exact match: "
          + ", ".join(f"{k} {v:.3f}" for k, v in reference_accuracy.items()))

    clean = make_pairs(splits.test, seed=EVAL_SEED, max_pairs_per_kind=EVAL_PAIRS_PER_KIND)
    pairs_by_kind = {k: [p for p in clean if p.kind == k] for k in QUESTION_KINDS}
    rows = []
    for silo in SILOS:
        print(f"== silo {silo} ==")
        config = load_silo_config(workdir / "silos" / f"{silo}.yaml")
        reliable = load_consortium(consortium_path).silo(silo).reliable_kinds
        dp_outcome = train_silo(config, progress=progress)
        dp_rel, dp_oth, dp_kinds = _accuracy_split(dp_outcome.model, pairs_by_kind, reliable)
        nondp_config = config.model_copy(update={
            "workdir": config.workdir.with_name(f"{silo}-nondp"),
            "feature_cache": feature_cache_dir(config),  # same frozen features: don't recompute them
            "training": config.training.model_copy(update={
                "dp": config.training.dp.model_copy(update={"enabled": False})})})
        nondp_outcome = train_silo(nondp_config, progress=progress)
        nd_rel, nd_oth, nd_kinds = _accuracy_split(nondp_outcome.model, pairs_by_kind, reliable)
        rows.append({
            "name": silo, "architecture": config.architecture,
            "trainable_params": dp_outcome.model.trainable_parameters(),
            "epsilon": dp_outcome.report.epsilon, "delta": dp_outcome.report.delta,
            "dp_acc_reliable": dp_rel, "dp_acc_other": dp_oth,
            "nondp_acc_reliable": nd_rel, "nondp_acc_other": nd_oth,
            "reliable_kinds": list(reliable), "dp_acc_by_kind": dp_kinds, "nondp_acc_by_kind": nd_kinds,
        })
    _print_table(rows)
    minutes = (time.monotonic() - started) / 60
    print(f"\ndemo finished in {minutes:.1f} min; everything it wrote is under {workdir}")
    if write_results is not None:
        write_results.parent.mkdir(parents=True, exist_ok=True)
        write_results.write_text(json.dumps({
            "reference_policy_accuracy": reference_accuracy,
            "eval_pairs_per_kind": {k: len(v) for k, v in pairs_by_kind.items()},
            "silos": rows,
            "minutes": minutes,
        }, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {write_results}")
    return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Run the whole consortium locally.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="build, train and compare everything (about 6 minutes on 2 cores)")
    run.add_argument("--workdir", default="runs/demo", help="directory the demo owns (replaced on each run)")
    run.add_argument("--write-results", type=Path, help="also write the results JSON here")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return run_command(parser, argv, {"run": lambda args: run_demo(
        Path(args.workdir), write_results=args.write_results,
        progress=not args.no_progress and sys.stderr.isatty())})
