"""Reading request headers and bodies within limits: ASCII-digit integers, an idle timeout per
body chunk, a size cap, and JSON with bounded depth and no duplicate keys.

Every JSON check here is linear in the input: one pass of a regex without backtracking over the
bytes for the depth, then the C parser (``json.loads``, whose recursion is bounded by the
interpreter), so no body, however hostile, costs more than a fixed time per byte.

Routes call these only after authentication and authorization (which read headers alone), so an
unauthenticated client never gets a byte of its body read.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from soppu_registry.errors import ApiError

INT64_MAX = 2**63 - 1
"""Largest integer SQLite stores (versions, sizes)."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects accepted in a JSON document we parse (signature, manifest)."""

_DIGITS_RE = re.compile(r"[0-9]{1,19}")
_JSON_TOKENS_RE = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?|[\[\]{}]', re.DOTALL)
"""A JSON string (its closing quote optional: an unterminated string runs to the end of the data)
or a bracket. Possessive quantifiers, and a match that never fails once a quote has started, make
``finditer`` one pass: every byte is consumed once (a required closing quote made each quote of an
unterminated string start a new scan to the end, quadratic in the length)."""


def header_int(request: Request, header: str) -> int | None:
    """Header ``header`` as a non-negative int64 (ASCII digits only), None when absent; 400 otherwise."""
    v = request.headers.get(header)
    if v is None:
        return None
    if not _DIGITS_RE.fullmatch(v) or int(v) > INT64_MAX:
        raise ApiError(400, "bad_request", f"header {header} must be a non-negative integer of ASCII digits, got {v!r}")
    return int(v)


def refuse_declared_over(request: Request, cap: int, what: str) -> int | None:
    """The declared Content-Length (None for a chunked body); 413 ``too_large`` at once when it
    exceeds ``cap``, before any of the body is read."""
    clen = header_int(request, "content-length")
    if clen is not None and clen > cap:
        raise ApiError(413, "too_large", f"{what} of {clen} bytes exceeds the limit of {cap} bytes")
    return clen


async def body_chunks(request: Request, idle_timeout: float, what: str) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk as the server receives it. 408 ``body_timeout`` when no
    chunk arrives for ``idle_timeout`` seconds; 400 ``client_disconnected`` when the client goes
    away. Nobody may be waiting for either answer: the caller cleans up before re-raising."""
    received = 0
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), idle_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, "body_timeout", f"{what}: no data for {idle_timeout:g} s after {received} bytes; "
                                                "the upload was dropped, send it again") from None
        if message["type"] == "http.disconnect":
            raise ApiError(400, "client_disconnected", f"{what} ended after {received} bytes")
        chunk = message.get("body", b"")
        if chunk:
            received += len(chunk)
            yield chunk
        if not message.get("more_body", False):
            return


def check_json_depth(data: bytes | bytearray, what: str, code: str = "bad_request",
                     max_depth: int = MAX_JSON_DEPTH) -> None:
    """400 ``code`` when ``data`` nests arrays/objects deeper than ``max_depth`` (scanned
    without parsing, in one pass, linear in ``len(data)``: brackets inside strings do not count)."""
    depth = 0
    for m in _JSON_TOKENS_RE.finditer(data):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise ApiError(400, code, f"{what} nests JSON deeper than {max_depth} levels")
        elif c in (b"]", b"}"):
            depth -= 1


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _DuplicateKey(f"key {dup!r} appears twice in one object")
    return out


def loads_bounded(data: bytes | bytearray, what: str, code: str = "bad_request") -> Any:
    """``json.loads`` after :func:`check_json_depth`; 400 ``code`` naming ``what`` when it is not JSON
    or an object repeats a key (parsers disagree on which value wins: the registry must read a
    signature document or a manifest exactly as every other reader does)."""
    check_json_depth(data, what, code)
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise ApiError(400, code, f"{what} is ambiguous JSON: {e}") from None
    except (ValueError, RecursionError) as e:
        raise ApiError(400, code, f"{what} is not JSON: {e}") from None
