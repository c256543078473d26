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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soppu_client.fetch import VerifiedVersion, fetch_verified
from soppu_client.format import signing
import torch

from soppu_client.format.bundle import Bundle, Manifest, export_peft
from soppu_client.format.compressed_form import BASIS_FILE, write_compressed_files
from soppu_client.format.errors import BundleError, InputError, RegistryError, SoppuError, VerificationError
from soppu_client.format.fsutil import file_digest, link_or_copy
from soppu_client.format.names import BASIS, MANIFEST, SOURCE_MARKER_FORMAT, core_path
from soppu_client.registry_client import RegistryClient

from soppu_serving.cache import MARKER, Cache, CacheError

__all__ = ["FetchStats", "Memo", "build", "check_cached", "check_handed", "one_torch_thread"]

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
    verifications: int = 0  # signed statements this call verified (one per request)
    signature_checks: int = 0  # of which by an Ed25519 check (else: this process's verdict on the same bytes)
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
    to be, and nothing else is there: one ``lstat`` per file (:meth:`Stamps.proven`; a hash only
    where the identity changed and a digest is known). False (rebuild) otherwise."""
    try:
        names = set(os.listdir(final))
    except OSError:
        return False
    if names != set(cache.file_names):
        return False
    return all(cache.stamps.proven(final / name) for name in cache.file_names)


class Memo:
    """What one session keeps in memory across builds, keyed by verified content digests (never by
    anything the disk or the registry could change under the same key):

    * the served compressed basis of each (bundle basis sha256, cluster): ``{"sha256", "size"}``,
      so later adapters of that cluster neither read nor write the basis again (it is in the blob
      store, proven by the cache's stamps);
    * the loaded, validated basis tensors of the last few bundle bases (PEFT export);
    * the typed manifest of each manifest.json digest (the bytes are still fetched, hashed and
      checked against the signed statement on every build).
    """

    def __init__(self, max_bases: int = 2):
        self.derived: dict[tuple[str, int], dict[str, Any]] = {}
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self.checked: dict[tuple[str, str], Manifest] = {}  # fetch_verified's checked manifests
        self._bases: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._max = max_bases
        self.lock = threading.Lock()

    def basis(self, sha256: str) -> dict[str, Any] | None:
        with self.lock:
            hit = self._bases.get(sha256)
            if hit is not None:
                self._bases.move_to_end(sha256)
            return hit

    def manifest(self, sha256: str) -> Manifest | None:
        with self.lock:
            return self._manifests.get(sha256)

    def keep_manifest(self, sha256: str, manifest: Manifest | None) -> None:
        if manifest is None:
            return
        with self.lock:
            if len(self.checked) > 256:
                self.checked.clear()
            self._manifests[sha256] = manifest
            while len(self._manifests) > 64:
                self._manifests.popitem(last=False)

    def keep_basis(self, sha256: str, tensors: dict[str, Any] | None) -> None:
        if tensors is None:
            return
        with self.lock:
            self._bases[sha256] = tensors
            self._bases.move_to_end(sha256)
            while len(self._bases) > self._max:
                self._bases.popitem(last=False)


_threads_lock = threading.Lock()


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the export's tensor work on one torch thread: its products are tiny ([d, k] x [k, k])
    and latency-bound, and OpenMP threads beside a busy engine make each one 10-100x slower
    (4096x16 @ 16x16: 0.1 ms on one thread, 1-12 ms on two on a loaded 2-core host). The setting is
    process-wide, so it is restored right after (engines compute in another process or on the GPU)."""
    with _threads_lock:
        before = torch.get_num_threads()
        if before > 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if before > 1:
                torch.set_num_threads(before)


def check_served_rank(manifest: Manifest, max_rank: int, label: str) -> None:
    """Refuse a bundle any of whose modules has k > ``max_rank`` (``SOPPU_MAX_SERVED_RANK``).

    What a host materializes per adapter is sum_m k_m (d_out + d_in): bounded by the core on the
    wire only through k, since the basis is shared by design. Capping k bounds it relative to the
    base model's own dimensions. Runs on the verified manifest, before any tensor is fetched."""
    over = sorted((m, manifest.module_rank(m)) for m in manifest.modules if manifest.module_rank(m) > max_rank)
    if over:
        more = f" and {len(over) - 3} more" if len(over) > 3 else ""
        listed = ", ".join(f"{m} (k={k})" for m, k in over[:3]) + more
        raise VerificationError(
            f"{label}: refused: module {listed} exceeds this host's rank limit SOPPU_MAX_SERVED_RANK={max_rank} "
            f"(one adapter would become {manifest.served_params():,} parameters); compress with --rank {max_rank} "
            "or less, or raise SOPPU_MAX_SERVED_RANK on this host")


def build(verified: VerifiedVersion, client: RegistryClient, explain: Explain, cache: Cache, final: Path,
          stats: FetchStats, memo: Memo | None = None, max_rank: int | None = None) -> None:
    """Fetch, validate and export one version into staging, store its blobs, install the dir.
    ``max_rank``: :func:`check_served_rank` on the manifest before any tensor is fetched."""
    memo = memo or Memo()
    record, label = verified.record, verified.label
    name = record.ref.name
    core = core_path(name)
    entries = verified.entries([MANIFEST, BASIS, core])
    basis_sha = entries[1]["sha256"]
    with cache.staging(f"{record.ref.owner}--{name}--v{record.version}") as stage, ExitStack() as locks:
        # One lock per blob (sorted: no deadlock), held until the blobs are stored: processes
        # fetching adapters that share a basis download it once.
        for digest in sorted({e["sha256"] for e in entries}):
            locks.enter_context(cache.blob_lock(digest))
        out = stage / cache.form
        try:
            with one_torch_thread():
                fetched, derived, known = _export(verified, client, explain, cache, stage, out, memo, basis_sha,
                                                  max_rank)
        except (BundleError, InputError, VerificationError) as e:
            if isinstance(e, CacheError) or str(e).startswith(label):
                raise
            raise VerificationError(f"{label}: bundle failed validation: {e}") from None
        stats.blobs_downloaded, stats.blobs_reused = fetched.downloaded, fetched.reused
        stats.bytes_downloaded = fetched.bytes_downloaded
        (out / MARKER).write_text(json.dumps(provenance(client.base_url, verified, entries), indent=2, sort_keys=True)
                                  + "\n", encoding="utf-8")
        # Everything verified and exported: only now does anything enter the cache.
        for digest, path in fetched.fresh.items():
            cache.store_blob(path, digest)
        if derived is not None:
            _share_basis(cache, out / BASIS_FILE, derived["sha256"], derived["size"])
        # No fsync: a crash may leave a partial dir or blob, but no process trusts the disk it did
        # not prove (a new process rebuilds and compares, blobs are re-hashed once per process).
        install(cache, out, final, stage / "old", label, stats, known)


def _export(verified: VerifiedVersion, client: RegistryClient, explain: Explain, cache: Cache, stage: Path,
            out: Path, memo: Memo, basis_sha: str,
            max_rank: int | None = None) -> tuple[Any, dict[str, Any] | None, dict[str, str]]:
    """Fetch what the form needs and write it into ``out``; (what fetch_verified did, the served
    basis entry to share for a compressed dir written with its basis, else None; digests of the
    files of ``out`` already known)."""
    name = verified.record.ref.name
    core = core_path(name)
    manifest_sha = verified.entries([MANIFEST])[0]["sha256"]
    manifest = memo.manifest(manifest_sha)
    known_basis, derived = None, None
    if cache.form == "peft":
        known_basis = memo.basis(basis_sha)
    elif manifest is not None and name in manifest.adapters:
        with memo.lock:
            derived = memo.derived.get((basis_sha, manifest.adapters[name].cluster))
        if derived is not None and cache.cached_blob(derived["sha256"], derived["size"]) is None:
            derived = None
    files = [core] if known_basis is not None or derived is not None else [BASIS, core]
    fetched = fetch_verified(client, verified, files, stage / "bundle", reuse=cache.cached_blob, adapter=name,
                             explain=explain, checked=memo.checked,
                             accept=None if max_rank is None else
                             (lambda m: check_served_rank(m, max_rank, verified.label)))
    for rel in fetched.reused:  # a hard link changed the blob's ctime: stamp it again (proven just before)
        sha = verified.entries([rel])[0]["sha256"]
        cache.stamps.remember(cache.blob_path(sha), sha, ours=True)
    manifest = fetched.typed
    memo.keep_manifest(manifest_sha, manifest)
    if BASIS not in files:
        fetched.reused.append(BASIS)  # held by this session: the basis of that digest, verified before
    bundle = Bundle(path=fetched.dir, manifest=manifest)  # type: ignore[arg-type]  # manifest.json was fetched
    if cache.form == "peft":
        if known_basis is not None:
            bundle._basis = known_basis  # validated when first loaded from the verified blob of that digest
        export_peft(bundle, name, out)
        memo.keep_basis(basis_sha, bundle._basis)
        return fetched, None, {}
    out.mkdir()
    if derived is not None:
        write_compressed_files(bundle, name, out, basis=derived)
        blob = cache.blob_path(derived["sha256"])
        link_or_copy(blob, out / BASIS_FILE)
        cache.stamps.remember(blob, derived["sha256"], ours=True)  # proven just before; the link changed its ctime
        return fetched, None, {BASIS_FILE: derived["sha256"]}
    written = write_compressed_files(bundle, name, out)["basis"]
    entry = {"sha256": written["sha256"], "size": written["size"]}
    with memo.lock:
        memo.derived[(basis_sha, bundle.cluster_of(name))] = entry
    return fetched, entry, {BASIS_FILE: entry["sha256"]}


def install(cache: Cache, out: Path, final: Path, trash: Path, label: str, stats: FetchStats,
            known: dict[str, str] | None = None) -> None:
    """Rename the built dir ``out`` to ``final`` (the caller holds the version lock) and stamp every
    file handed over (``known``: digests already known, e.g. a shared basis). When ``final`` is
    already there (built by another process, or touched since), its files are compared with
    ``out``'s (soppu_source.json: its signed file list) and the dir is replaced if any differs."""
    known = known or {}
    cache.real_dir(final.parent)
    if cache.is_complete(final):
        digests = {n: known.get(n) or file_digest(out / n)[0] for n in cache.file_names}
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
            cache.stamps.remember(final / MARKER, cache.stamps.hash(final / MARKER)[0])
            return
        log.warning("soppu cache: %s: the cached dir %s differs from what was verified (tampered on disk?); "
                    "replacing it", label, final)
        stats.replaced_tampered = True
        os.replace(final, trash)  # a real dir (is_complete checked): the rename moves it, no symlink followed
    elif os.path.lexists(final):
        os.replace(final, trash) if os.path.isdir(final) and not os.path.islink(final) else os.unlink(final)
    os.replace(out, final)  # the dir appears complete, or not at all (not fsynced: see build)
    for n in cache.file_names:  # written here, moved in: an unchanged identity proves them
        cache.stamps.remember(final / n, known.get(n), ours=True)
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
