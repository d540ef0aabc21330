"""Writing PKI files safely: private keys mode 0600 and never overwritten; public files replaced atomically."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600; refuse if it exists (a private key is never silently replaced).

    On any failure after creating it, `path` is removed again: no partial key is left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; private keys are never overwritten (move it away first, or "
                              "renew the kit with `mor pki issue --renew`, which retires the old key)") from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        # A partial key (a full disk, a failed sync) would block every retry here, which opens with O_EXCL.
        path.unlink(missing_ok=True)
        raise


def write_public(path: Path, data: bytes) -> None:
    """Write then rename, so a reader (a server reloading its CRL or certificate) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
