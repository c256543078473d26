"""Where blob bytes live: a local directory or an S3-compatible bucket, behind one small protocol.

Blobs are immutable and named by their sha256 (key ``[prefix/]sha256/ab/<hex>``), so a put of the
same key always writes the same bytes and concurrent puts cannot disagree. The store never decides
anything: ``Storage`` verifies size and sha256 while streaming to a local temp file, puts, then
confirms the stored size inside the write transaction that records ownership; gc asks ``stat``
(size, mtime) inside its own write transaction before ``delete``.

``touch`` says whether the blob is there and, for a dir, restarts its mtime (utime). On S3 it only
checks (a copy onto itself would rewrite a large object): gc also counts the owners' ``touched_at``
rows, which every PUT and owner HEAD refresh, so the grace period never depends on LastModified
alone. ``local_path`` gives a file the checks can open: the blob itself (dir) or a verified copy
in a local cache (S3; an upload leaves its temp file there).
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from soppu_client.format.fsutil import fsync_dir
from soppu_client.format.names import HEX64_RE

CHUNK = 1 << 16


class BlobStore(Protocol):
    url: str
    local_stat: bool  # stat is a local syscall (dir), not a network round trip (S3 HEAD)

    def stat(self, hex_digest: str) -> tuple[int, float] | None: ...  # (size, mtime) or None
    def put(self, hex_digest: str, src: Path) -> None: ...  # src: verified local file, consumed
    def touch(self, hex_digest: str) -> bool: ...  # False when the blob is absent
    def delete(self, hex_digest: str) -> None: ...
    def list(self) -> Iterator[str]: ...  # hex digests of every stored blob
    def local_path(self, hex_digest: str) -> Path: ...
    def local_file(self, hex_digest: str) -> Path | None: ...  # the stored file itself (dir) or None
    def iter_bytes(self, hex_digest: str) -> Iterator[bytes]: ...


class DirBlobStore:
    """``<dir>/ab/<hex>``; every put is an fsynced temp file renamed into place, then fsync(dir)."""

    local_stat = True

    def __init__(self, blob_dir: Path):
        self.dir = Path(blob_dir)
        self.url = str(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, hex_digest: str) -> Path:
        return self.dir / hex_digest[:2] / hex_digest

    def stat(self, hex_digest: str) -> tuple[int, float] | None:
        try:
            st = self.path(hex_digest).stat()
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime

    def put(self, hex_digest: str, src: Path) -> None:
        final = self.path(hex_digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, final)  # atomic within one file system; src is fsynced by the writer
        fsync_dir(final.parent)

    def touch(self, hex_digest: str) -> bool:
        try:
            os.utime(self.path(hex_digest))
            return True
        except FileNotFoundError:
            return False

    def delete(self, hex_digest: str) -> None:
        p = self.path(hex_digest)
        p.unlink(missing_ok=True)
        fsync_dir(p.parent)

    def list(self) -> Iterator[str]:
        for p in sorted(self.dir.glob("*/*")):
            if HEX64_RE.match(p.name) and p.parent.name == p.name[:2]:
                yield p.name

    def local_path(self, hex_digest: str) -> Path:
        return self.path(hex_digest)

    def local_file(self, hex_digest: str) -> Path | None:
        return self.path(hex_digest)

    def iter_bytes(self, hex_digest: str) -> Iterator[bytes]:
        with open(self.path(hex_digest), "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


class S3BlobStore:
    """An S3-compatible bucket (AWS, MinIO, SeaweedFS ...) through boto3, path-style addressing.

    Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION or
    any source boto3 reads). ``cache_dir`` keeps verified local copies for the registry's checks,
    bounded by ``cache_bytes`` (oldest-used evicted first).
    """

    local_stat = False

    def __init__(self, url: str, cache_dir: Path, cache_bytes: int = 1 << 30, *, create_bucket: bool = False):
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        u = urlsplit(url)
        if u.scheme != "s3" or not u.netloc:
            raise ValueError(f"--blobs {url!r} must be s3://BUCKET[/PREFIX][?endpoint=http://HOST:PORT&region=R]")
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        unknown = set(q) - {"endpoint", "region"}
        if unknown:
            raise ValueError(f"--blobs {url!r}: unknown parameter(s) {sorted(unknown)}; allowed: endpoint, region")
        self.url, self.bucket = url, u.netloc
        self.prefix = u.path.strip("/") + "/" if u.path.strip("/") else ""
        self.endpoint = q.get("endpoint")
        self.client = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=q.get("region") or os.environ.get("AWS_REGION") or "us-east-1",
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=64, connect_timeout=10,
                          read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}))
        self.cache_dir, self.cache_bytes = Path(cache_dir), cache_bytes
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._cache_lock = threading.Lock()
        self._cached = sum(p.stat().st_size for p in self.cache_dir.iterdir() if HEX64_RE.match(p.name))
        where = f"{self.bucket} at {self.endpoint or 'AWS'}"
        try:
            if create_bucket:
                try:
                    self.client.head_bucket(Bucket=self.bucket)
                except ClientError:
                    self.client.create_bucket(Bucket=self.bucket)
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            hint = "create it (or run `soppu-registry init`)" if code in ("404", "NoSuchBucket") else \
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions"
            raise ConnectionError(f"cannot use S3 bucket {where}: {code or e}; {hint}") from None
        except BotoCoreError as e:
            raise ConnectionError(f"cannot reach S3 bucket {where}: {e}") from None

    def key(self, hex_digest: str) -> str:
        return f"{self.prefix}sha256/{hex_digest[:2]}/{hex_digest}"

    def _missing(self, e: Exception) -> bool:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def stat(self, hex_digest: str) -> tuple[int, float] | None:
        try:
            h = self.client.head_object(Bucket=self.bucket, Key=self.key(hex_digest))
        except self._errors as e:
            if self._missing(e):
                return None
            raise
        return int(h["ContentLength"]), h["LastModified"].timestamp()

    def put(self, hex_digest: str, src: Path) -> None:
        """Upload (one atomic PUT, or a multipart upload that appears only when complete), then
        keep ``src`` as the cache copy."""
        self.client.upload_file(str(src), self.bucket, self.key(hex_digest))
        self._adopt(hex_digest, src)

    def touch(self, hex_digest: str) -> bool:
        """Present? (freshness is the owners' ``touched_at``; see the module docstring)"""
        return self.stat(hex_digest) is not None

    def delete(self, hex_digest: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(hex_digest))
        with self._cache_lock:
            try:
                size = (self.cache_dir / hex_digest).stat().st_size
                (self.cache_dir / hex_digest).unlink()
                self._cached -= size
            except FileNotFoundError:
                pass

    def list(self) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}sha256/")
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"].rsplit("/", 2)
                if len(name) == 3 and HEX64_RE.match(name[2]) and name[1] == name[2][:2]:
                    yield name[2]

    def iter_bytes(self, hex_digest: str) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self.key(hex_digest))["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def local_file(self, hex_digest: str) -> Path | None:
        return None

    def local_path(self, hex_digest: str) -> Path:
        """A local copy whose sha256 was checked (downloaded once; kept in the bounded cache)."""
        dest = self.cache_dir / hex_digest
        if dest.is_file():
            os.utime(dest)
            return dest
        tmp = self.cache_dir / f".{hex_digest[:16]}.{uuid.uuid4().hex}.part"
        h = hashlib.sha256()
        try:
            with open(tmp, "xb") as f:
                for chunk in self.iter_bytes(hex_digest):
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != hex_digest:
                raise OSError(f"object {self.key(hex_digest)} in bucket {self.bucket} does not hash to its name")
            self._adopt(hex_digest, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _adopt(self, hex_digest: str, src: Path) -> None:
        """Move a verified file into the cache; past the bound, evict the least recently used down
        to 3/4 of it (one directory scan per eviction round, not per file)."""
        dest = self.cache_dir / hex_digest
        size = src.stat().st_size
        with self._cache_lock:
            new = not dest.exists()
            os.replace(src, dest)
            self._cached += size if new else 0
            if self._cached <= self.cache_bytes:
                return
            files = sorted((p.stat().st_mtime, p.stat().st_size, p) for p in self.cache_dir.iterdir()
                           if HEX64_RE.match(p.name) and p.name != hex_digest)
            self._cached = size + sum(s for _, s, _ in files)
            for _, s, p in files:
                if self._cached <= self.cache_bytes * 3 // 4:
                    break
                p.unlink(missing_ok=True)
                self._cached -= s


def open_blobs(url: str, cache_dir: Path, *, create_bucket: bool = False) -> Any:
    """``s3://BUCKET[/PREFIX]?endpoint=...`` -> S3BlobStore (anything else is refused)."""
    if not url.startswith("s3://"):
        raise ValueError(f"--blobs {url!r} must be s3://BUCKET[/PREFIX]?endpoint=http://HOST:PORT (leave it out to keep blobs in --data)")
    return S3BlobStore(url, cache_dir, create_bucket=create_bucket)
