"""`soppu-registry`: run the registry and administer its state.

Every command takes the state's location: ``--data DIR`` (sqlite+dir, the default), or
``--database postgresql://... --blobs s3://BUCKET?endpoint=...`` (postgres+s3, shared by replicas;
S3 credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION; ``--data`` is then
optional scratch for partial uploads). Written ``--data DIR`` below.

    soppu-registry init --data DIR                   create the schema (and the bucket if absent)
    soppu-registry serve --data DIR [--host 127.0.0.1] [--port 8080] [--max-blob-bytes N]
                         [--rate R] [--burst B] [--max-auth-failures N] [--max-unpublished-bytes N]
                         [--max-publish-bytes N] [--max-rank K] [--header-timeout S]
                         [--body-idle-timeout S] [--max-connections N]
    soppu-registry create-owner --data DIR OWNER
    soppu-registry register-key --data DIR --owner OWNER --public-key PUB
    soppu-registry rotate-key --data DIR --owner OWNER --new-public-key PUB --proof FILE
    soppu-registry issue-token --data DIR [--owner OWNER] --scope SCOPE [--scope ...] [--label L]
    soppu-registry revoke-token --data DIR TOKEN_ID
    soppu-registry list-tokens --data DIR
    soppu-registry gc --data DIR [--grace 24h] [--dry-run]

Every command takes ``--json`` (one JSON object on stdout, ``{"ok": false, "error": {...}}`` on
failure) and follows soppu_client.format.reporting: failures print ``error: ...`` on stderr and
exit 1 (refused: 403, 409, ...) or 2 (bad input: 400, unknown owner or token).

Admin commands open the database directly (safe while servers run: SQLite WAL mode, or PostgreSQL
with the same write lock the servers take), so a revoked token stops working on its next request.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any

import click

from soppu_client.format import signing
from soppu_client.format.errors import InputError, SoppuError
from soppu_client.format.names import ROTATION_FORMAT
from soppu_client.format.reporting import emit, json_option, reporting
from soppu_registry.auth import SCOPES, issue_token
from soppu_registry.errors import ApiError
from soppu_registry.storage import Storage


@dataclass(frozen=True)
class Location:
    """Where a registry's state lives: ``--data`` and/or ``--database`` + ``--blobs``."""

    data_dir: Path | None
    database: str | None
    blobs: str | None

    def check(self) -> None:
        if self.data_dir is None and (self.database is None or self.blobs is None):
            raise InputError("give --data DIR (sqlite+dir), or --database postgresql://... and --blobs s3://... (postgres+s3)")


def _service_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, sqlite3.Error, ValueError]
    try:
        import psycopg
        errors.append(psycopg.Error)
    except ImportError:
        pass
    try:
        from botocore.exceptions import BotoCoreError, ClientError
        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    return tuple(errors)


def _open(loc: Location, *, create_bucket: bool = False) -> Storage:
    """The location's Storage; an unusable path, a bad URL or an unreachable service is bad input
    (exit 2) with a one-line message, not a traceback."""
    loc.check()
    try:
        return Storage(loc.data_dir, database=loc.database, blobs=loc.blobs, create_bucket=create_bucket)
    except _service_errors() as e:
        what = f"registry data directory {loc.data_dir}" if loc.database is None and loc.blobs is None else "registry storage"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"cannot open {what}: {first}; check --data / --database / --blobs") from None


