"""Durable file operations shared by the client and the serving side.

Every write that must be all-or-nothing goes through a temp file or dir in the same directory,
is fsynced, renamed into place, and the parent directory is fsynced: :func:`atomic_write` for one
file, :func:`staged_dir` for every output directory (bundles, exported adapters, cache entries).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from soppu_client.format.errors import InputError

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


def link_or_copy(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Make ``dest`` the same bytes as ``src``: a hard link where the filesystem allows, else a copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def file_digest(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def publish_dir(tmp: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool) -> None:
    """Atomically move the fully written directory ``tmp`` to ``out`` (fsynced first); an existing
    ``out`` is replaced only with ``force`` (else InputError), and never left half-replaced."""
    tmp, out = Path(tmp), Path(out)
    fsync_tree(tmp)
    if out.exists():
        if not force:
            raise InputError(f"{out} already exists; choose another output path or pass --force to replace it")
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


@contextmanager
def staged_dir(out: str | os.PathLike[str], *, force: bool) -> Iterator[Path]:
    """An empty temp dir beside ``out`` to write into; when the block ends without an error it is
    published at ``out`` (:func:`publish_dir`), and in every case nothing half-written is left
    behind. An existing ``out`` without ``force`` fails (InputError) before the block runs."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not force:
        raise InputError(f"{out} already exists; choose another output path or pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish_dir(tmp, out, force=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
