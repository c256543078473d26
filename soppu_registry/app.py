"""The registry's HTTP API (FastAPI). OpenAPI at /openapi.json, docs at /docs.

    PUT  /v1/blobs/sha256:<hex>                      owner-write; streamed, digest/size/cap/quota checked;
                                                     the caller's owner owns the blob afterwards
    HEAD /v1/blobs/sha256:<hex>                      an owner of the blob, or a reader of a version listing
                                                     it: 200 + size; anyone else gets the absent blob's 404
    GET  /v1/blobs/sha256:<hex>                      same rule as HEAD
    PUT  /v1/adapters/<owner>/<name>/versions/<v>    owner-write; {"signature": <signature.json>}
    PUT  /v1/bundles/<owner>/versions/<v>            owner-write; same body; every adapter of the bundle in
                                                     one transaction (all or nothing)
    GET  /v1/adapters/<owner>/<name>[/versions/<v>]  owner read/write or serving-read
    GET  /v1/adapters/<owner>/<name>/versions        list of published version numbers
    GET  /v1/keys/<owner>                            any valid token; active and rotated keys
    GET  /v1/bases/<base-model>                      basis blobs visible to the caller
    GET  /healthz                                    no token

Errors are JSON ``{"error": {"code": ..., "message": ...}}`` (the ``Error`` schema of the OpenAPI
document, listed under every operation's responses); 429 carries Retry-After.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from soppu_client.format.names import ADAPTER_NAME_RE, DIGEST_RE, OWNER_RE
from soppu_registry.config import RegistryConfig
from soppu_registry.deps import RegistryState
from soppu_registry.errors import ApiError
from soppu_registry.routes import ROUTERS

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "too_large"}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {"type": "object", "required": ["code", "message"], "additionalProperties": False,
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
"""The body of every refusal."""
ERROR_STATUSES = {
    400: "malformed path, header or body", 401: "missing or unknown token", 403: "token may not do this",
    404: "not found, or not visible to this token", 408: "request body stalled (body_idle_timeout)",
    409: "rollback or conflicting version", 413: "body, blob or quota over its limit",
    429: "rate limited (Retry-After)", 503: "too many open connections, or retry (a concurrent gc took the blob)",
}
"""Error statuses documented on every operation (each answers the ``Error`` schema)."""
PATH_PATTERNS = {"digest": DIGEST_RE.pattern, "owner": OWNER_RE.pattern, "name": ADAPTER_NAME_RE.pattern}
"""Documented patterns of path values (the routes check them: 400 ``bad_digest`` / ``bad_owner`` / ``bad_name``)."""


def create_app(config: RegistryConfig) -> FastAPI:
    """The registry app over ``config.data_dir``: every router, and one error shape for every failure."""
    app = FastAPI(title="SOPPU registry", version="1", description=__doc__)
    app.state.registry = RegistryState.open(config)
    for router in ROUTERS:
        app.include_router(router)
    _install_error_handlers(app)
    _document_errors(app)
    return app


def _document_errors(app: FastAPI) -> None:
    """OpenAPI: path values carry their PATH_PATTERNS; every operation lists ERROR_STATUSES with the
    Error schema (not FastAPI's 422, which this app never sends; HEAD: without content); PUTs list
    their 200 (already present / identical re-publish) beside 201."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        doc.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for method_ops in doc.get("paths", {}).values():
            for method, op in method_ops.items():
                for param in op.get("parameters", []):
                    if param.get("in") == "path" and param["name"] in PATH_PATTERNS:
                        param["schema"]["pattern"] = PATH_PATTERNS[param["name"]]
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                if method == "put" and "201" in responses:
                    responses.setdefault("200", {**responses["201"], "description": "already present / unchanged"})
                for status, text in ERROR_STATUSES.items():
                    responses.setdefault(str(status), {"description": text, **ref})
                if method == "head":  # no body, so no media type (the error code is in X-Soppu-Error-Code)
                    for response in responses.values():
                        response.pop("content", None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body; the code is repeated in X-Soppu-Error-Code for HEAD (no body)."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers={**(headers or {}), "X-Soppu-Error-Code": code})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.code, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, _HTTP_CODES.get(e.status_code, "http_error"), str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        return error_response(400, "bad_request", msg)
