"""`mor demo run` / `mor demo table`: the whole consortium on one machine with embedded defaults.

`run`: the coordinator builds the tiny VLM and SFTs the reference policy;
three silos with different architectures train DP reward models on their
private partitions; every reward model (and the same model without DP, for
comparison) is scored on clean held-out pairs; the coordinator calibrates the
router and aligns the reference with GRPO under MoR and under the uniform
average, and compares them with the reference (one seed), all over mTLS to
the silos' `mor silo serve` processes; at the end the reviewer's checks run
on every party's audit log and write the HTML report.

`table` (in `mor_cli.table`): the full MoR-vs-baselines evaluation.

This module is the only place, besides the `mor` entry point, that uses both
roles; they still share nothing but files on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from transformers.utils import logging as hf_logging

from coordinator.answer_eval import evaluate_answers
from coordinator.cli import vlm_corpus
from coordinator.audit_trail import close_coordinator_logs, coordinator_log
from coordinator.evaluation import Evaluation, EvaluationConfig
from coordinator.pool import load_pool, pool_audit_log, pool_clients, pool_fusion, secure_aggregation
from coordinator.reference import train_reference
from coordinator.results_report import results_markdown, summarise
from coordinator.router import save_router
from mor_secure.cli_errors import run_command
from mor_secure.config import load_config
from mor_secure.data import load_consortium, make_pairs, make_splits
from mor_secure.data.records import QUESTION_KINDS, PreferencePair
from mor_secure.models.reward_model import RewardModel
from mor_secure.models.tiny_vlm import build_tiny_vlm, load_vlm
from mor_secure.pki.kits import CertKit
from silo_agent.config import SiloConfig
from silo_agent.training import (MODEL_DIR, create_ledger, feature_cache_dir, load_silo_config,
                                 served_feature_cache_dir, train_silo)

from .audit_cli import review
from .pki_cli import init_pki
from .roles import allow_in_process_silos
from .silo_processes import SiloProcesses

PROG = "mor demo"
SILOS = ("hospital-a", "bank-b", "hospital-c")
COORDINATOR_AUDIT_LOG = "coordinator-audit.db"  # beside the networked pool file
DEMO_MARKER = ".mor-demo-run"  # left in the workdir by every run: only a directory holding it is replaced
# Held-out pairs scored per kind: enough for +-0.02 at 95% (binomial), bounded for CPU time.
EVAL_PAIRS_PER_KIND = 1000
EVAL_SEED = 12345


def claim_workdir(workdir: Path) -> None:
    """Make `workdir` the demo's own, empty, marked directory; FileExistsError for anything the demo did not make.

    A demo run replaces its previous run (a stale ledger would rightly refuse
    a second training), but `--workdir` is the user's to give: a directory
    without the marker a run leaves is never removed.
    """
    if workdir.exists() and not workdir.is_dir():
        raise FileExistsError(f"--workdir {workdir} is a file, not a directory; pick another --workdir")
    if workdir.is_dir() and any(workdir.iterdir()):
        if not (workdir / DEMO_MARKER).is_file():
            raise FileExistsError(f"--workdir {workdir} is not empty and no demo run made it (it has no "
                                  f"{DEMO_MARKER} file), so it is left as it is; pick another --workdir, or remove "
                                  "it yourself")
        print(f"demo: removing the previous demo run in {workdir}")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DEMO_MARKER).write_text("Made by `mor demo run`, which replaces this directory on its next run.\n",
                                       encoding="utf-8")


def _install_configs(workdir: Path) -> Path:
    """Copy the embedded consortium and silo YAMLs into a fresh workdir; return the consortium path."""
    source = resources.files("mor_cli") / "demo_configs"
    (workdir / "silos").mkdir(parents=True)
    shutil.copyfile(source / "consortium.yaml", workdir / "consortium.yaml")
    for silo in SILOS:
        shutil.copyfile(source / "silos" / f"{silo}.yaml", workdir / "silos" / f"{silo}.yaml")
    return workdir / "consortium.yaml"


def build_reference(workdir: Path, consortium_path: Path, *, progress: bool) -> Path:
    """The coordinator's first stage: build the tiny base VLM and SFT it on the public split."""
    splits = make_splits(load_consortium(consortium_path))
    base = build_tiny_vlm(workdir / "vlm" / "base", vlm_corpus(consortium_path))
    return train_reference(base, splits.sft, workdir / "vlm" / "reference", progress=progress)


def embedded_config(name: str, workdir: Path) -> Path:
    """Copy the embedded YAML `name` into the workdir (so the run records what it used); return its path."""
    path = workdir / name
    shutil.copyfile(resources.files("mor_cli") / "demo_configs" / name, path)
    return path


