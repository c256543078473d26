"""Trust on first use of owner keys, with rotation proofs (for hosts that pin no keys).

Without pinned keys a host must take an owner's key from the registry. To stop a registry from
silently substituting a key later, a host remembers the keys it accepted per owner (a
:class:`KnownKeys` store) and then accepts a key the registry names only if it is already known,
or if the registry's rotation proofs (``rotation_proof`` of each key in ``GET /v1/keys/<owner>``,
signed by the key it replaced) lead to it from a known key, each proof verified with the key
before it. The first key ever seen for an owner is accepted (that is the "first use").

Used by the serving side (store under ``<cache>/.trust/<root>/keys``) and by ``soppu project
--onto-published`` (store under ``~/.config/soppu/known_keys/<registry>``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from soppu_client.format import signing
from soppu_client.format.errors import SignatureError
from soppu_client.format.fsutil import atomic_write
from soppu_client.registry_client import find_registered_key, verify_rotation_proof

__all__ = ["KnownKeys", "choose_key", "default_known_keys_dir"]

_MAX_CHAIN = 64


def _raw_b64(pub: Ed25519PublicKey) -> str:
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _load(b64: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))


def default_known_keys_dir(registry_url: str) -> Path:
    """``$SOPPU_CONFIG_DIR`` or ``$XDG_CONFIG_HOME/soppu`` or ``~/.config/soppu``, then
    ``known_keys/<sha256(registry URL)[:16]>``."""
    base = os.environ.get("SOPPU_CONFIG_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "soppu")
    return Path(base) / "known_keys" / hashlib.sha256(registry_url.rstrip("/").encode()).hexdigest()[:16]


class KnownKeys:
    """The keys a host accepted per owner: ``<dir>/<owner>.json`` = ``{"owner", "keys": {key_id: base64}}``.

    ``read_text`` / ``make_dir`` let a caller refuse symlinks (the serving cache does)."""

    def __init__(self, directory: Path, *, read_text: Callable[[Path], str] | None = None,
                 make_dir: Callable[[Path], Any] | None = None):
        self.dir = Path(directory)
        self._read = read_text or (lambda p: p.read_text(encoding="utf-8"))
        self._mkdir = make_dir or (lambda p: p.mkdir(parents=True, exist_ok=True))

    def path(self, owner: str) -> Path:
        return self.dir / f"{owner}.json"

    def load(self, owner: str) -> dict[str, str] | None:
        """key id -> base64 raw key of the keys accepted for ``owner``; None before first use.
        An unreadable or malformed file is a SignatureError (never silently a first use)."""
        path = self.path(owner)
        try:
            text = self._read(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SignatureError(f"cannot read the known keys of owner {owner!r} in {path}: {e}",
                                 code="untrusted_key") from None
        try:
            doc = json.loads(text)
            keys = {str(k): str(v) for k, v in doc["keys"].items()}
            for k, v in keys.items():
                if signing.public_key_id(_load(v)) != k:
                    raise ValueError(f"key {k} does not match its bytes")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SignatureError(f"the known keys of owner {owner!r} in {path} are malformed ({e}); delete that file "
                                 "to trust the registry's key again on the next use", code="untrusted_key") from None
        return keys or None

    def add(self, owner: str, keys: dict[str, str]) -> None:
        """Add ``keys`` (id -> base64) to ``owner``'s known keys (atomic; keeps every key already there)."""
        current = self.load(owner) or {}
        if all(k in current for k in keys):
            return
        self._mkdir(self.dir)
        merged = {**current, **keys}
        atomic_write(self.path(owner), (json.dumps({"owner": owner, "keys": merged}, indent=1, sort_keys=True)
                                        + "\n").encode(), mode=0o644)


def choose_key(known: dict[str, str] | None, listing: list[dict[str, Any]], owner: str, key_id: Any,
               *, store: Path | None = None) -> tuple[Ed25519PublicKey, dict[str, str]]:
    """The key a signature naming ``key_id`` must verify with, under trust on first use; returns
    (that key, the keys to add to the known set once the version it signed is accepted).

    ``known``: the owner's known keys (None: first use, the registry's key is taken); ``listing``:
    the registry's keys of the owner. A key not known must be reached from a known one through the
    listing's rotation proofs; else SignatureError ``untrusted_key`` naming the keys and the fix."""
    pub = find_registered_key(listing, owner, key_id)
    if not known:
        return pub, {str(key_id): _raw_b64(pub)}
    if key_id in known:
        return _load(known[key_id]), {}
    proofs = {k.get("key_id"): k.get("rotation_proof") for k in listing if isinstance(k, dict)}
    chain: list[tuple[str, dict[str, Any]]] = []
    current, problem = str(key_id), None
    while current not in known:
        proof = proofs.get(current)
        if not isinstance(proof, dict) or not isinstance(proof.get("key_id"), str):
            problem = f"the registry shows no rotation proof for key {current}"
            break
        if len(chain) >= _MAX_CHAIN or any(current == c for c, _ in chain):
            problem = "the registry's rotation proofs form a loop or a chain too long"
            break
        chain.append((current, proof))
        current = proof["key_id"]
    if problem is None:
        signer = _load(known[current])
        try:
            for new_id, proof in reversed(chain):
                if verify_rotation_proof(proof, owner, signer) != new_id:
                    raise SignatureError(f"the rotation proof of key {new_id} names another key", code="bad_proof")
                signer = find_registered_key(listing, owner, new_id)
        except SignatureError as e:
            problem = f"a rotation proof on the way is not valid ({e})"
    if problem is not None:
        where = f"; if the owner did rotate keys, pin the new key (SOPPU_TRUSTED_KEYS) or, once checked, delete " \
                f"{store} to trust the registry's key again" if store is not None else ""
        raise SignatureError(f"it names key {key_id!r}, but this host trusts owner {owner!r} with key(s) "
                             f"{', '.join(sorted(known))} (trust on first use) and {problem} leading there from "
                             f"one of them; refusing a key the registry may have substituted{where}",
                             code="untrusted_key")
    return pub, {cid: _raw_b64(find_registered_key(listing, owner, cid)) for cid, _ in chain}
