"""`mor coordinator ...`: the consortium operator's commands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from mor_secure.cli_errors import run_command
from mor_secure.config import load_config
from mor_secure.data import load_consortium, make_splits
from mor_secure.models.tiny_vlm import TinyVLMConfig, build_tiny_vlm, load_vlm

from .answer_eval import evaluate_answers
from .reference import SFTConfig, train_reference

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
    evaluate = commands.add_parser("evaluate-policy", help="exact-match accuracy per kind on the held-out test split")
    evaluate.add_argument("--consortium", required=True)
    evaluate.add_argument("--model", required=True, help="policy checkpoint directory")
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
    splits = make_splits(load_consortium(args.consortium))
    print(json.dumps(evaluate_answers(model, processor, splits.test), indent=2))
    return 0


def main(argv: Sequence[str]) -> int:
    return run_command(_parser(), argv, {"build-vlm": _build, "train-reference": _train_reference, "evaluate-policy": _evaluate})
