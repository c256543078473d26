"""On-disk layout of the serving-side cache, its locks and its content-addressed blob store.

    <root>/<owner>/<name>/v<version>/      a materialized PEFT adapter dir (immutable once renamed in)
        adapter_config.json
        adapter_model.safetensors
        soppu_source.json                  provenance: registry, statement digest, key id, files
    <root>/<owner>/<name>/latest           symlink -> v<N>, the newest version materialized here
                                           (written for LoRAX's path lookups; never followed here)
    <root>/.compressed/<owner>/<name>/...  the same for compressed dirs (SOPPU_SERVE_FORMAT=compressed):
        adapter_config.json, basis.safetensors (a hard link into .blobs: one copy per cluster),
        cores.safetensors, soppu_source.json
    <root>/.blobs/sha256/<hex>             verified blobs, shared by every adapter (a basis once)
    <root>/.trust/<trust-id>/seen/<owner>/<name>
                                           the highest version whose signed statement this host has
                                           verified and served for that adapter (JSON), for rollback
                                           protection, one tree per trust root (pinned keys dir, or
                                           the registry's keys at one URL)
    <root>/.trust/<trust-id>/keys/<owner>.json
                                           trust on first use: the owner keys this host accepted
                                           under that trust root (unpinned roots only)
    <root>/.locks/                         one lock file per adapter version and per blob
    <root>/.tmp/                           staging; anything here is garbage from a crashed run

``<root>`` is ``Settings.cache_root`` (``$SOPPU_CACHE_DIR`` or ``<HUGGINGFACE_HUB_CACHE>/soppu``,
LoRAX's cache). A version dir is built in ``.tmp`` (:meth:`Cache.staging`, the one staging place:
renames into the cache must stay on its filesystem) and renamed into place while its
:meth:`Cache.version_lock` is held, so readers in other processes or shards see either nothing or
the complete dir. Blobs are checked, stored and removed under :meth:`Cache.blob_lock`. The
high-water mark of an adapter (:meth:`Cache.note_seen`, shared by both serving forms) only rises,
atomically, under :meth:`Cache.seen_lock`; delete its file to accept an older ``latest`` again.

A hostile neighbour (SECURITY.md): the cache follows no symlink under its root. Every directory
on a path the cache reads or writes is checked with ``lstat`` from the root down
(:meth:`Cache.real_dir`: a symlink or a file there is a :class:`CacheError` naming it and the
fix), files are opened with ``O_NOFOLLOW``, and a lock file that is a symlink is refused. What a
file held when it was verified is remembered per process (:class:`Stamps`: device, inode, size,
mtime and ctime after hashing), so a later hit re-checks it with one ``lstat`` instead of a hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from soppu_client.format.errors import InputError, VerificationError
from soppu_client.format.fsutil import atomic_write, fsync_dir

__all__ = ["CacheError", "Cache", "FORMS", "LATEST", "MARKER", "Stamps"]

MARKER = "soppu_source.json"
LATEST = "latest"
TRUST = ".trust"
FORMS = {  # serving form -> the weight files a complete version dir holds
    "peft": ("adapter_model.safetensors",),
    "compressed": ("basis.safetensors", "cores.safetensors"),
}
FORM_FILES = {  # serving form -> every file a complete version dir holds, nothing else
    "peft": ("adapter_config.json", "adapter_model.safetensors", MARKER),
    "compressed": ("adapter_config.json", "basis.safetensors", "cores.safetensors", MARKER),
}
_READ = 1 << 20
_RACY_SECONDS = 2.0  # a file changed this recently may change again within one timestamp tick


class CacheError(VerificationError):
    """The cache's own disk is not what this host wrote (a symlink, a file where a dir belongs,
    tampered bytes); ``code`` ``cache_tampered``."""

    def __init__(self, message: str):
        super().__init__(message, code="cache_tampered")


class Stamps:
    """What each cache file held when this process verified it: path -> (lstat identity, sha256).

    The identity is (device, inode, size, mtime_ns, ctime_ns). Writing a file changes its ctime
    (which no unprivileged process can set back), replacing it changes the inode, so an equal
    identity means equal bytes -- except for a write in the same timestamp tick as the hash, which
    is why a file changed within the last ``_RACY_SECONDS`` keeps only its digest (no identity):
    it is hashed again at its next check. Held in memory only: nothing on the shared disk vouches
    for a file, so a new process hashes (or rebuilds) what it serves once.
    """

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, ...] | None, str]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def identity(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def expected(self, path: Path) -> str | None:
        """The sha256 this process verified ``path`` to hold (whatever it holds now), or None."""
        with self._lock:
            known = self._known.get(str(path))
        return None if known is None or not known[1] else known[1]

    def _proven(self, path: Path) -> str | None:
        with self._lock:
            known = self._known.get(str(path))
        if known is None or known[0] is None or not known[1]:
            return None
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return known[1] if stat.S_ISREG(st.st_mode) and self.identity(st) == known[0] else None

    def hash(self, path: Path) -> tuple[str, int, os.stat_result]:
        """(sha256, size, fstat) of the regular file ``path``, opened without following a symlink."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            before = os.fstat(f.fileno())
            if not stat.S_ISREG(before.st_mode):
                raise CacheError(f"the soppu cache file {path} is not a regular file; remove it")
            h, n = hashlib.sha256(), 0
            while chunk := f.read(_READ):
                h.update(chunk)
                n += len(chunk)
            after = os.fstat(f.fileno())
        if self.identity(before) != self.identity(after):
            raise CacheError(f"the soppu cache file {path} changed while it was being checked; another process is "
                             "writing into the cache")
        return h.hexdigest(), n, after

    def remember(self, path: Path, sha256: str | None, st: os.stat_result | None = None, *,
                 ours: bool = False) -> None:
        """Record that ``path`` holds ``sha256`` (None: not hashed) as of its lstat ``st`` (taken now
        when None). The identity is kept if the file has not changed within the last
        ``_RACY_SECONDS``, or if ``ours``: this process wrote it (mode 0644, in its 0700 staging
        dir) and moved it in, so no other user could have rewritten it in place since."""
        try:
            st = st if st is not None else os.lstat(path)
        except OSError:
            return
        keep = stat.S_ISREG(st.st_mode) and (ours or time.time() - st.st_ctime > _RACY_SECONDS)
        if sha256 is None and not keep:
            self.forget(path)
            return
        ident = self.identity(st) if keep else None
        with self._lock:
            if len(self._known) >= 1 << 16:
                self._known.clear()
            if ours and ident is not None:
                # A hard link this process made changed the inode's ctime: every path of that inode
                # it had proven holds the same bytes, so it takes the new identity too.
                for other, (old, digest) in list(self._known.items()):
                    if old is not None and old[:2] == ident[:2] and digest == (sha256 or digest):
                        self._known[other] = (ident, digest)
            self._known[str(path)] = (ident, sha256 or "")

    def proven(self, path: Path) -> bool:
        """Whether ``path`` is provably what this process stamped: its identity unchanged, else
        (a digest known) its bytes hashed again and equal."""
        with self._lock:
            known = self._known.get(str(path))
        if known is None:
            return False
        ident, sha256 = known
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if ident is not None and stat.S_ISREG(st.st_mode) and self.identity(st) == ident:
            return True
        return bool(sha256) and self.check(path, sha256)

    def forget(self, path: Path) -> None:
        with self._lock:
            self._known.pop(str(path), None)

    def check(self, path: Path, sha256: str, size: int | None = None) -> bool:
        """Whether ``path`` holds exactly the bytes with ``sha256`` (and ``size``): by its stamp (one
        ``lstat``), else hashed (and then stamped)."""
        proven = self._proven(path)
        if proven is not None:
            return hmac.compare_digest(proven, sha256)
        try:
            digest, n, st = self.hash(path)
        except OSError:
            return False
        if (size is None or n == size) and hmac.compare_digest(digest, sha256):
            self.remember(path, sha256, st)
            return True
        return False


