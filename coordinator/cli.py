"""`mor coordinator ...`: the consortium operator's commands."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from mor_secure.cli_errors import run_command
from mor_secure.config import load_config
from mor_secure.data import load_consortium, make_splits
from mor_secure.models.tiny_vlm import TinyVLMConfig, build_tiny_vlm, load_vlm

from .answer_eval import evaluate_answers
from .reference import SFTConfig, train_reference

logger = logging.getLogger(__name__)

# The heavier commands (router, GRPO, evaluation) import their modules when run, so that
# `mor coordinator --help` and the light commands stay fast.

PROG = "mor coordinator"


def vlm_corpus(consortium_path: str | Path) -> list[str]:
    """Tokenizer training text: the public SFT split's questions and answers (never private data)."""
    splits = make_splits(load_consortium(consortium_path))
    return sorted({r.question for r in splits.sft} | {r.answer for r in splits.sft})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Consortium operator commands.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-vlm", help="build and save the tiny base VLM (tokenizer trained on public text)")
    build.add_argument("--consortium", required=True, help="consortium YAML")
    build.add_argument("--out", required=True, help="checkpoint directory to write")
    build.add_argument("--config", help="optional YAML of TinyVLMConfig fields")
    sft = commands.add_parser("train-reference", help="SFT the base VLM on the public split: the reference policy")
    sft.add_argument("--consortium", required=True)
    sft.add_argument("--base", required=True, help="base VLM checkpoint directory")
    sft.add_argument("--out", required=True, help="reference checkpoint directory to write")
    sft.add_argument("--config", help="optional YAML of SFTConfig fields")
    sft.add_argument("--no-progress", action="store_true")
    evaluate = commands.add_parser("evaluate-policy", help="exact-match accuracy per kind on a held-out split")
    evaluate.add_argument("--consortium", required=True)
    evaluate.add_argument("--model", required=True, help="policy checkpoint directory")
    evaluate.add_argument("--split", choices=("dev", "test"), default="dev",
                          help="held-out split to score on: dev (default) for probing and tuning; test only for "
                          "a final reported number, never to choose settings")

    router = commands.add_parser("train-router", help="calibrate the router on the public calibration split")
    router.add_argument("--consortium", required=True)
    router.add_argument("--pool", required=True, help="silo pool YAML (coordinator/pool.py)")
    router.add_argument("--out", required=True, help="router directory to write")
    router.add_argument("--config", help="optional YAML of CalibrationConfig fields")
    router.add_argument("--feature-cache", help="directory caching the router's image features")
    router.add_argument("--no-progress", action="store_true")

    align = commands.add_parser("align", help="GRPO the policy with one reward: mor, uniform, single:<silo>, oracle")
    align.add_argument("--consortium", required=True)
    align.add_argument("--policy", required=True, help="starting policy (the reference) checkpoint directory")
    align.add_argument("--pool", help="silo pool YAML; needed by every reward but oracle")
    align.add_argument("--reward", default="mor", help="mor (needs --router), uniform, single:<silo> or oracle")
    align.add_argument("--router", help="router directory written by train-router (reward mor)")
    align.add_argument("--objective", default="correct", help="router objective to optimise (reward mor)")
    align.add_argument("--config", help="optional YAML of GRPOSettings fields (output_dir is --out)")
    align.add_argument("--out", required=True, help="GRPO output directory (checkpoints, logs, final/)")
    align.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    align.add_argument("--no-format-guard", action="store_true",
                       help="do not floor answers outside the public answer vocabulary of their kind "
                       "(coordinator.rewards.OnFormatReward); silo rewards can then be gamed by off-topic answers")
    align.add_argument("--reward-transform", choices=("group_top", "score"), default="group_top",
                       help="group_top (default, as `evaluate` uses): 1 for the completions a prompt's group scores "
                       "highest, 0 for the rest; score: the reward's value unchanged")
    align.add_argument("--feature-cache", help="directory caching the router's image features")

    full = commands.add_parser("evaluate", help="MoR vs baselines over seeds: JSON, Markdown table and plots")
    full.add_argument("--consortium", required=True)
    full.add_argument("--pool", required=True, help="silo pool YAML")
    full.add_argument("--reference", required=True, help="reference policy checkpoint directory")
    full.add_argument("--out", required=True, help="working directory (runs, routers); finished runs are reused")
    full.add_argument("--config", help="optional YAML of EvaluationConfig fields")
    full.add_argument("--fedavg-rm", help="FedAvg reward model directory (enables method fedavg_rm)")
    full.add_argument("--centralized-rm", help="centralised reward model directory (enables centralized_rm)")
    full.add_argument("--results-json", help="where to write the summary JSON (default <out>/mor_vs_baselines.json)")
    full.add_argument("--results-md", help="where to write the Markdown table (default <out>/results.md)")
    full.add_argument("--plots", help="path prefix of the PNG plots (default <out>/training)")
    full.add_argument("--feature-cache", help="directory caching the router's image features")
    full.add_argument("--no-progress", action="store_true")
    return parser


