"""Build one verified adapter version into the cache (the cold path of :meth:`Session.serve`).

Called by :class:`soppu_serving.session.Session` only after the version's signed statement has
verified (owner key, signature, expiry, rollback) and the engine's check passed. Under the
version's lock, and one lock per signed blob:

1. ``fetch_verified`` brings manifest.json, basis and the adapter's core into a staging dir
   (blobs already in the cache's blob store are reused after :class:`~soppu_serving.cache.Stamps`
   proves them intact, not downloaded; a basis shared by many adapters is fetched once);
2. tensors are validated (``Bundle.open``, ``validate_safetensors`` with the shapes the manifest
   implies) and the adapter is written in the cache's serving form: a standard PEFT dir
   (``soppu_client.format.bundle.export_peft``) or a compressed dir
   (``soppu_client.format.compressed_form``);
3. the verified blobs enter the blob store (a compressed dir's cluster basis is stored once and
   hard-linked) and the dir is renamed into ``<root>/<owner>/<name>/v<N>`` (compressed: under
   ``<root>/.compressed``). A dir already there that this process cannot vouch for (another
   process built it, or a neighbour touched it) is compared file by file with the fresh build
   and replaced when it differs (:func:`install`); either way this process then knows the digest
   of every file it hands over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soppu_client.fetch import VerifiedVersion, fetch_verified
from soppu_client.format import signing
from soppu_client.format.bundle import Bundle, export_peft
from soppu_client.format.compressed_form import BASIS_FILE, write_compressed_files
from soppu_client.format.errors import BundleError, InputError, RegistryError, SoppuError, VerificationError
from soppu_client.format.fsutil import file_digest, fsync_dir, fsync_tree, link_or_copy
from soppu_client.format.names import BASIS, MANIFEST, SOURCE_MARKER_FORMAT, core_path
from soppu_client.registry_client import RegistryClient

from soppu_serving.cache import MARKER, Cache, CacheError

__all__ = ["FetchStats", "build", "check_cached", "check_handed"]

log = logging.getLogger("soppu_serving")
Explain = Callable[[RegistryError, str], SoppuError]


@dataclass
class FetchStats:
    """What one :meth:`Session.serve` did (for logs, tests and benchmarks)."""

    materialized: bool = False  # this call built (or rebuilt) the version dir
    warm: bool = False  # served from a dir this process had already proven intact
    blobs_downloaded: list[str] = field(default_factory=list)  # paths fetched over the network
    bytes_downloaded: int = 0
    blobs_reused: list[str] = field(default_factory=list)  # paths served from the blob store
    registry_requests: int = 0  # HTTP requests this call sent to the registry (retries included)
    verifications: int = 0  # Ed25519 signature checks this call ran
    replaced_tampered: bool = False  # a cached dir differed from what was verified and was replaced


def provenance(url: str, verified: VerifiedVersion, files: list[dict[str, Any]]) -> dict[str, Any]:
    record, statement = verified.record, verified.statement
    return {
        "format": SOURCE_MARKER_FORMAT,
        "registry": url,
        "owner": record.ref.owner,
        "name": record.ref.name,
        "version": record.version,
        "key_id": record.signature.get("key_id"),
        "statement_sha256": hashlib.sha256(signing.canonical_json(statement)).hexdigest(),
        "expires_at": statement["expires_at"],
        "base_model": statement["base_model"],
        "files": files,
        "materialized_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def check_cached(cache: Cache, final: Path, verified: VerifiedVersion) -> None:
    """A cached dir is served only if the files it was built from are still the signed ones."""
    try:
        recorded = json.loads(cache.read_text(final / MARKER))["files"]
        used = {(f["path"], f["sha256"], f["size"]) for f in recorded}
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError):
        used = None
    signed = {(f["path"], f["sha256"], f["size"]) for f in verified.statement["files"]}
    if used is None or not used <= signed:
        raise VerificationError(
            f"{verified.label}: the cached copy in {final} was built from files the current signed "
            "statement does not list; remove that directory to fetch it again"
        )


def check_handed(cache: Cache, final: Path) -> bool:
    """Whether every file of the complete dir ``final`` is what this process built or proved it
    to be, and nothing else is there: one ``lstat`` per stamped file, a hash for a file written
    within the racy window. False (rebuild) when this process holds no digest for one of them."""
    try:
        names = set(os.listdir(final))
    except OSError:
        return False
    if names != set(cache.file_names):
        return False
    for name in cache.file_names:
        expected = cache.stamps.expected(final / name)
        if expected is None or not cache.stamps.check(final / name, expected):
            return False
    return True


def build(verified: VerifiedVersion, client: RegistryClient, explain: Explain, cache: Cache, final: Path,
          stats: FetchStats) -> None:
    """Fetch, validate and export one version into staging, store its blobs, install the dir."""
    record, label = verified.record, verified.label
    name = record.ref.name
    core = core_path(name)
    entries = verified.entries([MANIFEST, BASIS, core])
    with cache.staging(f"{record.ref.owner}--{name}--v{record.version}") as stage, ExitStack() as locks:
        # One lock per blob (sorted: no deadlock), held until the blobs are stored: processes
        # fetching adapters that share a basis download it once.
        for digest in sorted({e["sha256"] for e in entries}):
            locks.enter_context(cache.blob_lock(digest))
        fetched = fetch_verified(client, verified, [BASIS, core], stage / "bundle", reuse=cache.cached_blob,
                                 adapter=name, explain=explain)
        stats.blobs_downloaded, stats.blobs_reused = fetched.downloaded, fetched.reused
        stats.bytes_downloaded = fetched.bytes_downloaded
        out = stage / cache.form
        try:
            bundle = Bundle.open(fetched.dir, verify_digests=False)  # digests checked by fetch_verified
            if cache.form == "compressed":
                out.mkdir()
                derived_basis = write_compressed_files(bundle, name, out)["basis"]
            else:
                export_peft(bundle, name, out)
        except (BundleError, InputError, VerificationError) as e:
            raise VerificationError(f"{label}: bundle failed validation: {e}") from None
        (out / MARKER).write_text(json.dumps(provenance(client.base_url, verified, entries), indent=2, sort_keys=True)
                                  + "\n", encoding="utf-8")
        # Everything verified and exported: only now does anything enter the cache.
        for digest, path in fetched.fresh.items():
            cache.store_blob(path, digest)
        if cache.form == "compressed":
            _share_basis(cache, out / BASIS_FILE, derived_basis["sha256"], derived_basis["size"])
        fsync_tree(out)
        install(cache, out, final, stage / "old", label, stats)


def install(cache: Cache, out: Path, final: Path, trash: Path, label: str, stats: FetchStats) -> None:
    """Rename the built dir ``out`` to ``final`` (the caller holds the version lock) and record the
    digest of every file handed over. When ``final`` is already there (built by another process,
    or touched since), its files are compared with ``out``'s (soppu_source.json: its signed file
    list) and the dir is replaced if any differs."""
    digests = {n: file_digest(out / n)[0] for n in cache.file_names}
    cache.real_dir(final.parent)
    if cache.is_complete(final):
        same = set(os.listdir(final)) == set(cache.file_names)
        for n in cache.file_names:
            if not same:
                break
            if n == MARKER:
                try:
                    same = json.loads(cache.read_text(final / n))["files"] == json.loads((out / n).read_text())["files"]
                except (OSError, ValueError, KeyError, TypeError):
                    same = False
            else:
                same = cache.stamps.check(final / n, digests[n])
        if same:
            for n in cache.file_names:
                if n == MARKER:
                    cache.stamps.remember(final / n, cache.stamps.hash(final / n)[0])
                else:
                    cache.stamps.remember(final / n, digests[n])
            return
        log.warning("soppu cache: %s: the cached dir %s differs from what was verified (tampered on disk?); "
                    "replacing it", label, final)
        stats.replaced_tampered = True
        os.replace(final, trash)  # a real dir (is_complete checked): the rename moves it, no symlink followed
    elif os.path.lexists(final):
        os.replace(final, trash) if os.path.isdir(final) and not os.path.islink(final) else os.unlink(final)
    os.replace(out, final)  # the dir appears complete, or not at all
    fsync_dir(final.parent)
    for n in cache.file_names:
        cache.stamps.remember(final / n, digests[n])
    stats.materialized = True


def _share_basis(cache: Cache, written: Path, sha256: str, size: int) -> None:
    """Replace a compressed dir's basis file by a hard link to the one copy in the blob store.

    Adapters of one cluster get byte-identical basis files, so the disk holds each cluster's basis
    once however many adapters use it (the file in the dir is still a plain, complete file)."""
    with cache.blob_lock(sha256):
        stored = cache.cached_blob(sha256, size)
        if stored is None:
            stored = cache.store_blob(written, sha256)
        else:
            written.unlink()
        link_or_copy(stored, written)
