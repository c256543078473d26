"""The registry's HTTP API (FastAPI). OpenAPI at /openapi.json, docs at /docs.

    PUT  /v1/blobs/sha256:<hex>                      owner-write; streamed, digest/size/cap checked
    HEAD /v1/blobs/sha256:<hex>                      any valid token; 200 + size, or 404
    GET  /v1/blobs/sha256:<hex>                      serving-read, or a reader of a version using it
    PUT  /v1/adapters/<owner>/<name>/versions/<v>    owner-write; {"signature": <signature.json>}
    GET  /v1/adapters/<owner>/<name>[/versions/<v>]  owner read/write or serving-read
    GET  /v1/adapters/<owner>/<name>/versions        list of published version numbers
    GET  /v1/keys/<owner>                            any valid token; active and rotated keys
    GET  /v1/bases/<base-model>                      basis blobs visible to the caller
    GET  /healthz                                    no token

Errors are JSON ``{"error": {"code": ..., "message": ...}}``; 429 carries Retry-After.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from soppu_registry import checks
from soppu_registry.auth import OWNER_WRITE, Principal, RateLimited, RateLimiter, authenticate
from soppu_client.format.names import ADAPTER_NAME_RE as NAME_RE
from soppu_client.format.names import DIGEST_RE, OWNER_RE
from soppu_registry.storage import ApiError, Storage

MAX_PUBLISH_BODY = 16 << 20


@dataclass
class RegistryConfig:
    """Server settings; `max_blob_bytes` caps one blob, `rate`/`burst` the per-token bucket."""

    data_dir: Path
    max_blob_bytes: int = 1 << 30
    rate: float = 100.0
    burst: float = 1000.0

    def __post_init__(self) -> None:
        if self.max_blob_bytes < 1:
            raise ValueError(f"`max_blob_bytes` must be positive, got {self.max_blob_bytes}")
        if self.burst < 1:
            raise ValueError(f"`burst` must be >= 1, got {self.burst}")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body; the code is repeated in X-Soppu-Error-Code for HEAD (no body)."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers={**(headers or {}), "X-Soppu-Error-Code": code})


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "too_large"}

PUBLISH_BODY_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["signature"],
    "properties": {"signature": {"type": "object", "description": "contents of the bundle's signature.json"}}}}}}}
BLOB_BODY_SCHEMA = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


def create_app(config: RegistryConfig) -> FastAPI:
    store = Storage(config.data_dir)
    limiter = RateLimiter(config.rate, config.burst)
    safetensors = checks.SafetensorsChecker()
    app = FastAPI(title="SOPPU registry", version="1", description=__doc__)
    app.state.store, app.state.config = store, config

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, RateLimited) else None
        return _error(e.status, e.code, e.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, _HTTP_CODES.get(e.status_code, "http_error"), str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        return _error(400, "bad_request", msg)

    def principal(request: Request) -> Principal:
        p = authenticate(store, request.headers.get("authorization"))
        limiter.check(p.token_id)
        return p

    def hex_of(digest: str) -> str:
        m = DIGEST_RE.match(digest)
        if not m:
            raise ApiError(400, "bad_digest", f"blob reference {digest!r} must be sha256:<64 lowercase hex>")
        return m.group(1)

    def check_names(owner: str, name: str | None = None) -> None:
        if not OWNER_RE.match(owner):
            raise ApiError(400, "bad_owner", f"owner {owner!r} must match {OWNER_RE.pattern}")
        if name is not None and not NAME_RE.match(name):
            raise ApiError(400, "bad_name", f"adapter name {name!r} must match {NAME_RE.pattern}")

    def header_int(request: Request, header: str) -> int | None:
        v = request.headers.get(header)
        if v is None:
            return None
        if not v.isdigit():
            raise ApiError(400, "bad_request", f"header {header} must be a non-negative integer, got {v!r}")
        return int(v)

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # -- blobs -----------------------------------------------------------------------------
    @app.put("/v1/blobs/{digest}", tags=["blobs"], status_code=201, openapi_extra=BLOB_BODY_SCHEMA)
    async def put_blob(digest: str, request: Request) -> JSONResponse:
        """Stream a blob. Content-Length and the optional X-Soppu-Size must agree with the body."""
        hexd = hex_of(digest)
        p = await run_in_threadpool(principal, request)
        if OWNER_WRITE not in p.scopes:
            raise ApiError(403, "forbidden", "uploading blobs needs an owner-write token")
        clen, declared = header_int(request, "content-length"), header_int(request, "x-soppu-size")
        if clen is not None and declared is not None and clen != declared:
            raise ApiError(400, "size_mismatch", f"Content-Length {clen} differs from X-Soppu-Size {declared}")
        expected = declared if declared is not None else clen
        if expected is not None and expected > config.max_blob_bytes:
            raise ApiError(413, "too_large", f"blob {digest} of {expected} bytes exceeds the limit of {config.max_blob_bytes} bytes")
        writer = store.blob_writer(hexd, expected, config.max_blob_bytes)
        try:
            async for chunk in request.stream():
                if chunk:
                    writer.write(chunk)
        except ClientDisconnect:  # upload cut off: nothing was stored; nobody reads this answer
            writer.abort()
            return _error(400, "client_disconnected", f"upload of {digest} ended after {writer.size} bytes")
        except BaseException:
            writer.abort()
            raise
        res = await run_in_threadpool(writer.commit)
        return JSONResponse({"digest": res.digest, "size": res.size, "created": res.created},
                            status_code=201 if res.created else 200)

    @app.head("/v1/blobs/{digest}", tags=["blobs"])
    def head_blob(digest: str, request: Request) -> Response:
        hexd = hex_of(digest)
        principal(request)
        size = store.blob_size(hexd)
        if size is None:
            return Response(status_code=404)
        store.touch_blob(hexd)  # the client will publish against it: restart its gc grace period
        return Response(status_code=200, headers={"content-length": str(size), "x-soppu-size": str(size),
                                                  "docker-content-digest": digest})

    @app.get("/v1/blobs/{digest}", tags=["blobs"], response_class=FileResponse)
    def get_blob(digest: str, request: Request) -> Response:
        hexd = hex_of(digest)
        p = principal(request)
        if not p.can_read_any_blob and not any(p.can_read(o) for o in store.blob_referenced_by(hexd)):
            raise ApiError(404, "not_found", f"blob {digest} not found among the versions this token can read")
        path = store.blob_path(hexd)
        if not path.exists():
            raise ApiError(404, "not_found", f"blob {digest} not found")
        return FileResponse(path, media_type="application/octet-stream", headers={"docker-content-digest": digest})

    # -- adapters --------------------------------------------------------------------------
    def do_publish(request: Request, owner: str, name: str, version: int, body: bytes) -> JSONResponse:
        p = principal(request)
        if not p.can_write(owner):
            raise ApiError(403, "forbidden", f"publishing to owner {owner!r} needs that owner's owner-write token")
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise ApiError(400, "bad_request", f"body is not JSON: {e}") from None
        if not isinstance(doc, dict) or "signature" not in doc:
            raise ApiError(400, "bad_request", "body must be {\"signature\": <signature.json>}")
        sig = doc["signature"]
        st = checks.check_signature(store, sig, owner, name, version)
        files = checks.check_files(st)
        checks.check_blobs(store, files)
        manifest = checks.check_manifest(store, st, files, name)
        safetensors.check(store, files, manifest)
        status = store.publish(owner, name, version, str(st["base_model"]), sig, files)
        return JSONResponse(version_view(store.get_version(owner, name, version)), status_code=status)

    @app.put("/v1/adapters/{owner}/{name}/versions/{version}", tags=["adapters"], status_code=201,
             openapi_extra=PUBLISH_BODY_SCHEMA)
    async def publish(owner: str, name: str, version: int, request: Request) -> JSONResponse:
        """Publish a signed version: 201 new, 200 identical re-publish, 409 rollback/conflict."""
        check_names(owner, name)
        if version < 0:
            raise ApiError(400, "bad_request", f"version must be a non-negative integer, got {version}")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_PUBLISH_BODY:
                    raise ApiError(413, "too_large", f"publish body exceeds {MAX_PUBLISH_BODY} bytes")
        except ClientDisconnect:
            return _error(400, "client_disconnected", "publish request ended before its body")
        return await run_in_threadpool(do_publish, request, owner, name, version, bytes(body))

    def readable_version(request: Request, owner: str, name: str, version: int | None) -> dict[str, Any]:
        check_names(owner, name)
        p = principal(request)
        if not p.can_read(owner):
            raise ApiError(403, "forbidden", f"token cannot read adapters of owner {owner!r}")
        v = store.get_version(owner, name, version)
        if v is None:
            which = "any version" if version is None else f"version {version}"
            raise ApiError(404, "not_found", f"{owner}/{name} has no published {which}")
        return version_view(v)

    @app.get("/v1/adapters/{owner}/{name}", tags=["adapters"])
    def get_latest(owner: str, name: str, request: Request) -> dict[str, Any]:
        return readable_version(request, owner, name, None)

    @app.get("/v1/adapters/{owner}/{name}/versions/{version}", tags=["adapters"])
    def get_version(owner: str, name: str, version: int, request: Request) -> dict[str, Any]:
        return readable_version(request, owner, name, version)

    @app.get("/v1/adapters/{owner}/{name}/versions", tags=["adapters"])
    def list_versions(owner: str, name: str, request: Request) -> dict[str, Any]:
        check_names(owner, name)
        if not principal(request).can_read(owner):
            raise ApiError(403, "forbidden", f"token cannot read adapters of owner {owner!r}")
        return {"owner": owner, "name": name, "versions": store.list_versions(owner, name)}

    @app.get("/v1/keys/{owner}", tags=["keys"])
    def get_keys(owner: str, request: Request) -> dict[str, Any]:
        check_names(owner)
        principal(request)
        if not store.owner_exists(owner):
            raise ApiError(404, "not_found", f"owner {owner!r} does not exist")
        return {"owner": owner, "keys": store.keys(owner)}

    @app.get("/v1/bases/{base_model:path}", tags=["bases"])
    def get_bases(base_model: str, request: Request) -> dict[str, Any]:
        p = principal(request)
        out = []
        for b in store.bases(base_model):
            users = [u for u in b["used_by"] if p.can_read(u["owner"])]
            if users:
                out.append({**b, "used_by": users})
        return {"base_model": base_model, "bases": out}

    return app


def version_view(v: dict[str, Any] | None) -> dict[str, Any]:
    assert v is not None
    return {k: v[k] for k in ("owner", "name", "version", "base_model", "signature", "files", "published_at")}
