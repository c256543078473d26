"""Server settings of one registry process (`soppu-registry serve` options, same names with dashes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RegistryConfig:
    """Settings of one registry; every field is a `soppu-registry serve` option.

    ``data_dir``            the SQLite database and blobs (with ``database`` and ``blobs``: only this
                            process's partial uploads and cached copies)
    ``database``            postgresql://... URL of the shared metadata database; None: SQLite in data_dir
    ``blobs``               s3://BUCKET?endpoint=... of the shared blob store; None: data_dir/blobs
    ``max_blob_bytes``      largest blob (413 ``too_large``, refused from Content-Length or while streaming)
    ``rate`` / ``burst``    per-token bucket: requests/s (<= 0 disables) and capacity
    ``max_publish_bytes``   largest publish body (the signature document), 413 ``too_large``
    ``max_rank``            largest basis rank ``k`` a published bundle may have (400 ``bad_manifest``)
    ``max_served_params``   largest number of parameters one adapter of a published bundle becomes
                            when a host materializes it (sum of k (d_out + d_in) over its modules;
                            400 ``bad_manifest``)
    ``header_timeout``      seconds a connection may take to send a request's headers; then it is closed
    ``body_idle_timeout``   seconds an upload may go without sending a body chunk: 408
                            ``body_timeout``, connection closed, partial upload removed
    ``max_connections``     open connections; past it a new connection displaces the oldest one still
                            waiting for its headers, or is answered 503 ``too_many_connections``
    ``max_auth_failures``   failed authentications (401) of one credential (Authorization header) from
                            one client address per minute (bucket of that size), checked before the
                            lookup: past it that credential gets 429 ``rate_limited``; 0 disables
                            the failed-auth limiter entirely
    ``max_address_auth_failures``  failed authentications per client address per minute over all
                            credentials: past it 429 for any credential this process has not seen
                            authenticate (known good tokens still pass); 0 disables this level
    ``max_unpublished_bytes``  per owner: bytes of blobs it owns that none of its published versions
                            lists; a PUT past it is 413 ``quota_exceeded``, before the body; 0 disables
    """

    data_dir: Path
    database: str | None = None
    blobs: str | None = None
    max_blob_bytes: int = 1 << 30
    rate: float = 100.0
    burst: float = 1000.0
    max_publish_bytes: int = 1 << 20
    max_rank: int = 256
    max_served_params: int = 1 << 28
    header_timeout: float = 10.0
    body_idle_timeout: float = 30.0
    max_connections: int = 512
    max_auth_failures: int = 20
    max_address_auth_failures: int = 200
    max_unpublished_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name in ("max_blob_bytes", "max_publish_bytes", "max_rank", "max_served_params", "max_connections"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if self.burst < 1:
            raise ValueError(f"`burst` must be >= 1, got {self.burst}")
        for name in ("max_auth_failures", "max_address_auth_failures", "max_unpublished_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0 (0 disables), got {value!r}")
        for name in ("header_timeout", "body_idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be a positive number of seconds, got {getattr(self, name)!r}")
