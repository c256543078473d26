"""What every route depends on: the server's state, the authenticated caller, checked path values.

Routes declare them as typed parameters, in the order they are checked: path values first (400),
then ``Caller`` (429 address past its failed-authentication budget, 401 unknown token, 429
per-token rate limit), so a malformed path costs no rate budget.

    Caller       the request's Principal: credential and address not throttled, Bearer token
                 authenticated (a 401 spends one failure of the credential and of the address),
                 per-token rate limit taken
    BlobHex      ``{digest}`` as ``sha256:<hex>`` -> the hex (400 ``bad_digest``)
    OwnerPath    ``{owner}`` checked against OWNER_RE (400 ``bad_owner``)
    AdapterPath  ``{owner}/{name}`` -> AdapterRef (400 ``bad_owner`` / ``bad_name``)
    State        store, config, rate limiters and safetensors cache of this app
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from soppu_client.format.names import ADAPTER_NAME_RE, DIGEST_RE, OWNER_RE
from soppu_client.format.refs import AdapterRef
from soppu_registry.auth import FailureLimiter, Principal, RateLimiter, authenticate, credential_fingerprint
from soppu_registry.checks import SafetensorsChecker
from soppu_registry.config import RegistryConfig
from soppu_registry.errors import ApiError
from soppu_registry.storage import Storage


@dataclass
class RegistryState:
    """Per-app state shared by all requests (``app.state.registry``)."""

    config: RegistryConfig
    store: Storage
    limiter: RateLimiter
    safetensors: SafetensorsChecker
    auth_failures: FailureLimiter

    @classmethod
    def open(cls, config: RegistryConfig) -> RegistryState:
        return cls(config, Storage(config.data_dir, database=config.database, blobs=config.blobs),
                   RateLimiter(config.rate, config.burst), SafetensorsChecker(),
                   FailureLimiter(config.max_auth_failures, config.max_address_auth_failures))

    @property
    def quota(self) -> int | None:
        """The per-owner unpublished-bytes quota; None when disabled."""
        return self.config.max_unpublished_bytes or None


async def registry_state(request: Request) -> RegistryState:
    return request.app.state.registry


State = Annotated[RegistryState, Depends(registry_state)]

# Documents the scheme in OpenAPI only; `principal` reads the header itself so that a missing and a
# malformed header get their own messages.
_bearer = HTTPBearer(auto_error=False, scheme_name="token",
                     description="`soppu_<id>_<secret>` from `soppu-registry issue-token`")


def principal(request: Request, state: State, _: Annotated[object, Depends(_bearer)]) -> Principal:
    """Credential and client address not throttled (429, ``FailureLimiter``), Bearer token ->
    Principal (401 ``unauthorized``, which spends one failure of the credential and one of the
    address), then one request off the token's bucket (429)."""
    address = request.client.host if request.client else "unknown"
    header = request.headers.get("authorization")
    fingerprint = credential_fingerprint(header)
    state.auth_failures.check(address, fingerprint)
    try:
        p = authenticate(state.store, header)
    except ApiError:
        state.auth_failures.failed(address, fingerprint)
        raise
    state.auth_failures.succeeded(fingerprint)
    state.limiter.check(p.token_id)
    return p


Caller = Annotated[Principal, Depends(principal)]


async def blob_hex(digest: str) -> str:
    m = DIGEST_RE.match(digest)
    if not m:
        raise ApiError(400, "bad_digest", f"blob reference {digest!r} must be sha256:<64 lowercase hex>")
    return m.group(1)


BlobHex = Annotated[str, Depends(blob_hex)]


def check_owner(owner: str) -> None:
    if not OWNER_RE.match(owner):
        raise ApiError(400, "bad_owner", f"owner {owner!r} must match {OWNER_RE.pattern}")


async def owner_path(owner: str) -> str:
    check_owner(owner)
    return owner


OwnerPath = Annotated[str, Depends(owner_path)]


async def adapter_path(owner: str, name: str) -> AdapterRef:
    check_owner(owner)
    if not ADAPTER_NAME_RE.match(name):
        raise ApiError(400, "bad_name", f"adapter name {name!r} must match {ADAPTER_NAME_RE.pattern}")
    return AdapterRef(owner, name)


AdapterPath = Annotated[AdapterRef, Depends(adapter_path)]
