"""Small file-system helpers shared by checkpoints, caches and manifests."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def why_missing(path: Path) -> str:
    """Why ``path`` cannot be opened, for a one-line refusal: ``"does not exist"``, or what is there instead --
    a symlink loop (``Path.exists()`` says False for one, which would read as "does not exist" to a user looking
    at the link in ``ls``), a link to a missing target, a file on the way, no permission."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop (following its links comes back to where it started); point it at a real path"
        if exc.errno == errno.ENOTDIR:
            return "lies below a file, not a folder"
        if exc.errno == errno.EACCES:
            return "cannot be reached (permission denied)"
        if os.path.islink(path):
            return f"is a symbolic link to '{os.readlink(path)}', which does not exist"
        return "does not exist"
    return "exists"
