"""REST client for the SOPPU registry, used by `soppu upload` (no server code imported here).

Upload protocol: for each file of the signed statement, HEAD ``/v1/blobs/sha256:<hex>`` and PUT
only the missing ones (streamed, Content-Length and X-Soppu-Size set); then PUT
``/v1/adapters/<owner>/<name>/versions/<v>`` with ``{"signature": <signature.json>}`` once per
adapter name in the bundle. Publishing is idempotent (identical re-publish answers 200), so every
request may be retried: connection errors, 5xx and 429 are retried with exponential backoff
(429/503 honour Retry-After). Any other refusal raises :class:`RegistryError` carrying the HTTP
status, the server's error code and message, and the URL.

The registry's answers are not trusted to be small or quick (a hostile or broken registry):

* every JSON answer is streamed and read at most ``max_json_bytes`` (a declared Content-Length
  above it is refused before any body is read), within ``timeout`` seconds overall, then parsed;
  bad JSON, too deep JSON and wrong types become :class:`RegistryError` (code ``bad_response``,
  ``response_too_large`` or ``deadline``) naming the URL and the field;
* a blob download reads at most its signed size, within ``download_deadline`` seconds overall
  (cut within one read timeout of the deadline, code ``deadline``);
* bodies are asked for and accepted only without Content-Encoding (no decompression bombs);
* error bodies are read at most 64 KiB.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import requests
import urllib3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from soppu_client.format import signing
from soppu_client.format.errors import InputError, RegistryError, SignatureError
from soppu_client.format.names import ROTATION_FORMAT, SIGNATURE

__all__ = ["RegistryClient", "UploadResult", "find_registered_key", "make_rotation_proof", "verify_rotation_proof"]

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_CHUNK = 1 << 16
MAX_JSON_BYTES = 4 << 20  # a version record: a signature document (the registry caps ~1 MiB) and its file list
DOWNLOAD_DEADLINE = 600.0  # seconds for one blob download, start to last byte
_ERROR_BODY_BYTES = 64 << 10
_IDENTITY = {"Accept-Encoding": "identity"}


@dataclass
class UploadResult:
    """What an upload did: per adapter "created" (201) or "unchanged" (200), blobs sent/skipped."""

    owner: str
    version: int
    base_model: str
    adapters: dict[str, str] = field(default_factory=dict)
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "version": self.version, "base_model": self.base_model,
                "adapters": self.adapters, "uploaded": self.uploaded, "skipped": self.skipped,
                "bytes_uploaded": self.bytes_uploaded}


class _ProgressFile:
    """A file opened for one streamed PUT: ``read`` feeds the progress callback, ``len`` the size."""

    def __init__(self, path: Path, size: int, on_bytes: Callable[[int], None]):
        self._f: BinaryIO = open(path, "rb")
        self._size = size
        self._on_bytes = on_bytes
        self.sent = 0

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(_CHUNK if n is None or n < 0 else n)
        self.sent += len(b)
        self._on_bytes(len(b))
        return b

    def __len__(self) -> int:
        return self._size

    def close(self) -> None:
        self._f.close()


def _retry_after(resp: requests.Response) -> float | None:
    v = resp.headers.get("Retry-After")
    if v is None:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(v).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class BlobDigestError(RegistryError):
    """A downloaded blob is not the bytes asked for; ``served`` says what came instead."""

    def __init__(self, message: str, *, served: str, url: str):
        super().__init__(message, code="digest_mismatch", url=url)
        self.served = served


def _read_available(raw: Any, n: int) -> bytes:
    """Up to ``n`` bytes of a streamed body, returning as soon as some arrive (so deadlines are
    checked between network reads, however slowly the server sends). urllib3 >= 2 has ``read1``;
    urllib3 1.26 (LoRAX's pin) lacks it, so there the underlying ``http.client`` response's ``read1``
    is used (bodies are refused unless their Content-Encoding is identity, so nothing is decoded)."""
    data: bytes = raw.read1(n, decode_content=False) if hasattr(raw, "read1") else raw._fp.read1(n)
    return data


class RegistryClient:
    """Talks to one registry with one token. ``retries`` extra attempts per request.

    ``sleep`` is injectable for tests; ``max_wait`` caps any single backoff or Retry-After wait.
    ``timeout``: seconds to connect, per read, and for the whole of a JSON answer;
    ``max_json_bytes`` caps a JSON answer; ``download_deadline``: seconds for one blob download.
    """

    def __init__(self, base_url: str, token: str | None = None, *, retries: int = 5, backoff: float = 0.5,
                 max_wait: float = 30.0, timeout: float = 120.0, session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep, max_json_bytes: int = MAX_JSON_BYTES,
                 download_deadline: float = DOWNLOAD_DEADLINE):
        if not base_url.startswith(("http://", "https://")):
            raise InputError(f"`registry` must be an http(s) URL, got {base_url!r}")
        if retries < 0:
            raise InputError(f"`retries` must be >= 0, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.token = token
        if max_json_bytes < 1 or not download_deadline > 0:
            raise InputError(f"`max_json_bytes` ({max_json_bytes}) and `download_deadline` ({download_deadline}) "
                             "must be positive")
        self.retries, self.backoff, self.max_wait, self.timeout = retries, backoff, max_wait, timeout
        self.max_json_bytes, self.download_deadline = max_json_bytes, download_deadline
        self.session = session or requests.Session()
        self._sleep = sleep
        self.retried = 0  # number of retries performed (for reports and tests)

    # -- transport ---------------------------------------------------------------------------
    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {**h, **(extra or {})}

    def _wait(self, attempt: int, hint: float | None) -> None:
        delay = hint if hint is not None else self.backoff * (2 ** attempt) * (0.5 + random.random())
        self.retried += 1
        self._sleep(min(delay, self.max_wait))

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), body: Callable[[], Any] | None = None,
                json_body: Any = None, headers: dict[str, str] | None = None, stream: bool = False,
                on_retry: Callable[[], None] | None = None, read_timeout: float | None = None) -> requests.Response:
        """One API call with retries; ``body`` is a factory so a retried upload re-opens its file.

        ``stream``: the body is left unread (read it with :meth:`read_json` or ``raw.read1``);
        ``read_timeout`` replaces ``timeout`` for each read (not for connecting)."""
        url = self.base_url + path
        timeout = self.timeout if read_timeout is None else (self.timeout, read_timeout)
        for attempt in range(self.retries + 1):
            data = body() if body is not None else None
            try:
                resp = self.session.request(method, url, data=data, json=json_body, headers=self._headers(headers),
                                            timeout=timeout, stream=stream)
            except (requests.ConnectionError, requests.Timeout) as e:
                if attempt == self.retries:
                    raise RegistryError(f"{method} {url}: cannot reach the registry after {attempt + 1} attempts: {e}",
                                        url=url) from None
                if on_retry:
                    on_retry()
                self._wait(attempt, None)
                continue
            finally:
                if data is not None and hasattr(data, "close"):
                    data.close()
            if resp.status_code in ok:
                return resp
            if resp.status_code in RETRY_STATUSES and attempt < self.retries:
                resp.close()
                if on_retry:
                    on_retry()
                self._wait(attempt, _retry_after(resp) if resp.status_code in (429, 503) else None)
                continue
            raise self._error(method, url, resp, streamed=stream)
        raise AssertionError("unreachable")

    def _error(self, method: str, url: str, resp: requests.Response, *, streamed: bool) -> RegistryError:
        """The refusal ``resp`` as a RegistryError (a streamed body is read at most 64 KiB)."""
        code, message = resp.headers.get("X-Soppu-Error-Code"), ""
        try:
            text = self._read_capped(resp, _ERROR_BODY_BYTES, url, what="error body", cut=True) if streamed \
                else resp.content[:_ERROR_BODY_BYTES]
            message = text.decode("utf-8", "replace")[:500]
            err = json.loads(text)["error"]
            code, message = err.get("code"), err.get("message", message)
        except (RegistryError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            pass
        finally:
            resp.close()
        code = code if isinstance(code, str) else None
        message = message if isinstance(message, str) else repr(message)[:500]
        return RegistryError(f"{method} {url}: HTTP {resp.status_code} {code or resp.reason}: {message or resp.reason}",
                             status=resp.status_code, code=code, url=url)

    # -- bounded reads -------------------------------------------------------------------------
    def _read_capped(self, resp: requests.Response, cap: int, url: str, *, what: str, cut: bool = False,
                     deadline: float | None = None) -> bytes:
        """At most ``cap`` bytes of ``resp``'s body within ``deadline`` seconds (default ``timeout``);
        RegistryError ``response_too_large`` beyond ``cap`` (``cut``: return the first ``cap``
        bytes instead), ``deadline`` past the deadline, ``bad_response`` for a Content-Encoding."""
        seconds = self.timeout if deadline is None else deadline
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise RegistryError(f"GET {url}: the registry sent a {what} with Content-Encoding {encoding!r}; "
                                "only identity is accepted", code="bad_response", url=url)
        declared = resp.headers.get("Content-Length", "")
        if not cut and declared.isascii() and declared.isdigit() and int(declared) > cap:
            raise RegistryError(f"GET {url}: the registry declared a {what} of {int(declared)} bytes, over the cap "
                                f"of {cap} bytes; refused before reading it", code="response_too_large", url=url)
        end = time.monotonic() + seconds
        buf = bytearray()
        try:
            while True:
                if time.monotonic() > end:
                    raise RegistryError(f"GET {url}: the registry did not send the whole {what} within the deadline "
                                        f"of {seconds:g} s ({len(buf)} bytes came)", code="deadline", url=url)
                block = _read_available(resp.raw, min(_CHUNK, cap + 1 - len(buf)))
                if not block:
                    return bytes(buf)
                buf += block
                if len(buf) > cap:
                    if cut:
                        return bytes(buf[:cap])
                    raise RegistryError(f"GET {url}: the registry sent a {what} of more than {cap} bytes, over the "
                                        "cap; refused without reading the rest", code="response_too_large", url=url)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            raise RegistryError(f"GET {url}: the connection broke while reading the {what}: {e}",
                                url=url) from None
        finally:
            if len(buf) > cap or cut:
                resp.close()

    def read_json(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), json_body: Any = None,
                  fields: dict[str, type] | None = None) -> tuple[int, dict[str, Any]]:
        """One API call whose answer is a JSON object, read with the caps above: (status, object).
        ``fields`` maps each field it must have to its type (RegistryError ``bad_response`` naming
        the field)."""
        url = self.base_url + path
        resp = self.request(method, path, ok=ok, json_body=json_body, stream=True, headers=_IDENTITY)
        try:
            text = self._read_capped(resp, self.max_json_bytes, url, what="JSON answer")
        finally:
            resp.close()
        try:
            doc = json.loads(text)
        except RecursionError:
            raise RegistryError(f"{method} {url}: the registry answered JSON nested too deeply", code="bad_response",
                                url=url) from None
        except ValueError as e:
            raise RegistryError(f"{method} {url}: the registry answered invalid JSON ({e})", code="bad_response",
                                url=url) from None
        if not isinstance(doc, dict):
            raise RegistryError(f"{method} {url}: the registry answered a JSON {type(doc).__name__}, not an object",
                                code="bad_response", url=url)
        for name, kind in (fields or {}).items():
            if not isinstance(doc.get(name), kind):
                got = "nothing" if name not in doc else f"a {type(doc[name]).__name__}"
                raise RegistryError(f"{method} {url}: the registry's answer has no valid `{name}` (expected a "
                                    f"{kind.__name__}, got {got})", code="bad_response", url=url)
        return resp.status_code, doc

    # -- blobs -------------------------------------------------------------------------------
    def has_blob(self, sha256: str) -> bool:
        return self.request("HEAD", f"/v1/blobs/sha256:{sha256}", ok=(200, 404)).status_code == 200

    def put_blob(self, path: Path, sha256: str, size: int, on_bytes: Callable[[int], None] = lambda n: None) -> bool:
        """Stream one file; True if the server stored it now, False if it already had it."""
        sent: list[_ProgressFile] = []

        def body() -> _ProgressFile:
            f = _ProgressFile(path, size, on_bytes)
            sent.append(f)
            return f

        def rewind() -> None:  # undo the progress of a failed attempt
            on_bytes(-sent[-1].sent)

        resp = self.request("PUT", f"/v1/blobs/sha256:{sha256}", ok=(200, 201), body=body, on_retry=rewind,
                            headers={"Content-Type": "application/octet-stream", "X-Soppu-Size": str(size)})
        return resp.status_code == 201

    def get_blob(self, sha256: str) -> bytes:
        """Download a blob and check its sha256 (RegistryError ``digest_mismatch`` if it differs)."""
        url_path = f"/v1/blobs/sha256:{sha256}"
        data = self.request("GET", url_path).content
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise RegistryError(f"GET {self.base_url}{url_path}: body has sha256:{got}", code="digest_mismatch",
                                url=self.base_url + url_path)
        return data

    def download_blob(self, sha256: str, size: int, dest: Path) -> None:
        """Stream blob ``sha256`` to ``dest``, reading at most ``size`` bytes within
        ``download_deadline`` seconds; RegistryError ``digest_mismatch`` (:class:`BlobDigestError`)
        unless exactly ``size`` bytes with that sha256 came, ``deadline`` when the deadline passed
        (``dest`` removed on every error)."""
        url_path = f"/v1/blobs/sha256:{quote(sha256)}"
        url = self.base_url + url_path
        seconds = self.download_deadline
        end = time.monotonic() + seconds
        # each read waits at most the time left (the overall cut comes within one read of the deadline)
        resp = self.request("GET", url_path, stream=True, headers=_IDENTITY, read_timeout=min(self.timeout, seconds))
        h, n = hashlib.sha256(), 0
        try:
            encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise RegistryError(f"GET {url}: the registry sent the blob with Content-Encoding {encoding!r}; only "
                                    "identity is accepted", code="bad_response", url=url)
            with open(dest, "wb") as f:
                while n <= size:
                    if time.monotonic() > end:
                        raise RegistryError(f"GET {url}: the download passed its deadline of {seconds:g} s after "
                                            f"{n} of {size} bytes; refused", code="deadline", url=url)
                    try:
                        block = _read_available(resp.raw, min(1 << 20, size + 1 - n))
                    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError) as e:
                        if time.monotonic() > end:
                            raise RegistryError(f"GET {url}: the download passed its deadline of {seconds:g} s after "
                                                f"{n} of {size} bytes; refused", code="deadline", url=url) from None
                        raise RegistryError(f"GET {url}: the connection broke after {n} of {size} bytes: {e}",
                                            url=url) from None
                    if not block:
                        break
                    n += len(block)
                    if n > size:
                        break
                    h.update(block)
                    f.write(block)
        except BaseException:
            Path(dest).unlink(missing_ok=True)
            raise
        finally:
            resp.close()
        if n != size or not hmac.compare_digest(h.hexdigest(), sha256):
            Path(dest).unlink(missing_ok=True)
            got = f"more than {size} bytes" if n > size else f"{n} bytes with sha256 {h.hexdigest()}"
            raise BlobDigestError(f"GET {self.base_url}{url_path}: served {got}, expected {size} bytes with sha256 "
                                  f"{sha256}", served=got, url=self.base_url + url_path)

    # -- adapters, keys, bases ---------------------------------------------------------------
    def publish(self, owner: str, name: str, version: int, signature_doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """PUT one version; returns (201 created | 200 identical, the version document)."""
        return self.read_json("PUT", f"/v1/adapters/{quote(owner)}/{quote(name)}/versions/{version}",
                              ok=(200, 201), json_body={"signature": signature_doc})

    def publish_bundle(self, owner: str, version: int, signature_doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """PUT every adapter of a signed bundle in one request; returns (201 some created | 200 all
        identical, ``{"owner", "version", "base_model", "adapters": {name: "created" | "unchanged"}}``)."""
        return self.read_json("PUT", f"/v1/bundles/{quote(owner)}/versions/{version}",
                              ok=(200, 201), json_body={"signature": signature_doc}, fields={"adapters": dict})

    def get_version(self, owner: str, name: str, version: int | None = None, *,
                    signature_ref: bool = False) -> dict[str, Any]:
        """The version record (a JSON object; its fields are checked by ``fetch.resolve_version``).
        ``signature_ref``: ask for the signature document by digest (``signature_sha256``, see
        :meth:`get_signature`); a registry that predates it answers the whole record."""
        path = f"/v1/adapters/{quote(owner)}/{quote(name)}" + (f"/versions/{version}" if version is not None else "")
        return self.read_json("GET", path + ("?signature=ref" if signature_ref else ""))[1]

    def get_signature(self, sha256: str) -> dict[str, Any]:
        """The published signature document whose stored bytes have ``sha256`` (read with the JSON
        caps); RegistryError ``digest_mismatch`` unless the bytes hash to it, ``bad_response`` unless
        they are a JSON object."""
        path = f"/v1/signatures/sha256:{quote(sha256)}"
        url = self.base_url + path
        resp = self.request("GET", path, stream=True, headers=_IDENTITY)
        try:
            body = self._read_capped(resp, self.max_json_bytes, url, what="signature document")
        finally:
            resp.close()
        got = hashlib.sha256(body).hexdigest()
        if not hmac.compare_digest(got, sha256):
            raise RegistryError(f"GET {url}: the registry served a signature document with sha256 {got}; refused",
                                code="digest_mismatch", url=url)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise RegistryError(f"GET {url}: the signature document is not JSON ({e})", code="bad_response",
                                url=url) from None
        if not isinstance(doc, dict):
            raise RegistryError(f"GET {url}: the signature document is not a JSON object", code="bad_response",
                                url=url)
        return doc

    def list_versions(self, owner: str, name: str) -> list[int]:
        path = f"/v1/adapters/{quote(owner)}/{quote(name)}/versions"
        versions: list[int] = self.read_json("GET", path, fields={"versions": list})[1]["versions"]
        if not all(type(v) is int for v in versions):
            raise RegistryError(f"GET {self.base_url}{path}: the registry's answer has no valid `versions` (expected "
                                "a list of integers)", code="bad_response", url=self.base_url + path)
        return versions

    def get_keys(self, owner: str) -> list[dict[str, Any]]:
        """The owner's keys; RegistryError ``bad_response`` unless a list of objects."""
        path = f"/v1/keys/{quote(owner)}"
        keys: list[dict[str, Any]] = self.read_json("GET", path, fields={"keys": list})[1]["keys"]
        if not all(isinstance(k, dict) for k in keys):
            raise RegistryError(f"GET {self.base_url}{path}: the registry's answer has no valid `keys` (expected a "
                                "list of objects)", code="bad_response", url=self.base_url + path)
        return keys

    def registered_key(self, owner: str, key_id: str | None) -> Ed25519PublicKey:
        """The registered public key ``key_id`` of ``owner`` (SignatureError if it is not one of theirs).

        Active and rotated keys both count (the registry refuses new versions signed by a rotated
        key, so a version signed by one was published before the rotation). The id is recomputed
        from the key bytes, so a registry cannot pass off another key under it."""
        return find_registered_key(self.get_keys(owner), owner, key_id)

    def get_bases(self, base_model: str) -> list[dict[str, Any]]:
        path = f"/v1/bases/{quote(base_model, safe='/')}"
        bases: list[dict[str, Any]] = self.read_json("GET", path, fields={"bases": list})[1]["bases"]
        return bases

    # -- the upload flow ---------------------------------------------------------------------
    def upload_bundle(self, bundle_dir: Path, *, verify_local: bool = True, progress: bool = False,
                      jobs: int = 4) -> UploadResult:
        """Upload a signed bundle: the blobs the registry lacks (``jobs`` at a time), then one batch
        publish of every adapter (``PUT /v1/bundles/<owner>/versions/<v>``, one transaction).

        With ``verify_local`` the bundle is first checked against its own signature.json
        (SignatureError on any tampered, missing or extra file) so nothing broken is sent.
        """
        bundle_dir = Path(bundle_dir)
        doc = signing.read_signature(bundle_dir)
        if verify_local:
            embedded = doc.get("public_key")
            if not isinstance(embedded, str):
                raise SignatureError(f"{bundle_dir / SIGNATURE} has no `public_key`")
            st = signing.verify_bundle(bundle_dir, embedded.encode())
        else:
            st = doc.get("statement")  # type: ignore[assignment]  # checked just below
            if not isinstance(st, dict) or not isinstance(st.get("files"), list):
                raise SignatureError(f"{bundle_dir / SIGNATURE} has no statement with `files`")
        result = UploadResult(owner=st["owner"], version=st["version"], base_model=st.get("base_model", ""))
        missing = []
        for f in st["files"]:  # HEAD first: blobs already there (an interrupted upload's) are skipped
            if self.has_blob(f["sha256"]):
                result.skipped.append(f["path"])
            else:
                missing.append(f)
        bar = _progress_bar(sum(f["size"] for f in missing), progress)
        lock = threading.Lock()

        def on_bytes(n: int) -> None:
            with lock:
                bar.update(n)

        def send(f: dict[str, Any]) -> None:
            self.put_blob(bundle_dir / f["path"], f["sha256"], f["size"], on_bytes)
            with lock:
                bar.set_postfix_str(f["path"], refresh=False)
                result.uploaded.append(f["path"])
                result.bytes_uploaded += f["size"]

        try:
            with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(missing) or 1))) as pool:
                futures = [pool.submit(send, f) for f in missing]
                try:
                    for fut in as_completed(futures):
                        fut.result()  # the first failure stops the upload (publish never runs)
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
        finally:
            bar.close()
        result.uploaded.sort(key=[f["path"] for f in missing].index)
        _, body = self.publish_bundle(st["owner"], st["version"], doc)
        adapters = body["adapters"]
        if sorted(adapters) != sorted(st["adapters"]):
            url = f"{self.base_url}/v1/bundles/{quote(st['owner'])}/versions/{st['version']}"
            raise RegistryError(f"PUT {url}: the registry's answer lists adapters {sorted(adapters)}, "
                                f"not the bundle's {st['adapters']}", code="bad_response", url=url)
        result.adapters = {name: "created" if adapters[name] == "created" else "unchanged" for name in st["adapters"]}
        return result


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=not enabled or total == 0, desc="upload", leave=False)


