"""Which key an owner's signature must verify with on this serving host.

* Pinned (``SOPPU_TRUSTED_KEYS``): one of the owner's pinned keys, and nothing else
  (:func:`soppu_client.fetch.owner_key`); the registry's keys play no part.
* Unpinned: trust on first use (:mod:`soppu_client.known_keys`). The key must be listed by the
  registry (active or rotated; id recomputed from the bytes), and must be a key this host already
  accepted for the owner under this trust root, or one the registry's rotation proofs lead to
  from such a key. The first key seen for an owner is accepted. Keys are recorded in
  ``<cache>/.trust/<root>/keys/<owner>.json`` only once a version they signed has been served
  (:meth:`KeyTrust.accept`), never for a refused one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from soppu_client.fetch import VersionRecord, owner_key
from soppu_client.format.errors import RegistryError, SignatureError, SoppuError
from soppu_client.known_keys import KnownKeys, choose_key
from soppu_client.registry_client import RegistryClient

from soppu_serving.cache import Cache

__all__ = ["KeyTrust"]

Explain = Callable[[RegistryError, str], SoppuError]


class KeyTrust:
    """The owner-key rule of one session (pinned, or trust on first use under trust root ``trust``)."""

    def __init__(self, cache: Cache, trust: str, *, pinned: Path | None, subject: str):
        self.cache = cache
        self.pinned = pinned
        self.subject = subject
        self.known = KnownKeys(cache.trust_dir(trust) / "keys", read_text=cache.read_text, make_dir=cache.real_dir)
        self._pending: dict[tuple[str, str], dict[str, str]] = {}  # (owner, key id) -> keys to record on accept
        self._lock = threading.Lock()

    def key_for(self, client: RegistryClient, record: VersionRecord, explain: Explain, listings: Any,
                token_key: str) -> Ed25519PublicKey:
        """The key ``record``'s signature must verify with (SignatureError ``untrusted_key`` /
        ``unknown_key`` naming the fix). ``listings``: a TTL table for the registry's key lists."""
        if self.pinned is not None:
            return owner_key(client, record, trusted_keys=self.pinned, explain=explain)
        owner, key_id = record.ref.owner, record.signature.get("key_id")
        who = f"{self.subject} {record.ref}"
        listing = listings.get((owner, token_key))
        if listing is None:
            try:
                listing = client.get_keys(owner)
            except RegistryError as e:
                raise explain(e, "fetching the owner's keys") from None
            listings.put((owner, token_key), listing)
        try:
            pub, new = choose_key(self.known.load(owner), listing, owner, key_id, store=self.known.path(owner))
        except SignatureError as e:
            raise SignatureError(f"{who}: bad signature: {e}", code=e.code) from None
        if new:
            with self._lock:
                self._pending[(owner, str(key_id))] = new
        return pub

    def accept(self, owner: str, signature: dict[str, Any]) -> None:
        """Record the keys that let a now-served version verify (unpinned only)."""
        if self.pinned is not None:
            return
        with self._lock:
            new = self._pending.pop((owner, str(signature.get("key_id"))), None)
        if new:
            with self.cache.seen_lock(owner, "-keys-"):
                self.known.add(owner, new)
