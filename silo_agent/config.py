"""The silo operator's YAML: which data, which architecture, how much privacy to spend."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from mor_secure.config import StrictModel
from mor_secure.privacy import TrainingConfig
from mor_secure.privacy.training_config import UnitKind

Architecture = Literal["lora_vlm", "frozen_encoders", "small_cnn"]


class PrivacyBudget(StrictModel):
    """The silo's lifetime privacy budget; every spend is charged against it in the ledger."""

    epsilon: float = Field(10.0, gt=0, description="Total epsilon this silo will ever spend (basic composition).")
    delta: float = Field(2e-5, gt=0, lt=1, description="Total delta this silo will ever spend.")


class ServeSettings(StrictModel):
    """`mor silo serve`: where the silo listens, with which kit, under which policy. Paths relative to the YAML."""

    kit: Path = Field(description="This silo's certificate kit directory (`mor pki init` or `mor pki issue`).")
    crl: Path | None = Field(None, description="The consortium CRL, re-read when it changes (default: <kit>/crl.pem; "
                             "point it at the file the consortium publishes revocations to).")
    policy: Path | None = Field(None, description="Serving policy YAML (policies/*.yaml; default: the secure "
                                "defaults of mor_secure/policy/schema.py: only the coordinator may score).")
    host: str = Field("127.0.0.1", description="Address to listen on (loopback by default; a real deployment "
                      "names its interface).")
    port: int = Field(0, ge=0, le=65535, description="Port to listen on; 0 lets the OS choose (reported on start).")
    audit_log: Path | None = Field(None, description="The silo's tamper-evident audit log, an SQLite file "
                                   "(default: <workdir>/audit.db); `mor audit verify` checks it.")
    # Finite and bounded: gRPC's shutdown thread dies with OverflowError on inf or a huge grace, leaving the
    # server neither drained nor stopped; an hour already outlasts what a process supervisor waits.
    drain_seconds: float = Field(30.0, ge=0, le=3600, allow_inf_nan=False,
                                 description="On SIGTERM: how long in-flight calls may finish (at most 3600 s).")


class OwnData(StrictModel):
    """The silo's own preference pairs (docs/silo-operator.md section 5). Paths relative to the YAML."""

    pairs: Path = Field(description="Preference JSONL in TRL's field names, one pair per line: prompt, chosen, "
                        "rejected, images (one path, relative to `images`), optional kind and unit_id (the patient: "
                        "the privacy unit). Validated whole before training: one bad row refuses the run, every "
                        "bad row listed as FILE:LINE: reason.")
    images: Path = Field(description="Directory the rows' image paths are resolved under; a path that leaves it "
                         "(absolute, `..`, a symlink out) is refused.")
    unit: UnitKind = Field(
        "patient", description="What one unit of the guarantee is (with training.dp.privacy_unit: image): patient, "
        "every row naming its patient in unit_id (a row without one is refused); or image, no row naming a "
        "unit_id. The ledger holds charges over one unit, so a silo cannot sum per-image and per-patient epsilons.")


class SiloConfig(StrictModel):
    """`mor silo train --config silo.yaml`. Relative paths are relative to this file."""

    name: str = Field(description="The silo's name; must match a silo in the consortium file.")
    consortium: Path = Field(description="Consortium YAML shared by every party (splits, silo data specs).")
    workdir: Path = Field(description="Where the reward model, privacy ledger, public privacy report and local "
                          "diagnostics are written. The ledger is created once by `mor silo init`.")
    architecture: Architecture = Field(description="Reward-model architecture: lora_vlm, frozen_encoders or small_cnn.")
    data: OwnData | None = Field(
        None, description="Your own preference pairs to train on, only with DP on and unseeded noise (refused "
        "otherwise). Without it, `mor silo train` trains on the easy-VQA partition the consortium file gives "
        "this silo, with the label noise it sets (the benchmark).")
    base_model: Path | None = Field(None, description="Shared VLM checkpoint directory; required for lora_vlm.")
    feature_cache: Path | None = Field(
        None, description="frozen_encoders only: where training caches the frozen features of the silo's images "
        "(default: <workdir>/feature_cache). Serving never reads it (a cache hit would reveal that an image is in "
        "the silo's data); the served model caches what callers send in <workdir>/served_feature_cache, which "
        "this may not be, hold or lie within.")
    validation_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of the silo's privacy units held back (never trained on) for the "
        "local held-out accuracy in local_diagnostics.json; each unit is drawn on its own id, so a silo of few units "
        "may hold none back (then there is no held-out accuracy). Scores are standardised on public calibration "
        "pairs instead, so nothing fitted on private data is served.")
    public_pretraining_steps: int = Field(
        800, gt=0, description="small_cnn only: steps of public (non-private) trunk pre-training on the SFT split.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Bradley-Terry DP-SGD settings.")
    privacy_budget: PrivacyBudget = Field(default_factory=PrivacyBudget, description="Lifetime budget for the ledger.")
    serve: ServeSettings | None = Field(None, description="How `mor silo serve` serves the trained model.")

    @model_validator(mode="after")
    def _check_cross_fields(self) -> SiloConfig:
        if self.architecture == "lora_vlm" and self.base_model is None:
            raise ValueError("architecture lora_vlm needs base_model: the path of the shared VLM checkpoint")
        if self.architecture != "lora_vlm" and self.base_model is not None:
            raise ValueError(f"base_model is only used by lora_vlm; remove it or set architecture: lora_vlm "
                             f"(architecture is {self.architecture})")
        dp = self.training.dp
        if self.data is not None and (not dp.enabled or dp.insecure_seeded_noise is not None):
            raise ValueError(
                "data: names the silo's own data, which is trained on only with differential privacy: set "
                "training.dp.enabled: true and remove training.dp.insecure_seeded_noise (without DP the run "
                "would reach no privacy ledger; with seeded noise it would be charged as private and is not). "
                "Remove data: to run the easy-VQA benchmark without DP")
        if self.data is not None and dp.public_unit_count is None:
            raise ValueError(
                "data: names the silo's own data, whose number of units is private: set "
                "training.dp.public_unit_count to a count you may publish (your patient count, rounded); the "
                "published sample rate, steps and noise are planned from it, so they reveal nothing of who is in "
                "the data (planned from the actual count, they give it away to within one batch)")
        if dp.enabled and (dp.target_epsilon > self.privacy_budget.epsilon or dp.target_delta > self.privacy_budget.delta):
            raise ValueError(
                f"training.dp targets (epsilon {dp.target_epsilon}, delta {dp.target_delta}) exceed the whole "
                f"privacy_budget (epsilon {self.privacy_budget.epsilon}, delta {self.privacy_budget.delta}); "
                "lower the targets or raise the budget")
        return self
