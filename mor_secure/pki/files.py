"""Writing PKI files safely: private keys mode 0600 and never overwritten; public files 0644, replaced atomically.

Modes are set explicitly (fchmod, chmod), never left to the umask: one of 000 would leave a CA directory
writable by anyone, one of 077 public files another account's server cannot read.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIRECTORY_MODE = 0o700
PUBLIC_FILE_MODE = 0o644


def make_private_directory(path: Path) -> bool:
    """Create `path` (and its parents) if missing, `path` itself mode 0700; whether this call created it."""
    if path.is_dir():
        return False
    path.mkdir(parents=True)
    os.chmod(path, PRIVATE_DIRECTORY_MODE)
    return True


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
    """Write then rename, so a reader (a server reloading its CRL or certificate) never sees half a file.

    The data is synced before the rename and the directory after it: without that, a power cut could leave
    the new name on an empty file (issued.json losing every row, a CRL no server accepts).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PUBLIC_FILE_MODE)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), PUBLIC_FILE_MODE)  # the open's mode is masked by the umask
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