def write_pool(workdir: Path, *, addresses: dict[str, str] | None = None, clear_aggregation: bool = False) -> Path:
    """The coordinator's pool file: the demo silos' addresses (networked), or their saved models (in-process).

    The networked pool names the coordinator's kit and lets a scoring round go
    on without one silo (minimum 2 of 3), as a consortium of three would.
    """
    lines = ["# Written by `mor demo`: the silos the coordinator asks for scores (coordinator/pool.py)."]
    if addresses is not None:
        lines += ["kit: pki/kits/coordinator-coordinator", "minimum_participants: 2",
                  f"audit_log: {COORDINATOR_AUDIT_LOG}", f"aggregation: {'clear' if clear_aggregation else 'secure'}"]
    lines.append("silos:")
    for silo in SILOS:
        lines.append(f"  - name: {silo}")
        if addresses is not None:
            lines.append(f"    address: {addresses[silo]}")
            continue
        config = load_silo_config(workdir / "silos" / f"{silo}.yaml")
        lines.append(f"    reward_model: {os.path.relpath(config.workdir / MODEL_DIR, workdir)}")
        if config.base_model is not None:
            lines.append(f"    base_model: {os.path.relpath(config.base_model, workdir)}")
        if config.architecture == "frozen_encoders":
            lines.append(f"    feature_cache: {os.path.relpath(served_feature_cache_dir(config), workdir)}")
    path = workdir / ("network_pool.yaml" if addresses is not None else "pool.yaml")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def evaluation_for(workdir: Path, consortium_path: Path, config_name: str, *, progress: bool,
                   baselines: dict | None = None, addresses: dict[str, str] | None = None,
                   clear_aggregation: bool = False) -> Evaluation:
    """The `Evaluation` of the demo's silos, reference and embedded evaluation config `config_name`.

    With `addresses`, the silos are reached over mTLS at those addresses;
    without, they run in this process. Each config gets its own run
    directory: the demo's one-seed runs are not the table's (other settings).
    """
    config = load_config(embedded_config(config_name, workdir), EvaluationConfig)
    allow_in_process_silos()
    pool = load_pool(write_pool(workdir, addresses=addresses, clear_aggregation=clear_aggregation))
    return Evaluation(load_consortium(consortium_path), pool_clients(pool), workdir / "vlm" / "reference",
                      workdir / "evaluation" / Path(config_name).stem, config, baselines=baselines,
                      feature_cache=workdir / "router_cache", progress=progress, fusion=pool_fusion(pool),
                      audit=pool_audit_log(pool), secure_aggregation=secure_aggregation(pool))


def audit_demo(workdir: Path) -> bool:
    """The reviewer's step: verify and reconcile every party's audit log, and write the report."""
    close_coordinator_logs()  # its final signed checkpoint
    print("\n== compliance review: every party's audit log verified and reconciled (`mor audit ...`) ==")
    return review(workdir / COORDINATOR_AUDIT_LOG,
                  [load_silo_config(workdir / "silos" / f"{silo}.yaml").workdir / "audit.db" for silo in SILOS],
                  workdir / "pki" / "ca" / "ca.pem", workdir / "audit" / "report.html",
                  title="mor-secure demo consortium: audit report", verbose=True)


def serve_silos(workdir: Path) -> SiloProcesses:
    """The demo's silos as `mor silo serve` processes (a context manager; SIGTERM on exit, also on failure).

    The coordinator's health checks while they start are on its audit log too.
    """
    kit = CertKit.load(workdir / "pki" / "kits" / "coordinator-coordinator")
    return SiloProcesses({silo: workdir / "silos" / f"{silo}.yaml" for silo in SILOS}, probe_kit=kit,
                         workdir=workdir / "serving", probe_audit=coordinator_log(workdir / COORDINATOR_AUDIT_LOG, kit))


def _accuracy_split(model: RewardModel, pairs_by_kind: dict[str, list[PreferencePair]],
                    reliable: Sequence[str]) -> tuple[float, float, dict[str, float]]:
    """Pairwise accuracy on the reliable kinds and on the other kinds (pair-weighted), and per kind."""
    per_kind = {kind: model.pairwise_accuracy(pairs) for kind, pairs in pairs_by_kind.items()}

    def pooled(kinds: Sequence[str]) -> float:
        n = sum(len(pairs_by_kind[k]) for k in kinds)
        return sum(per_kind[k] * len(pairs_by_kind[k]) for k in kinds) / n if n else float("nan")

    return pooled(reliable), pooled([k for k in QUESTION_KINDS if k not in reliable]), per_kind


def _variant(config: SiloConfig, suffix: str, **dp_update: object) -> SiloConfig:
    """The silo's config with other DP settings, in its own workdir (own ledger), sharing the frozen features."""
    return config.model_copy(update={
        "workdir": config.workdir.with_name(f"{config.name}-{suffix}"),
        "feature_cache": feature_cache_dir(config),  # same frozen features: don't recompute them
        "training": config.training.model_copy(update={"dp": config.training.dp.model_copy(update=dp_update)})})