def storage_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add --data, --database, --blobs; the command receives them as ``loc: Location``."""
    @click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
                  help="Registry data directory: SQLite database and blobs (sqlite+dir); with --database "
                       "and --blobs only this process's partial uploads and cache.")
    @click.option("--database", default=None, envvar="SOPPU_REGISTRY_DATABASE", show_envvar=True,
                  help="postgresql://user:password@host:port/dbname: shared metadata (postgres+s3).")
    @click.option("--blobs", default=None, envvar="SOPPU_REGISTRY_BLOBS", show_envvar=True,
                  help="s3://BUCKET[/PREFIX]?endpoint=http://HOST:PORT: shared blob store; credentials "
                       "from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION.")
    @wraps(f)
    def wrapper(*args: Any, data_dir: Path | None, database: str | None, blobs: str | None, **kw: Any) -> Any:
        return f(*args, loc=Location(data_dir, database, blobs), **kw)
    return wrapper


data_option = storage_options


def _raw_b64(pub: Any) -> str:
    from cryptography.hazmat.primitives import serialization
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


@click.group()
def main() -> None:
    """SOPPU registry server and admin commands."""


@main.command()
@data_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--max-blob-bytes", default=1 << 30, show_default=True, type=click.IntRange(min=1),
              help="Largest blob accepted; enforced while streaming (413).")
@click.option("--rate", default=100.0, show_default=True, type=float,
              help="Per-token refill rate, requests/s (0 disables rate limiting).")
@click.option("--burst", default=1000.0, show_default=True, type=click.FloatRange(min=1),
              help="Per-token bucket capacity.")
@click.option("--max-auth-failures", default=20, show_default=True, type=click.IntRange(min=0),
              help="Failed authentications of one credential from one client address per minute, checked "
                   "before the lookup (429 for that credential past it; 0 disables the failed-auth limiter).")
@click.option("--max-address-auth-failures", default=200, show_default=True, type=click.IntRange(min=0),
              help="Failed authentications per client address per minute over all credentials (429 past it, "
                   "except for tokens this process has seen authenticate; 0 disables this level).")
@click.option("--max-unpublished-bytes", default=1 << 30, show_default=True, type=click.IntRange(min=0),
              help="Per-owner quota on uploaded blob bytes no published version of the owner lists "
                   "(413 quota_exceeded; 0 disables).")
@click.option("--max-publish-bytes", default=1 << 20, show_default=True, type=click.IntRange(min=1),
              help="Largest publish body (the signature document); 413 from Content-Length or while reading.")
@click.option("--max-rank", default=256, show_default=True, type=click.IntRange(min=1),
              help="Largest basis rank k a published bundle may have (400 bad_manifest).")
@click.option("--max-served-params", default=1 << 28, show_default=True, type=click.IntRange(min=1),
              help="Largest number of parameters one adapter of a published bundle becomes when a host "
                   "materializes it: sum of k x (d_out + d_in) over its modules (400 bad_manifest).")
@click.option("--header-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a connection may take to send its request headers; then it is closed.")
@click.option("--body-idle-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds an upload may go without a body chunk: 408 body_timeout, partial upload removed.")
@click.option("--max-connections", default=512, show_default=True, type=click.IntRange(min=1),
              help="Open connections; past it a new one displaces the oldest still waiting for its headers, "
                   "else gets 503. Needs this + 2 x min(this, 128) + 64 open files (`ulimit -n`).")
@click.option("--log-level", default="warning", show_default=True)
@json_option
def serve(loc: Location, host: str, port: int, max_blob_bytes: int, rate: float, burst: float,
          max_auth_failures: int, max_unpublished_bytes: int, log_level: str, as_json: bool,
          **limits: Any) -> None:
    """Serve the registry API over HTTP: one process per data dir (sqlite+dir), or any number of
    stateless replicas sharing --database and --blobs (postgres+s3). ``limits``: the connection,
    time, body and rank limits, passed to RegistryConfig under the same names."""
    from filelock import FileLock, Timeout

    from soppu_registry import server
    from soppu_registry.app import create_app
    from soppu_registry.config import RegistryConfig

    with reporting(as_json):
        store = _open(loc)
        data_dir = store.root
        lock = FileLock(str(data_dir / "serve.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise SoppuError(f"another `soppu-registry serve` is using {data_dir}; stop it or pick another --data") from None
        removed = store.cleanup_tmp()
        if removed:
            click.echo(f"removed {removed} partial upload(s) left in {store.tmp_dir}", err=True)
        app = create_app(RegistryConfig(data_dir, database=loc.database, blobs=loc.blobs, max_blob_bytes=max_blob_bytes, rate=rate, burst=burst,
                                        max_auth_failures=max_auth_failures,
                                        max_unpublished_bytes=max_unpublished_bytes, **limits))
        server.check_open_files(app.state.registry.config.max_connections)
        url = f"http://{host}:{port}"
        if as_json:
            emit(True, {"data_dir": data_dir, "backend": store.backend, "storage": store.describe(), "url": url,
                        "removed_partial_uploads": removed}, "")
        else:
            click.echo(f"soppu-registry serving {store.describe()} on {url}", err=True)
    server.run(app, app.state.registry.config, host, port, log_level)


@main.command("init")
@data_option
@json_option
def init(loc: Location, as_json: bool) -> None:
    """Create the registry's tables (and the S3 bucket when absent); idempotent."""
    with reporting(as_json):
        store = _open(loc, create_bucket=True)
        emit(as_json, {"backend": store.backend, "storage": store.describe()}, f"initialized {store.describe()}")


