"""`mor demo table`: the full MoR-vs-baselines evaluation, written to docs/ (DESIGN §2.4).

Stages, each skipped when its output already exists in the workdir (so an
interrupted table resumes, and a silo is never asked to spend its privacy
budget twice): reference policy; the three silos' DP reward models; the two
simulation-only baseline reward models (FedAvg over one shared
architecture, and a centralised model on pooled pairs); then every method
over every seed (`coordinator.evaluation`), published as
`mor_vs_baselines.json`, a Markdown table and PNG plots.
"""

from __future__ import annotations

import time
from pathlib import Path

from coordinator.evaluation import RESULTS_JSON, publish, render_results_page
from coordinator.pool import client_for_model
from pydantic import Field

from mor_secure.config import StrictModel, load_config
from silo_agent.training import MODEL_DIR, create_ledger, ledger_path, load_silo_config, train_silo

from .baselines import CentralizedSettings, FedAvgSettings, train_centralized_reward_model, train_fedavg_reward_model
from .demo import SILOS, _install_configs, build_reference, embedded_config, evaluation_for
from .roles import allow_in_process_silos


class BaselineSettings(StrictModel):
    """`demo_configs/baselines.yaml`: how the demo trains the two simulation-only baseline reward models."""

    fedavg: FedAvgSettings = Field(default_factory=FedAvgSettings, description="The FedAvg reward model.")
    centralized: CentralizedSettings = Field(default_factory=CentralizedSettings,
                                             description="The centralised reward model on pooled pairs.")


def run_table(workdir: Path, *, results_dir: Path, results_md: Path, progress: bool) -> int:
    started = time.monotonic()
    allow_in_process_silos()  # the table's silos run in this process (simulation)
    consortium_path = workdir / "consortium.yaml"
    if not consortium_path.is_file():
        _install_configs(workdir)
    if not (workdir / "vlm" / "reference").is_dir():
        print("== coordinator: tiny VLM and reference policy ==")
        build_reference(workdir, consortium_path, progress=progress)
    configs = [load_silo_config(workdir / "silos" / f"{silo}.yaml") for silo in SILOS]
    for config in configs:
        if not (config.workdir / MODEL_DIR).is_dir():
            print(f"== silo {config.name}: DP reward model ==")
            if not ledger_path(config).exists():
                create_ledger(config)  # `mor silo init`, once: a resumed table keeps the ledger it has
            train_silo(config, progress=progress)

    settings = load_config(embedded_config("baselines.yaml", workdir), BaselineSettings)
    baseline_dirs = {"fedavg_rm": workdir / "baselines" / "fedavg_rm",
                     "centralized_rm": workdir / "baselines" / "centralized_rm"}
    if not baseline_dirs["fedavg_rm"].is_dir():
        print("== baseline: FedAvg reward model (simulation only) ==")
        train_fedavg_reward_model(configs, baseline_dirs["fedavg_rm"], settings.fedavg, progress=progress)
    if not baseline_dirs["centralized_rm"].is_dir():
        print("== baseline: centralised reward model on pooled pairs (breaks privacy; a reference point) ==")
        train_centralized_reward_model(configs, baseline_dirs["centralized_rm"], settings.centralized,
                                       progress=progress)

    print("== coordinator: every method over every seed ==")
    evaluation = evaluation_for(workdir, consortium_path, "evaluation.yaml", progress=progress,
                                baselines={name: client_for_model(name, path) for name, path in baseline_dirs.items()})
    runs = evaluation.run_all()
    markdown = publish(evaluation, runs, json_path=results_dir / RESULTS_JSON, markdown_path=results_md,
                       plots_prefix=results_dir / "mor_training")
    print(markdown)
    print(f"table finished in {(time.monotonic() - started) / 60:.1f} min; results in {results_dir} and {results_md}")
    return 0


def render_table(*, results_dir: Path, results_md: Path) -> int:
    """`mor demo table --render-only`: the stored results' tables written into the Markdown again."""
    json_path = results_dir / RESULTS_JSON
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: no results to render; `mor demo table` writes them")
    render_results_page(json_path, results_md)
    print(f"tables of {json_path} written into {results_md}")
    return 0
