"""Prune the LoRAX-side cache: old version dirs, then blobs no remaining dir was built from.

For each adapter and serving form, the newest ``keep`` version dirs stay, and so does the one
``latest`` points to; older ones go. Then every blob in ``.blobs`` that no remaining version dir
lists (its ``soppu_source.json`` files, and a compressed dir's basis) goes too. A pinned request
for a removed version later fetches and verifies it again.

Never outside the root: every entry is looked at with ``lstat`` and a symlink is never followed,
listed into or deleted through (a symlinked owner, adapter or version dir is skipped and counted
in ``links``); the dirs on the way must be real (``Cache.real_dir``), else a CacheError names the
path to remove.

Concurrency: a version dir is removed under its ``Cache.version_lock`` and a blob under its
``Cache.blob_lock``, each taken without waiting (held by a running fetch: skipped, counted in
``busy``). A dir is first renamed into ``.tmp`` and deleted there, so readers see it whole or not
at all. A LoRAX process that has loaded an adapter does not read its files again.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from filelock import Timeout

from soppu_client.format.errors import InputError
from soppu_client.format.names import HEX64_RE
from soppu_serving.cache import FORMS, LATEST, MARKER, Cache

__all__ = ["prune_cache"]

_VERSION = re.compile(r"^v([0-9]+)$")


def _dir_bytes(path: Path) -> int:
    """Bytes that removing ``path`` frees: files not hard-linked elsewhere (a shared basis is not);
    symlinks are not followed."""
    total = 0
    for top, _, files in os.walk(path, followlinks=False):
        for f in files:
            st = os.lstat(os.path.join(top, f))
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                total += st.st_size
    return total


def _real_dirs(path: Path) -> tuple[list[Path], int]:
    """(the real subdirs of ``path``, sorted; how many entries were symlinks, skipped; the
    cache's own ``latest`` links do not count)."""
    dirs, links = [], 0
    for entry in os.scandir(path):
        if entry.is_symlink():
            if entry.name == LATEST:
                continue
            links += 1
        elif entry.is_dir(follow_symlinks=False):
            dirs.append(Path(entry.path))
    return sorted(dirs), links


def _used_blobs(cache: Cache, version_dir: Path) -> set[str]:
    """Blob digests a complete version dir was built from (and, compressed, links to)."""
    used: set[str] = set()
    for name, field in ((MARKER, "files"), ("adapter_config.json", "basis")):
        try:
            doc = json.loads(cache.read_text(version_dir / name))[field]
            used |= {f["sha256"] for f in doc} if field == "files" else {str(doc["sha256"])}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return used


def prune_cache(root: str | os.PathLike[str], *, keep: int = 1, dry_run: bool = False) -> dict[str, Any]:
    """Prune the cache at ``root``; returns what was (or would be) removed."""
    if keep < 1:
        raise InputError(f"`keep` must be >= 1 (the newest version of every adapter stays), got {keep}")
    removed_dirs: list[str] = []
    removed_blobs: list[str] = []
    freed, busy = 0, 0
    used: set[str] = set()
    links = 0
    base = Cache(root, "peft")
    for form in FORMS:
        cache = Cache(base.root, form)
        if not cache.real_dir(cache.tree, create=False):
            continue
        owners, n = _real_dirs(cache.tree)
        links += n
        for owner_dir in (p for p in owners if not p.name.startswith(".")):
            adapters, n = _real_dirs(owner_dir)
            links += n
            for adapter_dir in adapters:
                owner, name = owner_dir.name, adapter_dir.name
                vdirs, n = _real_dirs(adapter_dir)
                links += n
                versions = sorted(int(m.group(1)) for p in vdirs if (m := _VERSION.match(p.name)))
                kept = set(versions[-keep:])
                latest = cache.latest_version(owner, name)
                if latest is not None:
                    kept.add(latest)
                for v in versions:
                    vdir = cache.version_dir(owner, name, v)
                    if v in kept:
                        used |= _used_blobs(cache, vdir)
                        continue
                    try:
                        with cache.version_lock(owner, name, v, timeout=0):
                            size = _dir_bytes(vdir)
                            if not dry_run:
                                with cache.staging(f"prune-{owner}--{name}--v{v}") as trash:
                                    os.replace(vdir, trash / vdir.name)
                    except Timeout:
                        busy += 1
                        used |= _used_blobs(cache, vdir)
                        continue
                    removed_dirs.append(str(vdir.relative_to(cache.root)))
                    freed += size
    blob_dir = base.root / ".blobs" / "sha256"
    if base.real_dir(blob_dir, create=False):
        for blob in sorted(blob_dir.iterdir()):
            if not HEX64_RE.match(blob.name) or blob.name in used:
                continue
            try:
                with base.blob_lock(blob.name, timeout=0):
                    size = os.lstat(blob).st_size  # a planted symlink is removed itself, never its target
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
            "removed_blobs": removed_blobs, "bytes": freed, "busy": busy, "links": links}
