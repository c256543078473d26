"""Durable file operations shared by the client and the serving side.

Every write that must be all-or-nothing goes through a temp file or dir in the same directory,
is fsynced, renamed into place, and the parent directory is fsynced.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

_READ_CHUNK = 1 << 20


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it survives a crash (best effort where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file under ``root``, then every directory (``root`` included)."""
    root = Path(root)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *sorted(x for x in root.rglob("*") if x.is_dir())]:
        fsync_dir(d)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temp file in the same dir (fsynced, chmod ``mode``,
    renamed over ``path``); on any failure nothing is left behind and ``path`` is unchanged."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def file_digest(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
