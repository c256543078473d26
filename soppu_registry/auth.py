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

Failed authentications are limited per (client address, presented credential) and per client
address (``FailureLimiter``), checked before the token is looked up: a credential that keeps
failing gets 429 without a lookup, and so does any credential from an address that sent too many
different failing ones, except tokens this process has seen authenticate; successful requests
spend nothing. One tenant's bad token on a shared address never locks out another's valid one.
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
    """429 for a credential (or an address) past its failed-authentication budget."""

    def __init__(self, retry_after: int, address: str, what: str, option: str):
        super().__init__(retry_after)
        self.message = (f"too many failed authentications {what} from {address}; retry after {self.retry_after} s "
                        f"({option})")
        self.args = (self.message,)


def credential_fingerprint(authorization: str | None) -> str:
    """What the failed-auth limiter keys a presented credential on: sha256 of the whole
    Authorization header (absent: of the empty string). Never stored beyond the limiter's memory."""
    return hashlib.sha256((authorization or "").encode("utf-8", "surrogateescape")).hexdigest()


class _Buckets:
    """Token buckets of ``capacity`` refilled at ``capacity``/60 per second, keyed by any string;
    full buckets are forgotten (at most ``MAX_KEYS``; past that the table is cleared)."""

    MAX_KEYS = 100_000

    def __init__(self, per_minute: int):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._b: dict[object, tuple[float, float]] = {}

    def level(self, key: object, now: float) -> float:
        tokens, last = self._b.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - last) * self.rate)

    def retry_after(self, key: object, now: float) -> int | None:
        """Seconds until one failure is allowed again; None while the bucket holds one."""
        if self.rate <= 0:
            return None
        tokens = self.level(key, now)
        return None if tokens >= 1.0 else math.ceil((1.0 - tokens) / self.rate)

    def spend(self, key: object, now: float) -> None:
        if self.rate <= 0:
            return
        if len(self._b) >= self.MAX_KEYS:
            self._b = {k: v for k, v in self._b.items() if self.level(k, now) < self.capacity}
            if len(self._b) >= self.MAX_KEYS:  # memory stays bounded under a wide attack
                self._b.clear()
        self._b[key] = (max(0.0, self.level(key, now) - 1.0), now)


class FailureLimiter:
    """Failed authentications, limited per (client address, presented credential) and per address.

    * ``per_credential`` failures a minute of one credential from one address (a misconfigured
      tenant's stale token, a guesser retrying one value): past it, that credential is answered
      429 from that address, before any lookup. Other credentials from the address are not touched,
      so on a shared serving host (every tenant's requests come from one address) one tenant's bad
      token never locks out another tenant's valid one.
    * ``per_address`` failures a minute over all credentials from one address (a guesser sending a
      new value each time): past it, every credential from that address is answered 429 before
      any lookup, **except** a token this process has authenticated before (the sha256 of its
      header is in a bounded in-memory set, TTL ``KNOWN_TTL``); those are authenticated as usual
      (revocation included) and go through.

    Only failed authentications spend; a 429 spends nothing, a success nothing. Letting known
    tokens through a throttled address is no bypass: they are valid credentials (a 429 vs a 200
    tells a guesser no more than a 401 vs a 200 would), and guessing a 256-bit secret is hopeless
    at any rate; the limits bound the load (lookups) and the log noise failures cause. A credential
    never seen by this process waits out ``Retry-After`` while its address is throttled.
    ``per_credential`` <= 0 disables the whole limiter, ``per_address`` <= 0 the address level.
    """

    KNOWN_TTL = 3600.0
    MAX_KNOWN = 100_000

    def __init__(self, per_credential: int, per_address: int = 0):
        self.enabled = per_credential > 0
        self._cred = _Buckets(per_credential)
        self._addr = _Buckets(per_address if self.enabled else 0)
        self._known: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, address: str, fingerprint: str) -> None:
        """Before authenticating: AuthThrottled while this credential's bucket from ``address`` is
        empty, or the address's bucket is empty and the credential is not a known good token."""
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            wait = self._cred.retry_after((address, fingerprint), now)
            if wait is not None:
                raise AuthThrottled(wait, address, "with this token", "--max-auth-failures")
            wait = self._addr.retry_after(address, now)
            if wait is not None and now - self._known.get(fingerprint, -math.inf) > self.KNOWN_TTL:
                raise AuthThrottled(wait, address, "of different tokens", "--max-address-auth-failures")

    def failed(self, address: str, fingerprint: str) -> None:
        """A failed authentication: spends one of the credential's and one of the address's."""
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            self._known.pop(fingerprint, None)  # revoked since it last worked
            self._cred.spend((address, fingerprint), now)
            self._addr.spend(address, now)

    def succeeded(self, fingerprint: str) -> None:
        """A successful authentication: the credential is a known good token for ``KNOWN_TTL``."""
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            if fingerprint not in self._known and len(self._known) >= self.MAX_KNOWN:
                self._known = {f: t for f, t in self._known.items() if now - t <= self.KNOWN_TTL}
                if len(self._known) >= self.MAX_KNOWN:
                    self._known.clear()
            self._known[fingerprint] = now


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

