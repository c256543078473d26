"""Tokens, scopes and the per-token rate limit.

A token reads ``soppu_<id>_<secret>``: ``id`` (16 hex) finds the row, the secret is 32 random
bytes (base64url). Only sha256(token) is stored; it is compared with ``hmac.compare_digest``.

Scopes (a token holds one or more):

    owner-write    upload blobs, publish versions of its owner; also reads that owner's adapters
    owner-read     read that owner's adapters and the blobs they reference
    serving-read   read every adapter and blob (LoRAX deployments); not bound to an owner

Blob reads: a blob is readable by a token that can read at least one published version listing
it (serving-read: any blob). HEAD is allowed to any valid token (the client skips what exists).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import threading
import time
from dataclasses import dataclass

from soppu_registry.errors import ApiError, RateLimited
from soppu_registry.storage import Storage

OWNER_WRITE = "owner-write"
OWNER_READ = "owner-read"
SERVING_READ = "serving-read"
SCOPES = (OWNER_WRITE, OWNER_READ, SERVING_READ)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """(token_id, token string). The string is shown once and never stored."""
    token_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return token_id, f"soppu_{token_id}_{secret}"


def issue_token(store: Storage, owner: str | None, scopes: list[str], label: str | None = None) -> tuple[str, str]:
    """Create a token; returns (token_id, token). Owner scopes need an owner, serving-read none."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ApiError(400, "bad_scope", f"`scope` must be one or more of {list(SCOPES)}, got {scopes!r}")
    owner_scoped = [s for s in scopes if s != SERVING_READ]
    if owner_scoped and owner is None:
        raise ApiError(400, "bad_scope", f"scopes {owner_scoped} need an owner (--owner)")
    if not owner_scoped and owner is not None:
        raise ApiError(400, "bad_scope", "a serving-read token is not bound to an owner; drop --owner")
    token_id, token = new_token()
    store.add_token(token_id, hash_token(token), owner, sorted(set(scopes)), label)
    return token_id, token


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, owner (None for serving tokens) and scopes."""

    token_id: str
    owner: str | None
    scopes: frozenset[str]

    def can_write(self, owner: str) -> bool:
        return OWNER_WRITE in self.scopes and self.owner == owner

    def can_read(self, owner: str) -> bool:
        if SERVING_READ in self.scopes:
            return True
        return self.owner == owner and bool({OWNER_READ, OWNER_WRITE} & self.scopes)

    @property
    def can_read_any_blob(self) -> bool:
        return SERVING_READ in self.scopes


def authenticate(store: Storage, authorization: str | None) -> Principal:
    """Bearer token -> Principal; ApiError 401 when missing, malformed, unknown or revoked."""
    if not authorization:
        raise ApiError(401, "unauthorized", "missing token: send `Authorization: Bearer <token>`")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "malformed Authorization header: expected `Bearer <token>`")
    parts = token.split("_", 2)
    row = store.token(parts[1]) if len(parts) == 3 and parts[0] == "soppu" else None
    # Hash and compare even for unknown ids, so timing says nothing about which part was wrong.
    expected = row["token_hash"] if row is not None else "0" * 64
    ok = hmac.compare_digest(hash_token(token), expected)
    if row is None or not ok:
        raise ApiError(401, "unauthorized", "invalid token")
    if row["revoked_at"] is not None:
        raise ApiError(401, "unauthorized", f"token {row['token_id']} was revoked")
    return Principal(row["token_id"], row["owner"], frozenset(row["scopes"].split(",")))


class RateLimiter:
    """Token bucket per key: ``rate`` requests/s refill, ``burst`` capacity; rate <= 0 disables."""

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Take one request; returns 0 when allowed, else the seconds to wait before retrying."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def check(self, key: str) -> None:
        wait = self.acquire(key)
        if wait > 0:
            raise RateLimited(math.ceil(wait))

