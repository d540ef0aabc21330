"""Shared fixtures: a small consortium, a tiny VLM built from config, and a briefly fine-tuned reference.

Everything expensive is session-scoped and built once, through the same public
functions the CLI uses (`build_tiny_vlm`, `train_reference`), so the tests
load checkpoints with `from_pretrained(path)` exactly like a real deployment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Small enough that the whole consortium is read, split and paired in under a second.
SMALL_CONSORTIUM_YAML = """\
seed: 0
splits:
  sft_images: 60
  calibration_images: 20
  test_images: 40
silos:
  - name: hospital-a
    image_share: 0.05
    reliable_kinds: [shape]
    label_flip_rate: 0.4
    max_pairs_per_kind: 40
  - name: bank-b
    image_share: 0.05
    reliable_kinds: [color]
    label_flip_rate: 0.4
    max_pairs_per_kind: 40
  - name: hospital-c
    image_share: 0.05
    reliable_kinds: [yes_no]
    label_flip_rate: 0.4
    max_pairs_per_kind: 40
"""

# Sizes of the tiny VLM used everywhere in the tests (~70k parameters).
TINY_VLM_SIZES = {"vision_hidden": 32, "text_hidden": 32, "text_layers": 1, "vision_layers": 1, "attention_heads": 2}


@pytest.fixture(scope="module")
def one_torch_thread():
    """The module that uses it runs on one intra-op torch thread; the setting is restored after it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def consortium_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small consortium YAML (seed 0; 60/20/40 shared images; three silos of 5% each)."""
    path = tmp_path_factory.mktemp("consortium") / "consortium.yaml"
    path.write_text(SMALL_CONSORTIUM_YAML, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def consortium(consortium_path: Path):
    """(spec, splits) of the small consortium."""
    from mor_secure.data import load_consortium, make_splits

    spec = load_consortium(consortium_path)
    return spec, make_splits(spec)


@pytest.fixture(scope="session")
def tiny_vlm_config():
    from mor_secure.models.tiny_vlm import TinyVLMConfig

    return TinyVLMConfig(**TINY_VLM_SIZES)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory, consortium_path: Path, tiny_vlm_config) -> Path:
    """A randomly initialised tiny LLaVA checkpoint; tokenizer trained on the public SFT split's text."""
    from coordinator.cli import vlm_corpus
    from mor_secure.models.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "base", vlm_corpus(consortium_path), tiny_vlm_config)


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory: pytest.TempPathFactory, tiny_vlm_dir: Path, consortium) -> Path:
    """The tiny VLM after a 3-step vision warm-up and 3 SFT steps on the public split: the reference / lora_vlm backbone."""
    from coordinator.reference import SFTConfig, train_reference
    from coordinator.vision_pretraining import VisionPretrainingConfig

    _, splits = consortium
    return train_reference(tiny_vlm_dir, splits.sft, tmp_path_factory.mktemp("vlm") / "reference",
                           SFTConfig(steps=3, batch_size=8, vision_pretraining=VisionPretrainingConfig(steps=3, batch_size=8)),
                           progress=False)


@pytest.fixture(scope="session", autouse=True)
def in_process_silos() -> None:
    """Tests compose both roles in one process, as the `mor` entry point does (mor_cli/roles.py)."""
    from mor_cli.roles import allow_in_process_silos

    allow_in_process_silos()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory):
    """A throw-away consortium PKI made by the project's own code: the CA and one kit per party."""
    from types import SimpleNamespace

    from mor_secure.pki import CertificateAuthority, PartyIdentity

    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(root / "ca")
    parties = {"hospital-a": ("silo", "hospital-a"), "bank-b": ("silo", "bank-b"),
               "coordinator": ("coordinator", "coordinator"), "auditor": ("auditor", "auditor")}
    kits = {key: ca.issue(PartyIdentity(role, name), root / "kits" / f"{role}-{name}")
            for key, (role, name) in parties.items()}
    return SimpleNamespace(root=root, ca=ca, crl=ca.directory / "crl.pem", kits=kits)
