"""The identity of a saved model: one SHA-256 over its directory's files."""

from __future__ import annotations

import hashlib
from pathlib import Path


def directory_digest(directory: str | Path) -> str:
    """SHA-256 over every file under `directory` (relative paths and contents, sorted by path).

    For a flat directory this is name + NUL + contents + NUL per file in name order, the digest base-model
    checkpoints have always been recorded by (`tiny_vlm.checkpoint_digest`).
    """
    directory = Path(directory)
    files = sorted((f for f in directory.rglob("*") if f.is_file()), key=lambda f: f.relative_to(directory).as_posix())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(directory).as_posix().encode("utf-8") + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()