def _build(args: argparse.Namespace) -> int:
    config = load_config(args.config, TinyVLMConfig) if args.config else TinyVLMConfig()
    print(f"base VLM written to {build_tiny_vlm(args.out, vlm_corpus(args.consortium), config)}")
    return 0


def _train_reference(args: argparse.Namespace) -> int:
    config = load_config(args.config, SFTConfig) if args.config else SFTConfig()
    splits = make_splits(load_consortium(args.consortium))
    out = train_reference(args.base, splits.sft, args.out, config, progress=not args.no_progress)
    print(f"reference policy written to {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    model, processor = load_vlm(args.model)
    records = make_splits(load_consortium(args.consortium)).records(args.split)
    accuracy = evaluate_answers(model, processor, records)
    print(f"split {args.split}: {len(records)} questions (greedy exact match)")
    print(json.dumps(accuracy, indent=2))
    return 0


def _train_router(args: argparse.Namespace) -> int:
    from .calibration import CalibrationConfig, calibrate_router
    from .pool import load_pool, pool_audit_log, pool_clients
    from .router import RouterFeatures, save_router

    config = load_config(args.config, CalibrationConfig) if args.config else CalibrationConfig()
    splits = make_splits(load_consortium(args.consortium))
    pool = load_pool(args.pool)
    result = calibrate_router(pool_clients(pool), splits.calibration, RouterFeatures(args.feature_cache), config,
                              progress=not args.no_progress, audit=pool_audit_log(pool))
    out = save_router(result.router, args.out)
    (out / "calibration.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result.silo_accuracy, indent=2))
    print(f"router written to {out} ({result.records} calibration questions)")
    return 0


def _align(args: argparse.Namespace) -> int:
    from .evaluation import grpo_prompts
    from .grpo import GRPOSettings, train_grpo
    from .methods import grpo_reward, method_reward
    from .fusion import ClearFusion
    from .pool import load_pool, pool_clients, pool_fusion
    from .rewards import answer_vocabulary
    from .router import RouterFeatures, load_router

    settings = (load_config(args.config, GRPOSettings, overrides={"output_dir": args.out}) if args.config
                else GRPOSettings(output_dir=args.out))
    splits = make_splits(load_consortium(args.consortium))
    if args.reward != "oracle" and not args.pool:
        raise ValueError(f"reward {args.reward!r} needs --pool (the silos to ask for scores)")
    if args.reward == "mor" and not args.router:
        raise ValueError("reward mor needs --router (write one with `mor coordinator train-router`)")
    pool = load_pool(args.pool) if args.pool else None
    silos = pool_clients(pool) if pool else []
    mor = args.reward == "mor"
    reward = method_reward(args.reward, silos=silos, router=load_router(args.router) if mor else None,
                           features=RouterFeatures(args.feature_cache) if mor else None, objective=args.objective,
                           fusion=pool_fusion(pool) if pool else ClearFusion)
    if args.no_format_guard:
        logger.warning("format guard off: off-topic answers get whatever the silos' reward models give them")
    reward = grpo_reward(reward, vocabulary=answer_vocabulary(splits.calibration),
                         format_guard=not args.no_format_guard, transform=args.reward_transform)
    prompts = grpo_prompts(splits.calibration, None)
    final = train_grpo(args.policy, prompts, reward, settings, resume=args.resume)
    print(f"aligned policy written to {final}")
    return 0


def _evaluate_all(args: argparse.Namespace) -> int:
    from .evaluation import Evaluation, EvaluationConfig, publish
    from .pool import client_for_model, load_pool, pool_audit_log, pool_clients, pool_fusion, secure_aggregation

    config = load_config(args.config, EvaluationConfig) if args.config else EvaluationConfig()
    baselines = {name: client_for_model(name, path) for name, path in
                 (("fedavg_rm", args.fedavg_rm), ("centralized_rm", args.centralized_rm)) if path}
    out = Path(args.out)
    pool = load_pool(args.pool)
    evaluation = Evaluation(load_consortium(args.consortium), pool_clients(pool), args.reference, out, config,
                            baselines=baselines, feature_cache=args.feature_cache, progress=not args.no_progress,
                            fusion=pool_fusion(pool), audit=pool_audit_log(pool),
                            secure_aggregation=secure_aggregation(pool))
    markdown = publish(evaluation, evaluation.run_all(), json_path=args.results_json or out / "mor_vs_baselines.json",
                       markdown_path=args.results_md or out / "results.md", plots_prefix=args.plots or out / "training")
    print(markdown)
    return 0


def main(argv: Sequence[str]) -> int:
    return run_command(_parser(), argv, {
        "build-vlm": _build, "train-reference": _train_reference, "evaluate-policy": _evaluate,
        "train-router": _train_router, "align": _align, "evaluate": _evaluate_all,
    })