@main.command("create-owner")
@data_option
@click.argument("owner")
@json_option
def create_owner(loc: Location, owner: str, as_json: bool) -> None:
    """Create an owner (namespace for adapters)."""
    with reporting(as_json):
        _open(loc).create_owner(owner)
        emit(as_json, {"owner": owner}, f"created owner {owner}")


@main.command("register-key")
@data_option
@click.option("--owner", required=True)
@click.option("--public-key", "public_key", required=True, help="PEM .pub file or base64 of the raw key.")
@json_option
def register_key(loc: Location, owner: str, public_key: str, as_json: bool) -> None:
    """Register an owner's first signing key (later keys need rotate-key)."""
    with reporting(as_json):
        pub = signing.load_public_key(public_key)
        key_id = signing.public_key_id(pub)
        _open(loc).add_key(owner, key_id, _raw_b64(pub))
        emit(as_json, {"owner": owner, "key_id": key_id}, f"registered key {key_id} for owner {owner}")


def verify_rotation_proof(store: Storage, owner: str, new_key_id: str, proof: Any) -> str:
    """Check a rotation proof against the owner's active key; return the old key id."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(proof, dict) or not isinstance(proof.get("statement"), dict) \
            or not isinstance(proof.get("signature"), str) or not isinstance(proof.get("key_id"), str):
        raise ApiError(400, "bad_proof", "proof must be {\"statement\", \"signature\", \"key_id\"} as written by `soppu rotate-key-proof`")
    st, old_id = proof["statement"], proof["key_id"]
    want = {"format": ROTATION_FORMAT, "owner": owner, "new_key_id": new_key_id}
    if st != want:
        raise ApiError(400, "bad_proof", f"proof statement {st!r} does not match {want!r}")
    active = {k["key_id"]: k["public_key"] for k in store.keys(owner) if k["status"] == "active"}
    if old_id not in active:
        raise ApiError(403, "unknown_key", f"proof is signed by {old_id}, which is not an active key of owner {owner!r} (active: {sorted(active)})")
    sig = signing.b64decode_canonical(proof["signature"], 64)
    if sig is None:
        raise ApiError(400, "bad_proof", "proof `signature` is not canonical base64 of 64 bytes (padded, no whitespace, "
                                         "unused bits zero); write the proof again with `soppu rotate-key-proof`")
    try:
        signing.load_public_key(active[old_id].encode()).verify(sig, signing.canonical_json(st))
    except (InvalidSignature, ValueError):
        raise ApiError(403, "bad_signature", f"proof signature does not verify with the active key {old_id}") from None
    return old_id


@main.command("rotate-key")
@data_option
@click.option("--owner", required=True)
@click.option("--new-public-key", "new_public_key", required=True, help="PEM .pub file or base64 of the raw key.")
@click.option("--proof", "proof_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="JSON proof signed by the current key (`soppu rotate-key-proof`).")
@json_option
def rotate_key(loc: Location, owner: str, new_public_key: str, proof_path: Path, as_json: bool) -> None:
    """Replace the owner's key; the old key must sign the change."""
    with reporting(as_json):
        store = _open(loc)
        pub = signing.load_public_key(new_public_key)
        new_id = signing.public_key_id(pub)
        try:
            proof = json.loads(proof_path.read_text())
        except OSError as e:
            raise InputError(f"cannot read --proof {proof_path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ApiError(400, "bad_proof", f"{proof_path} is not JSON: {e}") from None
        old_id = verify_rotation_proof(store, owner, new_id, proof)
        store.add_key(owner, new_id, _raw_b64(pub), replaces=old_id, proof=proof)
        emit(as_json, {"owner": owner, "old_key_id": old_id, "new_key_id": new_id},
             f"rotated owner {owner}: {old_id} -> {new_id}")


@main.command("issue-token")
@data_option
@click.option("--owner", default=None, help="Owner the token acts for (not for serving-read).")
@click.option("--scope", "scopes", multiple=True, required=True, type=click.Choice(SCOPES))
@click.option("--label", default=None, help="Free text to recognise the token by.")
@json_option
def issue_token_cmd(loc: Location, owner: str | None, scopes: tuple[str, ...], label: str | None, as_json: bool) -> None:
    """Create a token. It is printed once (text: alone on stdout); only its sha256 is stored."""
    with reporting(as_json):
        token_id, token = issue_token(_open(loc), owner, list(scopes), label)
        emit(as_json, {"token_id": token_id, "token": token, "owner": owner, "scopes": sorted(scopes)}, token)
        if not as_json:
            click.echo(f"token id {token_id} ({', '.join(sorted(scopes))}); store it now, it is not shown again", err=True)


@main.command("revoke-token")
@data_option
@click.argument("token_id")
@json_option
def revoke_token(loc: Location, token_id: str, as_json: bool) -> None:
    """Revoke a token by id (takes effect on its next request)."""
    with reporting(as_json):
        _open(loc).revoke_token(token_id)
        emit(as_json, {"token_id": token_id}, f"revoked token {token_id}")


@main.command("list-tokens")
@data_option
@json_option
def list_tokens(loc: Location, as_json: bool) -> None:
    """List tokens: ids, owners, scopes, labels, dates; never secrets."""
    with reporting(as_json):
        tokens = _open(loc).list_tokens()
        emit(as_json, {"tokens": tokens}, "\n".join(_token_line(t) for t in tokens) or "no tokens")


def _token_line(t: dict[str, Any]) -> str:
    state = f"revoked {t['revoked_at']}" if t["revoked_at"] else "active"
    label = f"  label {t['label']!r}" if t["label"] else ""
    return f"{t['token_id']}  owner {t['owner'] or '-'}  scopes {t['scopes']}  created {t['created_at']}  {state}{label}"


def _seconds(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``24h``, ``7d`` -> seconds."""
    span = signing.parse_duration(text)
    if span is None:
        raise InputError(f"--grace {text!r} is not a duration such as 90s, 30m, 24h or 7d")
    return span.total_seconds()


@main.command("gc")
@data_option
@click.option("--grace", default="24h", show_default=True,
              help="Keep unpublished blobs touched (uploaded, re-sent or HEAD-checked) within this long: 90s, 30m, 24h, 7d.")
@click.option("--dry-run", is_flag=True, help="Report what would be removed; remove nothing.")
@json_option
def gc(loc: Location, grace: str, dry_run: bool, as_json: bool) -> None:
    """Remove blobs that no published version lists (abandoned uploads) once past the grace period.

    Safe while `soppu-registry serve` runs (any number of replicas): each removal is one write
    transaction, serialized with publishing, and a blob a client has just checked or re-sent is
    kept. With several replicas, run it from one place on a schedule (docs/DEPLOY.md).
    """
    with reporting(as_json):
        grace_s = _seconds(grace)
        loc.check()
        if loc.database is None and loc.data_dir is not None and not (loc.data_dir / "registry.sqlite3").is_file():
            raise InputError(f"{loc.data_dir} is not a registry data directory (no registry.sqlite3); check --data")
        report = _open(loc).gc_blobs(grace_s, dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        emit(as_json, {"grace_seconds": grace_s, **report},
             f"{verb} {len(report['removed'])} unpublished blob(s), {report['bytes']:,} bytes; kept "
             f"{report['kept_referenced']} published and {report['kept_recent']} within the grace period")


if __name__ == "__main__":
    main()
