"""Tokens, scopes and the per-token rate limit.

A token reads ``soppu_<id>_<secret>``: ``id`` (16 hex) finds the row, the secret is 32 random
bytes (base64url). Only sha256(token) is stored; it is compared with ``hmac.compare_digest``.

Scopes (a token holds one or more):

    owner-write    upload blobs, publish versions of its owner; also reads that owner's adapters
    owner-read     read that owner's adapters and the blobs they reference
    serving-read   read every adapter and blob (LoRAX deployments); not bound to an owner

Blob reads (HEAD and GET): a blob is readable by any token of an owner of the blob (it uploaded
the bytes or proved possession by re-sending them) and by a token that can read a published
version listing it (owner-read/-write of that version's owner, serving-read). Everyone else gets
the 404 an absent blob gets, so a digest alone tells nothing.

Failed authentications are limited per client address (``FailureLimiter``), checked before the
token is looked at: a throttled address gets 429 for right and wrong tokens alike, so guessing
stays slow; successful requests spend nothing.
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
    if owner_scoped and SERVING_READ in scopes:  # its HEADs would see blobs its owner cannot publish
        raise ApiError(400, "bad_scope", f"serving-read cannot be combined with {owner_scoped}; issue two tokens")
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

    def can_read_blob(self, owners: set[str], listed_by: set[str]) -> bool:
        """May read a blob owned by ``owners`` and listed by published versions of ``listed_by``."""
        if self.owner is not None and self.owner in owners:
            return True
        return any(self.can_read(o) for o in listed_by)


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


class AuthThrottled(RateLimited):
    """429 for an address past its failed-authentication budget."""

    def __init__(self, retry_after: int, address: str):
        super().__init__(retry_after)
        self.message = (f"too many failed authentications from {address}; retry after {self.retry_after} s "
                        "(--max-auth-failures)")
        self.args = (self.message,)


class FailureLimiter:
    """Failed authentications per client address: a bucket of ``per_minute`` refilled at
    ``per_minute``/60 per second; ``per_minute`` <= 0 disables.

    ``check`` runs before authenticating and raises ``AuthThrottled`` while the address's bucket is
    empty; ``failed`` spends one. Full buckets are forgotten, so memory follows the addresses that
    failed recently (at most ``MAX_ADDRESSES``; past that the table is cleared).
    """

    MAX_ADDRESSES = 100_000

    def __init__(self, per_minute: int):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _level(self, address: str, now: float) -> float:
        tokens, last = self._buckets.get(address, (self.capacity, now))
        return min(self.capacity, tokens + (now - last) * self.rate)

    def check(self, address: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens = self._level(address, now)
        if tokens < 1.0:
            raise AuthThrottled(math.ceil((1.0 - tokens) / self.rate), address)

    def failed(self, address: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) >= self.MAX_ADDRESSES:
                self._buckets = {a: (t, last) for a, (t, last) in self._buckets.items()
                                 if self._level(a, now) < self.capacity}
                if len(self._buckets) >= self.MAX_ADDRESSES:  # memory stays bounded under a wide attack
                    self._buckets.clear()
            self._buckets[address] = (max(0.0, self._level(address, now) - 1.0), now)


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

