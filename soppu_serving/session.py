"""One serving session per process: THE way an engine gets a verified adapter dir.

    session = Session(Settings.from_env(), wording=VLLM)          # once per process
    served = session.serve(AdapterRef.parse("alice/uppercase"), token, check=engine_check)
    served.path, served.form, served.verified, served.stats

:meth:`Session.serve` runs, for one request:

1. resolve: the version record of ``ref`` with the request's token (one pooled HTTP client per
   token; a record is reused ``resolve_ttl`` seconds, so an engine's several calls for one
   request cost one round trip);
2. verify, once: the owner's key (pinned ``SOPPU_TRUSTED_KEYS``; else trust on first use: the key
   this host accepted first for the owner, or one the registry's rotation proofs lead to from it,
   :mod:`soppu_serving.trust`), the Ed25519 signature, the expiry against the clock; then
   rollback: an unpinned ``owner/name`` answered below the highest version this host has served
   under the same trust root is refused (``VerificationError`` code ``rollback``);
3. the engine's ``check(verified)`` (vLLM: the bundle's base model is the served one), before any
   byte is downloaded;
4. materialize: a dir this process already proved intact is served after one ``lstat`` per file
   (:func:`~soppu_serving.materialize.check_handed`); otherwise it is built from verified blobs
   under the version's lock (:func:`~soppu_serving.materialize.build`), which also replaces a dir
   tampered on disk;
5. only then, for a version that was served: the rollback mark is raised and, unpinned, the
   owner's key recorded (:mod:`soppu_serving.trust`). A refused version leaves no mark.

Errors are :class:`~soppu_client.format.errors.SoppuError` subclasses naming the adapter and the
fix in the engine's words (:class:`~soppu_serving.wording.Wording`). Sessions hold no module
globals: an engine keeps its one session (:func:`shared_session` gives one per settings and
wording, for engine glue that has no place of its own to keep it).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests
from filelock import Timeout
from requests.adapters import HTTPAdapter

from soppu_client.fetch import VerifiedVersion, VersionRecord, resolve_version, reuse_verdict, verify_version
from soppu_client.format import signing
from soppu_client.format.errors import RegistryError, SignatureError, SoppuError, VerificationError
from soppu_client.format.names import BASIS, MANIFEST, core_path
from soppu_client.format.refs import AdapterRef
from soppu_client.registry_client import RegistryClient

from soppu_serving.cache import Cache, Stamps, trust_id
from soppu_serving.materialize import FetchStats, Memo, build, check_cached, check_handed
from soppu_serving.settings import Settings, warn_if_unpinned
from soppu_serving.trust import KeyTrust
from soppu_serving.wording import GENERIC, Wording

__all__ = ["EngineCheck", "Served", "Session", "forget_sessions", "shared_session"]

# The engine's check of a verified version, before anything is downloaded; raises a SoppuError.
EngineCheck = Callable[[VerifiedVersion], None]

_MAX_CLIENTS = 256  # pooled clients kept (one per token; the least recently used is closed)
_MAX_ENTRIES = 4096  # entries per TTL table
_counter: contextvars.ContextVar[FetchStats | None] = contextvars.ContextVar("soppu_serve_stats", default=None)


@dataclass(frozen=True)
class Served:
    """One served adapter: the dir to hand the engine, its form, what verified it, what it cost."""

    path: Path
    form: str  # "peft" or "compressed"
    verified: VerifiedVersion
    stats: FetchStats = field(compare=False)

    @property
    def version(self) -> int:
        return self.verified.record.version

    @property
    def label(self) -> str:
        return self.verified.label

    @property
    def base_model(self) -> str:
        return str(self.verified.statement.get("base_model"))

    def check_expiry(self, now: datetime | None = None) -> None:
        """SignatureError ``expired`` once the signed statement has expired (no network, no crypto):
        for engine glue that hands the same ``Served`` to several calls of one request."""
        expires = self.verified.statement["expires_at"]
        now = now or datetime.now(timezone.utc)
        if now >= datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc):
            raise SignatureError(f"{self.label}: bad signature: statement expired at {expires} (now "
                                 f"{signing.format_timestamp(now)}); re-sign the bundle with a later --expires",
                                 code="expired")


class _LRU(OrderedDict):
    """A bounded, thread-safe dict (least recently used entries dropped first)."""

    def __init__(self, size: int):
        super().__init__()
        self._size = size
        self._guard = threading.Lock()

    def get(self, key: Any, default: Any = None) -> Any:
        with self._guard:
            if key not in self:
                return default
            self.move_to_end(key)
            return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        with getattr(self, "_guard", threading.Lock()):
            super().__setitem__(key, value)
            self.move_to_end(key)
            while len(self) > self._size:
                self.popitem(last=False)


class _TTL:
    """A small table whose entries live ``ttl`` seconds (bounded; thread-safe)."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._items: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        with self._lock:
            hit = self._items.get(key)
        return hit[1] if hit is not None and time.monotonic() - hit[0] < self.ttl else None

    def put(self, key: Any, value: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._items) >= _MAX_ENTRIES:
                for k in [k for k, (t, _) in self._items.items() if now - t >= self.ttl] or list(self._items):
                    del self._items[k]
            self._items[key] = (now, value)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def _raw(pub: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw: bytes = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw


def _token_key(token: str | None) -> str:
    return hashlib.sha256((token or "").encode()).hexdigest()


class _CountingSession(requests.Session):
    """A pooled ``requests.Session`` that counts each request into the running serve's stats."""

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        stats = _counter.get()
        if stats is not None:
            stats.registry_requests += 1
        return super().request(*args, **kwargs)


class Session:
    """The serving side of one process (see the module docstring): cache, pooled clients, TTL
    tables, the engine's wording. Thread-safe; every public method may run in many threads."""

    def __init__(self, settings: Settings, *, wording: Wording = GENERIC, form: str | None = None):
        self.settings = settings
        self.wording = wording
        self.form = form or settings.serve_format
        self.stamps = Stamps()
        self.memo = Memo()
        self._lock = threading.Lock()
        self._caches: dict[str, Cache] = {}
        self.cache = self.cache_for(self.form)  # also checks the cache root is usable
        self.trust = trust_id(settings.trusted_keys, settings.registry_url)
        self.keys = KeyTrust(self.cache, self.trust, pinned=settings.trusted_keys, subject=wording.subject)
        self._records = _TTL(settings.resolve_ttl)
        self._registry_keys = _TTL(settings.resolve_ttl)
        self._signatures = _LRU(64)  # signature document digest -> document (content-addressed)
        self._verdicts = _LRU(256)  # (document digest, key id, key bytes) -> (statement, its adapter names)
        self._clients: OrderedDict[str, RegistryClient] = OrderedDict()
        warn_if_unpinned(settings)  # once per process and registry

    # -- parts ----------------------------------------------------------------------------------
    def cache_for(self, form: str) -> Cache:
        """The cache of serving form ``form`` (one root, one set of stamps for every form)."""
        with self._lock:
            cache = self._caches.get(form)
            if cache is None:
                cache = self._caches[form] = Cache(self.settings.cache_root, form, stamps=self.stamps)
        return cache

    def client(self, token: str | None) -> RegistryClient:
        """The pooled registry client of ``token`` (one ``requests.Session`` reused across requests)."""
        key = _token_key(token)
        with self._lock:
            client = self._clients.get(key)
            if client is not None:
                self._clients.move_to_end(key)
                return client
        url = self.settings.require_registry_url(self.wording.url_fix)
        http = _CountingSession()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=32)
        http.mount("http://", adapter)
        http.mount("https://", adapter)
        client = RegistryClient(url, token, backoff=0.2, max_wait=2.0, session=http, **self.settings.client_options())
        with self._lock:
            existing = self._clients.get(key)
            if existing is not None:  # another thread made one meanwhile
                http.close()
                return existing
            self._clients[key] = client
            while len(self._clients) > _MAX_CLIENTS:
                self._clients.popitem(last=False)[1].session.close()
        return client

    def close(self) -> None:
        """Close every pooled connection and forget every reused record and key."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), OrderedDict()
        for c in clients:
            c.session.close()
        self.forget()

    def forget(self) -> None:
        """Forget every reused version record and registry key (the next request asks again)."""
        self._records.clear()
        self._registry_keys.clear()

    def _explain(self, ref: AdapterRef, client: RegistryClient) -> Callable[[RegistryError, str], SoppuError]:
        return lambda err, what: self.wording.explain(err, what, ref=ref, url=client.base_url)

    # -- the steps --------------------------------------------------------------------------------
    def resolve(self, ref: AdapterRef, token: str | None) -> VersionRecord:
        """Step 1: the version record of ``ref`` (reused ``resolve_ttl`` seconds per token)."""
        key = (str(ref), _token_key(token))
        hit: VersionRecord | None = self._records.get(key)
        if hit is not None:
            return hit
        client = self.client(token)
        record = resolve_version(client, ref, subject=self.wording.subject, explain=self._explain(ref, client),
                                 signatures=self._signatures)
        self._records.put(key, record)
        if ref.version is None:  # the same record answers the pinned lookup of that version
            pinned = AdapterRef(ref.owner, ref.name, record.version)
            self._records.put((str(pinned), key[1]), replace(record, ref=pinned))
        return record

    def verify(self, ref: AdapterRef, record: VersionRecord, token: str | None) -> VerifiedVersion:
        """Step 2: the owner's key, the signature, the expiry, rollback. Raises no mark."""
        client = self.client(token)
        explain = self._explain(ref, client)
        pub = self.keys.key_for(client, record, explain, self._registry_keys, _token_key(token))
        stats = _counter.get()
        if stats is not None:
            stats.verifications += 1
        verdict = None
        if record.signature_sha256 is not None:  # the same signed bytes, the same key: one Ed25519 check per process
            verdict = (record.signature_sha256, str(record.signature.get("key_id")), _raw(pub))
        known = self._verdicts.get(verdict) if verdict is not None else None
        if known is not None:
            verified = reuse_verdict(record, known[0], known[1])
        else:
            if stats is not None:
                stats.signature_checks += 1
            verified = verify_version(client, record, public_key=pub, explain=explain)
            if verdict is not None:
                self._verdicts[verdict] = (verified.statement, frozenset(verified.statement["adapters"]))
        owner, name, version = ref.owner, ref.name, record.version
        seen = self.cache.highest_seen(self.trust, owner, name)
        if ref.version is None and seen is not None and version < seen:
            raise VerificationError(
                f"{self.wording.subject} {ref}: rollback refused: the registry at {client.base_url} answers version "
                f"{version} as the latest, but this host has already verified version {seen} of {owner}/{name}. Ask "
                f"for {owner}/{name}@{version} to serve that version on purpose; if the owner withdrew the newer "
                f"versions, delete {self.cache.seen_path(self.trust, owner, name)}", code="rollback")
        return verified

    def _accept(self, verified: VerifiedVersion) -> None:
        """Step 5: a served version raises its mark and (unpinned) records the owner's key."""
        ref = verified.record.ref
        digest = hashlib.sha256(signing.canonical_json(verified.statement)).hexdigest()
        self.cache.note_seen(self.trust, ref.owner, ref.name, verified.record.version, digest)
        self.keys.accept(ref.owner, verified.record.signature)

    # -- the one entry point ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _request(self, ref: AdapterRef | str, token: str | None,
                 form: str | None) -> Iterator[tuple[AdapterRef, str | None, Cache, FetchStats]]:
        """One request's (ref, token, cache, stats); registry requests and checks made inside it are
        counted in its stats. ``token`` None: ``SOPPU_REGISTRY_TOKEN``."""
        ref = AdapterRef.parse(ref) if isinstance(ref, str) else ref
        token = token if token is not None else self.settings.registry_token
        stats = FetchStats()
        reset = _counter.set(stats)
        try:
            yield ref, token, self.cache_for(form or self.form), stats
        finally:
            _counter.reset(reset)

    def _build(self, ref: AdapterRef, token: str | None, verified: VerifiedVersion, cache: Cache, final: Path,
               stats: FetchStats, lock_timeout: float) -> None:
        """Materialize ``final`` under its version lock (``lock_timeout`` s, -1: wait forever), unless
        another process did meanwhile."""
        client = self.client(token)
        try:
            with cache.version_lock(ref.owner, ref.name, verified.record.version, timeout=lock_timeout):
                if not (cache.is_complete(final) and check_handed(cache, final)):
                    build(verified, client, self._explain(ref, client), cache, final, stats, self.memo,
                          self.settings.max_served_rank)
        except Timeout:
            raise RegistryError(f"{verified.label}: timed out after {lock_timeout:.0f}s waiting for another "
                                "process to materialize it", code="lock_timeout") from None

    def serve(self, ref: AdapterRef | str, token: str | None = None, *, check: EngineCheck | None = None,
              form: str | None = None, lock_timeout: float = 600.0) -> Served:
        """Resolve, verify (once), run ``check``, materialize ``ref`` in ``form`` (default: the
        session's); returns the :class:`Served` dir. ``token`` None: ``SOPPU_REGISTRY_TOKEN``."""
        with self._request(ref, token, form) as (ref, token, cache, stats):
            record = self.resolve(ref, token)
            verified = self.verify(ref, record, token)
            if check is not None:
                check(verified)
            final = cache.version_dir(ref.owner, ref.name, record.version)
            if cache.is_complete(final):
                check_cached(cache, final, verified)
                stats.warm = check_handed(cache, final)
            if not stats.warm:
                self._build(ref, token, verified, cache, final, stats, lock_timeout)
            self._accept(verified)
            if ref.version is None:
                cache.set_latest(ref.owner, ref.name, record.version)
        return Served(final, cache.form, verified, stats)

    def cached(self, ref: AdapterRef | str, token: str | None = None, *, form: str | None = None) -> Served | None:
        """Like :meth:`serve` but never downloads: the served dir when it is complete and this
        process can vouch for it now (resolved, verified; intact, or rebuilt from the verified blob
        store and compared), else None."""
        with self._request(ref, token, form) as (ref, token, cache, stats):
            record = self.resolve(ref, token)
            verified = self.verify(ref, record, token)
            final = cache.version_dir(ref.owner, ref.name, record.version)
            if not cache.is_complete(final):
                return None
            check_cached(cache, final, verified)
            stats.warm = check_handed(cache, final)
            if not stats.warm:  # built by another process: proven by rebuilding from the verified blob store
                entries = verified.entries([MANIFEST, BASIS, core_path(ref.name)])
                if any(cache.cached_blob(e["sha256"], int(e["size"])) is None for e in entries):
                    return None  # that would need a download: serve() does it
                self._build(ref, token, verified, cache, final, stats, -1)
            self._accept(verified)
        return Served(final, cache.form, verified, stats)


_sessions: dict[tuple[Settings, Wording, str | None], Session] = {}
_sessions_lock = threading.Lock()


def shared_session(settings: Settings, wording: Wording = GENERIC, form: str | None = None) -> Session:
    """The one session of this process for ``settings`` (and ``wording``, ``form``), made on first use."""
    key = (settings, wording, form)
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = _sessions[key] = Session(settings, wording=wording, form=form)
        return session


def forget_sessions() -> None:
    """Close and drop every shared session (tests; an operator's reload)."""
    with _sessions_lock:
        sessions = list(_sessions.values())
        _sessions.clear()
    for s in sessions:
        s.close()