class Cache:
    """Paths, locks and the blob store under one cache root, for one serving form."""

    def __init__(self, root: str | os.PathLike[str], form: str = "peft", *, stamps: Stamps | None = None):
        if form not in FORMS:
            raise InputError(f"serving form {form!r} is unknown; use one of {', '.join(FORMS)}")
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise InputError(f"the soppu cache {root} (SOPPU_CACHE_DIR) is not a directory; point SOPPU_CACHE_DIR at "
                             "a directory (created if absent) or remove that file")
        self.root = root
        self.form = form
        self.stamps = stamps if stamps is not None else Stamps()
        # Owner names never start with ".", so the compressed tree cannot collide with an owner.
        self.tree = self.root if self.form == "peft" else self.root / ".compressed"

    @property
    def weight_names(self) -> tuple[str, ...]:
        return FORMS[self.form]

    @property
    def file_names(self) -> tuple[str, ...]:
        """Every file a complete version dir of this form holds (and nothing else)."""
        return FORM_FILES[self.form]

    # -- no symlink under the root ----------------------------------------------------------------
    def _parts(self, path: Path) -> tuple[str, ...]:
        try:
            return Path(path).relative_to(self.root).parts
        except ValueError:
            raise InputError(f"{path} is not under the soppu cache {self.root}") from None

    def real_dir(self, path: Path, *, create: bool = True) -> bool:
        """Check (and with ``create`` make) every dir from the root down to ``path``: each must be a
        real directory, never a symlink or a file (CacheError naming it). False when one is
        absent and ``create`` is off."""
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"the soppu cache {self.root} (SOPPU_CACHE_DIR) is not a directory; point "
                             "SOPPU_CACHE_DIR at a directory (created if absent) or remove that file")
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            return False
        current = self.root
        for part in self._parts(path):
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                if not create:
                    return False
                try:
                    os.mkdir(current)
                except FileExistsError:
                    pass
                st = os.lstat(current)
            if not stat.S_ISDIR(st.st_mode):
                kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise CacheError(f"the soppu cache path {current} is {kind}; the cache follows no symlinks under its "
                                 f"root {self.root} (another user of the cache may have planted it): remove it")
        return True

    def regular_file(self, path: Path) -> bool:
        """Whether ``path`` is a regular file (not a symlink) under real dirs (CacheError if a dir
        on the way is a symlink)."""
        if not self.real_dir(path.parent, create=False):
            return False
        try:
            return stat.S_ISREG(os.lstat(path).st_mode)
        except FileNotFoundError:
            return False

    def read_text(self, path: Path) -> str:
        """The text of the regular file ``path`` (never through a symlink; OSError if absent)."""
        if not self.real_dir(path.parent, create=False):
            raise FileNotFoundError(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CacheError(f"the soppu cache file {path} is not a regular file; remove it")
            return f.read(16 << 20).decode("utf-8")

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
        """Whether ``version_dir`` is a real dir (no symlink on the way) holding the form's files."""
        if not self.real_dir(version_dir.parent, create=False):
            return False
        try:
            if not stat.S_ISDIR(os.lstat(version_dir).st_mode):
                raise CacheError(f"the soppu cache path {version_dir} is not a directory (a symlink?); the cache "
                                 f"follows no symlinks under its root {self.root}: remove it")
        except FileNotFoundError:
            return False
        return all(self.regular_file(version_dir / f) for f in (MARKER, *self.weight_names))

    def latest_version(self, owner: str, name: str) -> int | None:
        """Version the ``latest`` link names (``v<digits>``, read, never followed), or None."""
        try:
            target = os.readlink(self.latest_link(owner, name))
        except OSError:
            return None
        if target.startswith("v") and target[1:].isascii() and target[1:].isdigit():
            return int(target[1:])
        return None

    # -- locks and staging --------------------------------------------------------------------
    def _lock(self, key: str, timeout: float) -> FileLock:
        locks = self.root / ".locks"
        self.real_dir(locks)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
        path = locks / f"{safe}.lock"
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise CacheError(f"the soppu cache lock {path} is not a regular file (a symlink?); the cache follows "
                                 f"no symlinks under its root {self.root}: remove it")
        except FileNotFoundError:
            pass
        return FileLock(str(path), timeout=timeout)

    def version_lock(self, owner: str, name: str, version: int, *, timeout: float = -1) -> FileLock:
        """The lock (a context manager) under which ``v<version>`` of this form is built or removed;
        ``timeout`` seconds (-1: wait forever, 0: don't wait), then ``filelock.Timeout``."""
        return self._lock(f"adapter-{self.form}-{owner}--{name}--v{version}", timeout)

    def seen_lock(self, owner: str, name: str, *, timeout: float = -1) -> FileLock:
        """The lock under which the high-water marks of ``owner/name`` are raised (as :meth:`version_lock`)."""
        return self._lock(f"seen-{owner}--{name}", timeout)

    def blob_lock(self, sha256: str, *, timeout: float = -1) -> FileLock:
        """The lock under which blob ``sha256`` is checked, stored or removed (as :meth:`version_lock`)."""
        return self._lock(f"blob-{sha256}", timeout)

    @contextmanager
    def staging(self, label: str) -> Iterator[Path]:
        """A fresh dir (mode 0700) under ``.tmp`` that is always removed afterwards (rename what you keep)."""
        tmp_root = self.root / ".tmp"
        self.real_dir(tmp_root)
        path = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=tmp_root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # -- rollback protection, per trust root ----------------------------------------------------
    def trust_dir(self, trust: str) -> Path:
        """The dir of one trust root's marks and keys (``trust``: a :func:`trust_id`)."""
        return self.root / TRUST / trust

    def seen_path(self, trust: str, owner: str, name: str) -> Path:
        """The high-water mark file of ``owner/name`` under trust root ``trust`` (every serving form)."""
        return self.trust_dir(trust) / "seen" / owner / name

    def highest_seen(self, trust: str, owner: str, name: str) -> int | None:
        """The highest version of ``owner/name`` served under ``trust`` on this host, or None (none,
        or unreadable). A symlink in its place is a CacheError."""
        try:
            version = json.loads(self.read_text(self.seen_path(trust, owner, name)))["version"]
        except CacheError:
            raise
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return version if type(version) is int else None

    def note_seen(self, trust: str, owner: str, name: str, version: int, statement_sha256: str) -> None:
        """Raise the high-water mark of ``owner/name`` under ``trust`` to ``version`` (never lowers it; atomic)."""
        current = self.highest_seen(trust, owner, name)
        if current is not None and current >= version:
            return
        path = self.seen_path(trust, owner, name)
        self.real_dir(path.parent)
        with self.seen_lock(owner, name):
            current = self.highest_seen(trust, owner, name)  # another process may have raised it meanwhile
            if current is not None and current >= version:
                return
            doc = {"owner": owner, "name": name, "version": version, "statement_sha256": statement_sha256}
            atomic_write(path, (json.dumps(doc, sort_keys=True) + "\n").encode())

    # -- blobs --------------------------------------------------------------------------------
    def cached_blob(self, sha256: str, size: int) -> Path | None:
        """The cached blob if present and still intact (stamped this process, else re-hashed: the
        disk is not trusted); a tampered copy is removed."""
        path = self.blob_path(sha256)
        if not self.regular_file(path):
            return None
        if self.stamps.check(path, sha256, size):
            return path
        self.stamps.forget(path)
        path.unlink(missing_ok=True)  # corrupted on disk: drop it, it will be fetched again
        return None

    def store_blob(self, verified_file: Path, sha256: str) -> Path:
        """Move an already verified file into the blob store (atomic; keeps an existing copy)."""
        dest = self.blob_path(sha256)
        self.real_dir(dest.parent)
        # Not fsynced: a blob cut short by a crash fails its hash, which every process checks once.
        os.replace(verified_file, dest)  # replaces a planted symlink itself, never its target
        self.stamps.remember(dest, sha256, ours=True)  # verified in this process's staging dir, moved in
        return dest

    def set_latest(self, owner: str, name: str, version: int) -> None:
        """Point ``latest`` at ``v<version>`` unless it already points at a newer one (atomic)."""
        current = self.latest_version(owner, name)
        if current is not None and current >= version:
            return
        link = self.latest_link(owner, name)
        self.real_dir(link.parent)
        tmp = link.with_name(f".{LATEST}.{os.getpid()}.{os.urandom(4).hex()}")
        os.symlink(f"v{version}", tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)


def trust_id(trusted_keys: Path | None, registry_url: str | None) -> str:
    """The name of a trust root: ``pinned-<hash of the pinned keys dir>`` or ``registry-<hash of the URL>``."""
    if trusted_keys is not None:
        what, text = "pinned", os.path.realpath(trusted_keys)
    else:
        what, text = "registry", (registry_url or "")
    return f"{what}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
