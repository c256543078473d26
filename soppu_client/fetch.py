"""Fetch a published basis from a registry, verified, for client-side projection (``soppu project``).

``fetch_published_basis(client, "owner/name[@version]", dest)`` writes ``dest/manifest.json`` and
``dest/basis.safetensors`` of that published version, after:

1. the version record (``GET /v1/adapters/...``) and the owner's key: ``public_key`` when given
   (pinned), else the registered key the signature names (its id recomputed from the key bytes);
2. ``verify_statement``: Ed25519 signature, expiry, owner, adapter name and version;
3. both files streamed with their signed size and sha256, and the manifest checked to list the
   same basis digest and base model as the signed statement.

Only the basis and the manifest come down: other adapters' cores never leave the registry. The
result opens with ``Bundle.open(dest, verify_digests=False)`` (the cores it lists are absent).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from soppu_client.format import signing
from soppu_client.format.bundle import BASIS, MANIFEST, Bundle
from soppu_client.format.errors import (
    BundleError,
    InputError,
    RegistryError,
    SignatureError,
    VerificationError,
)
from soppu_client.format.refs import AdapterRef
from soppu_client.registry_client import BlobDigestError, RegistryClient

__all__ = ["fetch_published_basis"]

def fetch_published_basis(client: RegistryClient, ref: AdapterRef | str, dest: str | Path, *,
                          public_key: Ed25519PublicKey | None = None) -> tuple[Bundle, dict[str, Any]]:
    """Download and verify the manifest and basis of ``ref`` into the new dir ``dest`` (atomic).

    Returns (the basis-only bundle, the verified signed statement).
    """
    if isinstance(ref, str):
        ref = AdapterRef.parse(ref, label="published adapter")
    dest = Path(dest)
    if dest.exists():
        raise InputError(f"{dest} already exists; choose another directory")
    record = client.get_version(ref.owner, ref.name, ref.version)
    try:
        version, sig = int(record["version"]), record["signature"]
        if not isinstance(sig, dict):
            raise TypeError("signature")
    except (KeyError, TypeError, ValueError) as e:
        raise RegistryError(f"{ref}: the registry answered a malformed version record ({e})", code="bad_record") from None
    label = f"published adapter {ref.owner}/{ref.name}@{version}"
    pub = public_key or client.registered_key(ref.owner, sig.get("key_id"))
    try:
        statement = signing.verify_statement(sig, pub, owner=ref.owner, adapter=ref.name, version=version)
    except SignatureError as e:
        raise SignatureError(f"{label}: bad signature: {e}") from None
    by_path = {f["path"]: f for f in statement["files"]}
    absent = [rel for rel in (MANIFEST, BASIS) if rel not in by_path]
    if absent:
        raise VerificationError(f"{label}: the signed statement does not cover {', '.join(absent)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for rel in (MANIFEST, BASIS):
            entry = by_path[rel]
            try:
                client.download_blob(entry["sha256"], int(entry["size"]), tmp / rel)
            except BlobDigestError as e:
                raise VerificationError(f"{label}: digest mismatch: the registry served {rel} as {e.served}, the "
                                        f"signed statement says {entry['size']} bytes with sha256 {entry['sha256']}") from None
        try:
            manifest = json.loads((tmp / MANIFEST).read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"{label}: manifest.json is not valid JSON ({e})") from None
        signing.check_manifest(manifest, statement, label, [BASIS])
        opened = Bundle.open(tmp, verify_digests=False)  # the manifest's own checks
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Bundle(path=dest, manifest=opened.manifest), statement