def _print_table(rows: list[dict]) -> None:
    pair = "pair_dp_acc_reliable" in rows[0]
    header = (f"{'silo':<11} {'architecture':<16} {'trainable':>9} {'epsilon':>7} "
              f"{'DP rel':>6} {'DP oth':>6} " + (f"{'pairDP rel':>10} " if pair else "")
              + f"{'noDP rel':>8} {'noDP oth':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['name']:<11} {r['architecture']:<16} {r['trainable_params']:>9,} {r['epsilon']:>7.2f} "
              f"{r['dp_acc_reliable']:>6.3f} {r['dp_acc_other']:>6.3f} "
              + (f"{r['pair_dp_acc_reliable']:>10.3f} " if pair else "")
              + f"{r['nondp_acc_reliable']:>8.3f} {r['nondp_acc_other']:>8.3f}")
    print(f"(held-out pairwise accuracy on the silo's reliable kind / on the other kinds; DP: epsilon per "
          f"{rows[0]['privacy_unit']}, delta = 1e-5" + ("; pairDP: the same epsilon per pair" if pair else "") + ")")


def run_demo(workdir: Path, *, write_results: Path | None, progress: bool, clear_aggregation: bool = False) -> int:
    # The per-pair DP comparison is for the published results only: it adds a third training per silo.
    compare_privacy_units = write_results is not None
    started = time.monotonic()
    claim_workdir(workdir)
    consortium_path = _install_configs(workdir)
    splits = make_splits(load_consortium(consortium_path))

    print("== consortium PKI: a CA and one certificate kit per party ==")
    authority, kits = init_pki(consortium_path, workdir / "pki", days=30)
    print(f"CA {authority.directory}; kits for " + ", ".join(kits))

    print("== coordinator: tiny VLM and reference policy ==")
    reference = build_reference(workdir, consortium_path, progress=progress)
    reference_accuracy = evaluate_answers(*load_vlm(reference), splits.test)
    print(f"reference policy, exact match of greedy answers on the test split ({len(splits.test)} questions; "
          "overall = mean over kinds): " + ", ".join(f"{k} {v:.3f}" for k, v in reference_accuracy.items()))

    clean = make_pairs(splits.test, seed=EVAL_SEED, max_pairs_per_kind=EVAL_PAIRS_PER_KIND)
    pairs_by_kind = {k: [p for p in clean if p.kind == k] for k in QUESTION_KINDS}
    rows = []
    print("each silo trains its DP reward model, then the same model WITHOUT DP on the same pairs, only to show "
          "what privacy costs in the table's noDP columns: the non-private models are never served")
    for silo in SILOS:
        print(f"== silo {silo} ==")
        config = load_silo_config(workdir / "silos" / f"{silo}.yaml")
        reliable = load_consortium(consortium_path).silo(silo).reliable_kinds
        variants = {"dp": config, "nondp": _variant(config, "nondp", enabled=False)}
        if compare_privacy_units:
            variants["pair_dp"] = _variant(config, "pair", privacy_unit="pair")
        row = {"name": silo, "architecture": config.architecture, "reliable_kinds": list(reliable)}
        for label, variant in variants.items():
            if variant.training.dp.enabled:
                create_ledger(variant)  # `mor silo init`: once per silo, before its first training
            outcome = train_silo(variant, progress=progress)
            rel, oth, by_kind = _accuracy_split(outcome.model, pairs_by_kind, reliable)
            row |= {f"{label}_acc_reliable": rel, f"{label}_acc_other": oth, f"{label}_acc_by_kind": by_kind}
            if label == "dp":
                row |= {"trainable_params": outcome.model.trainable_parameters(), "epsilon": outcome.report.epsilon,
                        "delta": outcome.report.delta, "privacy_unit": outcome.report.privacy_unit,
                        "noise": outcome.report.noise}
            elif label == "pair_dp":
                row["pair_dp_epsilon"] = outcome.report.epsilon
        rows.append(row)
    _print_table(rows)

    write_pool(workdir)  # the in-process pool too, for benchmarks/grpo_step.py's in-process comparison
    print("\n== silos: each serves its model as its own `mor silo serve` process (mTLS on 127.0.0.1) ==")
    with serve_silos(workdir) as served:
        addresses = {name: silo.address for name, silo in served.silos.items()}
        print("serving: " + ", ".join(f"{name} at {address}" for name, address in addresses.items()))
        print("\n== coordinator, over the network: router calibration, GRPO with MoR and with the uniform average "
              "(1 seed) ==")
        if clear_aggregation:
            print("CLEAR AGGREGATION (--clear-aggregation): every silo's weighted scores reach the coordinator in the "
                  "clear; for benchmarks only, never with patients' data")
        else:
            print("secure aggregation: each silo sends its weighted scores masked and encrypted; the coordinator "
                  "learns only their sum")
        evaluation = evaluation_for(workdir, consortium_path, "demo_evaluation.yaml", progress=progress,
                                    addresses=addresses, clear_aggregation=clear_aggregation)
        runs = evaluation.run_all()
        routing = evaluation.routing_table()["correct"]
    print("silos stopped with SIGTERM: " + ", ".join(f"{name} exit {code}" for name, code in served.exit_codes.items())
          + f" (their logs: {workdir / 'serving'})")
    intact = audit_demo(workdir)
    kinds = [k for k in QUESTION_KINDS if k in runs[0].accuracy]
    # Saved like `mor coordinator train-router` saves one, for `mor coordinator align` and benchmarks/grpo_step.py.
    print(f"router (seed {evaluation.config.seeds[0]}) saved to "
          f"{save_router(evaluation.router(evaluation.config.seeds[0]), workdir / 'router')}")
    print("router: mean weight per silo on held-out questions of each kind (objective 'correct')")
    for kind, weights in routing.items():
        print(f"  {kind:<7} " + "  ".join(f"{silo} {w:.2f}" for silo, w in weights.items()))
    print(results_markdown(summarise(runs, kinds), kinds=kinds, title="MoR vs reference vs uniform (demo, 1 seed)",
                           notes=[f"Sampled answers (temperature 1, {evaluation.config.eval_samples} per question) on "
                                  f"{len(evaluation.test)} held-out questions; `make results-table` runs every "
                                  "baseline over 3 seeds."]))
    minutes = (time.monotonic() - started) / 60
    print(f"\ndemo finished in {minutes:.1f} min; everything it wrote is under {workdir}")
    if not intact:
        print("demo: the audit review found problems (see the report above); exiting 1", file=sys.stderr)
        return 1
    if write_results is not None:
        write_results.parent.mkdir(parents=True, exist_ok=True)
        write_results.write_text(json.dumps({
            "reference_policy_accuracy": reference_accuracy,
            "eval_pairs_per_kind": {k: len(v) for k, v in pairs_by_kind.items()},
            "privacy_unit": rows[0]["privacy_unit"],
            "silos": rows,
            "mor_demo": {r.method: {"accuracy": r.accuracy, "greedy_accuracy": r.greedy_accuracy,
                                    "reward_pairwise_accuracy": r.reward_pairwise_accuracy} for r in runs},
            "routing": routing,
            "minutes": minutes,
        }, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {write_results}")
    return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Run the whole consortium locally.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="build, train and compare everything (about 10 to 20 minutes on 2 cores)")
    run.add_argument("--workdir", default="runs/demo",
                     help=f"directory the demo owns: replaced on each run if an earlier run made it ({DEMO_MARKER}), "
                     "else it must be new or empty")
    run.add_argument("--write-results", type=Path, help="also write the results JSON here")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--clear-aggregation", action="store_true",
                     help="fuse the silos' scores in the clear (benchmarks only: the coordinator then sees every "
                     "silo's weighted scores)")
    table = commands.add_parser("table", help="MoR vs every baseline over 3 seeds (about 2 hours on 2 cores)")
    table.add_argument("--workdir", default="runs/table",
                       help="working directory; finished stages (silo models, baselines, runs) are reused")
    table.add_argument("--results-dir", type=Path, default=Path("docs/results"),
                       help="where mor_vs_baselines.json and the plots go")
    table.add_argument("--results-md", type=Path, default=Path("docs/results.md"), help="the Markdown table")
    table.add_argument("--no-progress", action="store_true", help="hide progress bars")
    table.add_argument("--render-only", action="store_true",
                       help="only write the tables of <results-dir>/mor_vs_baselines.json into the Markdown again "
                       "(after a change to how they are printed); runs nothing")

    def _progress(args: argparse.Namespace) -> bool:
        """Bars only on a terminal and without --no-progress; without ours, transformers' checkpoint bars go too."""
        shown = not args.no_progress and sys.stderr.isatty()
        if not shown:
            hf_logging.disable_progress_bar()
        return shown

    def _table(args: argparse.Namespace) -> int:
        from .table import render_table, run_table

        if args.render_only:
            return render_table(results_dir=args.results_dir, results_md=args.results_md)
        return run_table(Path(args.workdir), results_dir=args.results_dir, results_md=args.results_md,
                         progress=_progress(args))

    return run_command(parser, argv, {"run": lambda args: run_demo(
        Path(args.workdir), write_results=args.write_results, progress=_progress(args),
        clear_aggregation=args.clear_aggregation), "table": _table})
