"""Writing PKI files safely: private keys mode 0600 and never overwritten; public files 0644, replaced atomically.

Modes are set explicitly (fchmod, chmod), never left to the umask: one of 000 would leave a CA directory
writable by anyone, one of 077 public files another account's server cannot read.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PRIVATE_DIRECTORY_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644


def make_private_directory(path: Path) -> bool:
    """`path` as a directory of mode 0700, created (with its parents, whose modes the umask sets) if missing, made
    0700 if it was not (an empty --out others may write: they could plant files in a kit); whether this call
    created it."""
    created = not path.is_dir()
    if created:  # never wider than 0700, even for an instant; exist_ok: two commands making it at once both go on
        path.mkdir(mode=PRIVATE_DIRECTORY_MODE, parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIRECTORY_MODE)
    return created


def write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600; refuse if it exists (a private key is never silently replaced).

    On any failure after creating it, `path` is removed again: no partial key is left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
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
    """Replace `path` with `data`, mode 0644 (`replace_file`)."""
    replace_file(path, data, mode=PUBLIC_FILE_MODE)


def replace_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write then rename, so a reader (a server reloading its CRL or certificate) never sees half a file; the
    file gets `mode` whatever the umask, also over an older file of another mode.

    The data is synced before the rename and the directory after it: without that, a power cut could leave
    the new name on an empty file (issued.json losing every row, a CRL no server accepts).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A new name no one else can have made (O_EXCL, random): a fixed one could be a link planted by whoever may
    # write the directory, and the write would follow it and the rename put the link in place.
    try:
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    except PermissionError as exc:
        raise PermissionError(exc.errno, f"cannot write {path}: its directory {path.parent} is not writable "
                              f"({exc.strerror})") from None
    partial = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # mkstemp's 0600 is not always the mode wanted
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
