"""Model identities: a base checkpoint by its top-level files, a saved reward model by all of its files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mor_secure.models.digests import directory_digest
from mor_secure.models.tiny_vlm import checkpoint_digest


def test_a_checkpoint_is_its_top_level_files_and_a_saved_model_all_of_its_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    # What base checkpoints have always been recorded by: name, NUL, contents, NUL per file, by name.
    recorded = hashlib.sha256(b"config.json\0{}\0model.safetensors\0weights\0").hexdigest()
    assert checkpoint_digest(tmp_path) == directory_digest(tmp_path) == recorded

    # A download tool's metadata (timestamps) beside the weights is not the checkpoint...
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("1733300000.0", encoding="utf-8")
    assert checkpoint_digest(tmp_path) == recorded
    # ...but every file under a saved reward model is (lora_vlm keeps its adapters in a subfolder).
    assert directory_digest(tmp_path) != recorded
