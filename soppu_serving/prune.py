"""Prune the LoRAX-side cache: old version dirs, then blobs no remaining dir was built from.

For each adapter and serving form, the newest ``keep`` version dirs stay, and so does the one
``latest`` points to; older ones go. Then every blob in ``.blobs`` that no remaining version dir
lists (its ``soppu_source.json`` files, and a compressed dir's basis) goes too. A pinned request
for a removed version later fetches and verifies it again.

Concurrency: a version dir is removed under its ``Cache.version_lock`` and a blob under its
``Cache.blob_lock``, each taken without waiting (held by a running fetch: skipped, counted in
``busy``). A dir is first renamed into ``.tmp`` and deleted there, so readers see it whole or not
at all. A LoRAX process that has loaded an adapter does not read its files again.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from filelock import Timeout

from soppu_client.format.compressed_form import CompressedAdapterError, read_compressed_config
from soppu_client.format.errors import InputError
from soppu_client.format.names import HEX64_RE
from soppu_serving.cache import FORMS, MARKER, Cache

__all__ = ["prune_cache"]

_VERSION = re.compile(r"^v([0-9]+)$")


def _dir_bytes(path: Path) -> int:
    """Bytes that removing ``path`` frees: files not hard-linked elsewhere (a shared basis is not)."""
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            total += st.st_size if st.st_nlink == 1 else 0
    return total


def _used_blobs(version_dir: Path) -> set[str]:
    """Blob digests a complete version dir was built from (and, compressed, links to)."""
    used: set[str] = set()
    try:
        used |= {f["sha256"] for f in json.loads((version_dir / MARKER).read_text(encoding="utf-8"))["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        config = read_compressed_config(version_dir)
    except CompressedAdapterError:
        config = None
    if config is not None:
        used.add(str(config["basis"]["sha256"]))
    return used


def prune_cache(root: str | os.PathLike[str], *, keep: int = 1, dry_run: bool = False) -> dict[str, Any]:
    """Prune the cache at ``root``; returns what was (or would be) removed."""
    if keep < 1:
        raise InputError(f"`keep` must be >= 1 (the newest version of every adapter stays), got {keep}")
    removed_dirs: list[str] = []
    removed_blobs: list[str] = []
    freed, busy = 0, 0
    used: set[str] = set()
    base = Cache(root, "peft")
    for form in FORMS:
        cache = Cache(base.root, form)
        if not cache.tree.is_dir():
            continue
        for owner_dir in sorted(p for p in cache.tree.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for adapter_dir in sorted(p for p in owner_dir.iterdir() if p.is_dir()):
                owner, name = owner_dir.name, adapter_dir.name
                versions = sorted(int(m.group(1)) for p in adapter_dir.iterdir()
                                  if (m := _VERSION.match(p.name)) and p.is_dir())
                kept = set(versions[-keep:])
                latest = cache.latest_version(owner, name)
                if latest is not None:
                    kept.add(latest)
                for v in versions:
                    vdir = cache.version_dir(owner, name, v)
                    if v in kept:
                        used |= _used_blobs(vdir)
                        continue
                    try:
                        with cache.version_lock(owner, name, v, timeout=0):
                            size = _dir_bytes(vdir)
                            if not dry_run:
                                with cache.staging(f"prune-{owner}--{name}--v{v}") as trash:
                                    os.replace(vdir, trash / vdir.name)
                    except Timeout:
                        busy += 1
                        used |= _used_blobs(vdir)
                        continue
                    removed_dirs.append(str(vdir.relative_to(cache.root)))
                    freed += size
    blob_dir = base.root / ".blobs" / "sha256"
    if blob_dir.is_dir():
        for blob in sorted(blob_dir.iterdir()):
            if not HEX64_RE.match(blob.name) or blob.name in used:
                continue
            try:
                with base.blob_lock(blob.name, timeout=0):
                    size = blob.stat().st_size
                    if not dry_run:
                        blob.unlink()
            except Timeout:
                busy += 1
                continue
            except FileNotFoundError:
                continue
            removed_blobs.append(blob.name)
            freed += size
    return {"cache": str(base.root), "keep": keep, "dry_run": dry_run, "removed_dirs": removed_dirs,
            "removed_blobs": removed_blobs, "bytes": freed, "busy": busy}