def find_registered_key(keys: list[dict[str, Any]], owner: str, key_id: Any) -> Ed25519PublicKey:
    """The key ``key_id`` in ``keys`` (a ``GET /v1/keys/<owner>`` listing), its id recomputed from
    the key bytes (so no entry passes off another key under that id); SignatureError ``unknown_key``."""
    for k in keys:
        if k.get("key_id") == key_id and isinstance(k.get("public_key"), str):
            try:
                pub = signing.load_public_key(k["public_key"].encode())
            except (SignatureError, InputError, ValueError):
                continue  # a malformed entry is no key
            if signing.public_key_id(pub) == key_id:
                return pub
    raise SignatureError(f"the signature names key {key_id!r}, which is not a registered key of owner {owner!r}",
                         code="unknown_key")


def verify_rotation_proof(proof: Any, owner: str, old_key: Ed25519PublicKey) -> str:
    """The new key id that ``proof`` (as made by :func:`make_rotation_proof`) lets ``old_key`` hand
    ``owner``'s trust to; SignatureError (code ``bad_proof``) unless ``old_key`` signed exactly
    ``{"format": "soppu-key-rotation/1", "owner": owner, "new_key_id": ...}``."""
    if not isinstance(proof, dict):
        raise SignatureError("rotation proof is not a JSON object", code="bad_proof")
    try:
        statement = signing._check_signature(proof, old_key)  # the one envelope check (key id, Ed25519)
    except SignatureError as e:
        raise SignatureError(f"rotation proof does not verify: {e}", code="bad_proof") from None
    new_id = statement.get("new_key_id") if isinstance(statement, dict) else None
    if set(statement) != {"format", "owner", "new_key_id"} or statement.get("format") != ROTATION_FORMAT \
            or statement.get("owner") != owner or not isinstance(new_id, str):
        raise SignatureError(f"rotation proof statement is not a {ROTATION_FORMAT} statement for owner {owner!r}",
                             code="bad_proof")
    return new_id


def make_rotation_proof(owner: str, old_private_key: Ed25519PrivateKey,
                        new_public_key: Ed25519PublicKey | Path | str | bytes) -> dict[str, Any]:
    """The statement `soppu-registry rotate-key` needs: the old key signs the new key's id.

    Returns ``{"statement": {"format": "soppu-key-rotation/1", "owner", "new_key_id"},
    "signature", "key_id", "public_key"}`` (same envelope as signature.json).
    """
    new_id = signing.public_key_id(signing.load_public_key(new_public_key))
    statement = {"format": ROTATION_FORMAT, "owner": owner, "new_key_id": new_id}
    return signing.sign_statement(statement, old_private_key)
