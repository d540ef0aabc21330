"""The identity of a saved model: one SHA-256 over its directory's files."""

from __future__ import annotations

import hashlib
from pathlib import Path


def directory_digest(directory: str | Path, *, recursive: bool = True) -> str:
    """SHA-256 over the files of `directory` (relative paths and contents, sorted by path): name + NUL +
    contents + NUL per file.

    `recursive=False` takes the top-level files only, which is how base-model checkpoints are identified
    (`tiny_vlm.checkpoint_digest`): a downloaded checkpoint's folder may hold tool metadata in subfolders (e.g.
    `.cache/huggingface/`, with timestamps) that is not the model.
    """
    directory = Path(directory)
    found = directory.rglob("*") if recursive else directory.iterdir()
    files = sorted((f for f in found if f.is_file()), key=lambda f: f.relative_to(directory).as_posix())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(directory).as_posix().encode("utf-8") + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()
