"""On-disk layout of the serving-side cache, its locks and its content-addressed blob store.

    <root>/<owner>/<name>/v<version>/      a materialized PEFT adapter dir (immutable once renamed in)
        adapter_config.json
        adapter_model.safetensors
        soppu_source.json                  provenance: registry, statement digest, key id, files
    <root>/<owner>/<name>/latest           symlink -> v<N>, the newest version materialized here
    <root>/.compressed/<owner>/<name>/...  the same for compressed dirs (SOPPU_SERVE_FORMAT=compressed):
        adapter_config.json, basis.safetensors (a hard link into .blobs: one copy per cluster),
        cores.safetensors, soppu_source.json
    <root>/.blobs/sha256/<hex>             verified blobs, shared by every adapter (a basis once)
    <root>/.seen/<owner>/<name>            the highest version whose signed statement this host has
                                           verified for that adapter (JSON), for rollback protection
    <root>/.locks/                         one lock file per adapter version and per blob
    <root>/.tmp/                           staging; anything here is garbage from a crashed run

``<root>`` is ``Settings.cache_root`` (``$SOPPU_CACHE_DIR`` or ``<HUGGINGFACE_HUB_CACHE>/soppu``,
LoRAX's cache). A version dir is built in ``.tmp`` (:meth:`Cache.staging`, the one staging place:
renames into the cache must stay on its filesystem) and renamed into place while its
:meth:`Cache.version_lock` is held, so readers in other processes or shards see either nothing or
the complete dir. Blobs are checked, stored and removed under :meth:`Cache.blob_lock`. The
high-water mark of an adapter (:meth:`Cache.note_seen`, shared by both serving forms) only rises,
atomically, under :meth:`Cache.seen_lock`; delete its file to accept an older ``latest`` again.
"""

from __future__ import annotations

import hmac
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from soppu_client.format.errors import InputError
from soppu_client.format.fsutil import atomic_write, file_digest, fsync_dir

MARKER = "soppu_source.json"
LATEST = "latest"
SEEN = ".seen"
FORMS = {  # serving form -> the weight files a complete version dir holds
    "peft": ("adapter_model.safetensors",),
    "compressed": ("basis.safetensors", "cores.safetensors"),
}


class Cache:
    """Paths, locks and the blob store under one cache root, for one serving form."""

    def __init__(self, root: str | os.PathLike[str], form: str = "peft"):
        if form not in FORMS:
            raise InputError(f"serving form {form!r} is unknown; use one of {', '.join(FORMS)}")
        self.root = Path(root)
        self.form = form
        # Owner names never start with ".", so the compressed tree cannot collide with an owner.
        self.tree = self.root if self.form == "peft" else self.root / ".compressed"

    @property
    def weight_names(self) -> tuple[str, ...]:
        return FORMS[self.form]

    # -- layout -------------------------------------------------------------------------------
    def adapter_root(self, owner: str, name: str) -> Path:
        return self.tree / owner / name

    def version_dir(self, owner: str, name: str, version: int) -> Path:
        return self.adapter_root(owner, name) / f"v{version}"

    def latest_link(self, owner: str, name: str) -> Path:
        return self.adapter_root(owner, name) / LATEST

    def blob_path(self, sha256: str) -> Path:
        return self.root / ".blobs" / "sha256" / sha256

    def is_complete(self, version_dir: Path) -> bool:
        return (version_dir / MARKER).is_file() and all((version_dir / f).is_file() for f in self.weight_names)

    def latest_version(self, owner: str, name: str) -> int | None:
        """Version the ``latest`` link points to, or None."""
        try:
            target = os.readlink(self.latest_link(owner, name))
        except OSError:
            return None
        if target.startswith("v") and target[1:].isdigit():
            return int(target[1:])
        return None

    # -- locks and staging --------------------------------------------------------------------
    def _lock(self, key: str, timeout: float) -> FileLock:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
        return FileLock(str(locks / f"{safe}.lock"), timeout=timeout)

    def version_lock(self, owner: str, name: str, version: int, *, timeout: float = -1) -> FileLock:
        """The lock (a context manager) under which ``v<version>`` of this form is built or removed;
        ``timeout`` seconds (-1: wait forever, 0: don't wait), then ``filelock.Timeout``."""
        return self._lock(f"adapter-{self.form}-{owner}--{name}--v{version}", timeout)

    def seen_lock(self, owner: str, name: str, *, timeout: float = -1) -> FileLock:
        """The lock under which the high-water mark of ``owner/name`` is raised (as :meth:`version_lock`)."""
        return self._lock(f"seen-{owner}--{name}", timeout)

    def blob_lock(self, sha256: str, *, timeout: float = -1) -> FileLock:
        """The lock under which blob ``sha256`` is checked, stored or removed (as :meth:`version_lock`)."""
        return self._lock(f"blob-{sha256}", timeout)

    @contextmanager
    def staging(self, label: str) -> Iterator[Path]:
        """A fresh dir under ``.tmp`` that is always removed afterwards (rename what you keep)."""
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=tmp_root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # -- rollback protection ------------------------------------------------------------------
    def seen_path(self, owner: str, name: str) -> Path:
        """The high-water mark file of ``owner/name`` (the same for every serving form)."""
        return self.root / SEEN / owner / name

    def highest_seen(self, owner: str, name: str) -> int | None:
        """The highest version of ``owner/name`` verified on this host, or None (none, or unreadable)."""
        try:
            version = json.loads(self.seen_path(owner, name).read_text(encoding="utf-8"))["version"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return version if type(version) is int else None

    def note_seen(self, owner: str, name: str, version: int, statement_sha256: str) -> None:
        """Raise the high-water mark of ``owner/name`` to ``version`` (never lowers it; atomic)."""
        current = self.highest_seen(owner, name)
        if current is not None and current >= version:
            return
        path = self.seen_path(owner, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.seen_lock(owner, name):
            current = self.highest_seen(owner, name)  # another process may have raised it meanwhile
            if current is not None and current >= version:
                return
            doc = {"owner": owner, "name": name, "version": version, "statement_sha256": statement_sha256}
            atomic_write(path, (json.dumps(doc, sort_keys=True) + "\n").encode())

    # -- blobs --------------------------------------------------------------------------------
    def cached_blob(self, sha256: str, size: int) -> Path | None:
        """The cached blob if present and still intact (re-hashed: the disk is not trusted)."""
        path = self.blob_path(sha256)
        if not path.is_file():
            return None
        digest, n = file_digest(path)
        if n == size and hmac.compare_digest(digest, sha256):
            return path
        path.unlink(missing_ok=True)  # corrupted on disk: drop it, it will be fetched again
        return None

    def store_blob(self, verified_file: Path, sha256: str) -> Path:
        """Move an already verified file into the blob store (atomic; keeps an existing copy)."""
        dest = self.blob_path(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(verified_file, "rb") as f:
            os.fsync(f.fileno())
        os.replace(verified_file, dest)
        fsync_dir(dest.parent)
        return dest

    def set_latest(self, owner: str, name: str, version: int) -> None:
        """Point ``latest`` at ``v<version>`` unless it already points at a newer one (atomic)."""
        current = self.latest_version(owner, name)
        if current is not None and current >= version:
            return
        link = self.latest_link(owner, name)
        tmp = link.with_name(f".{LATEST}.{os.getpid()}.{os.urandom(4).hex()}")
        os.symlink(f"v{version}", tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)
