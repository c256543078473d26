"""`soppu-registry`: run the registry and administer its data dir.

    soppu-registry serve --data DIR [--host 127.0.0.1] [--port 8080] [--max-blob-bytes N]
                         [--rate R] [--burst B]
    soppu-registry create-owner --data DIR OWNER
    soppu-registry register-key --data DIR --owner OWNER --public-key PUB
    soppu-registry rotate-key --data DIR --owner OWNER --new-public-key PUB --proof FILE
    soppu-registry issue-token --data DIR [--owner OWNER] --scope SCOPE [--scope ...] [--label L]
    soppu-registry revoke-token --data DIR TOKEN_ID
    soppu-registry list-tokens --data DIR
    soppu-registry gc --data DIR [--grace 24h] [--dry-run] [--json]

Admin commands open the SQLite database directly (safe while a server runs: WAL mode), so a
revoked token stops working on its next request. Exit codes: 0 ok, 1 refused, 2 bad input.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from pathlib import Path
from typing import Any

import click

from soppu_client.format import signing
from soppu_client.format.errors import SoppuError

from soppu_registry.auth import SCOPES, issue_token
from soppu_registry.storage import ApiError, Storage

ROTATION_FORMAT = "soppu-key-rotation/1"

data_option = click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                           help="Registry data directory (SQLite database and blobs).")


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _run(fn: Any) -> Any:
    try:
        return fn()
    except ApiError as e:
        _fail(e.message, 2 if e.status in (400, 404) else 1)
    except SoppuError as e:
        _fail(str(e), e.exit_code)


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
@click.option("--log-level", default="warning", show_default=True)
def serve(data_dir: Path, host: str, port: int, max_blob_bytes: int, rate: float, burst: float, log_level: str) -> None:
    """Serve the registry API over HTTP (one process per data dir)."""
    import uvicorn
    from filelock import FileLock, Timeout

    from soppu_registry.app import RegistryConfig, create_app

    data_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(data_dir / "serve.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _fail(f"another `soppu-registry serve` is using {data_dir}")
    store = Storage(data_dir)
    removed = store.cleanup_tmp()
    if removed:
        click.echo(f"removed {removed} partial upload(s) left in {store.tmp_dir}", err=True)
    app = create_app(RegistryConfig(data_dir, max_blob_bytes=max_blob_bytes, rate=rate, burst=burst))
    click.echo(f"soppu-registry serving {data_dir} on http://{host}:{port}", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level in ("debug", "info"))


@main.command("create-owner")
@data_option
@click.argument("owner")
def create_owner(data_dir: Path, owner: str) -> None:
    """Create an owner (namespace for adapters)."""
    _run(lambda: Storage(data_dir).create_owner(owner))
    click.echo(f"created owner {owner}")


@main.command("register-key")
@data_option
@click.option("--owner", required=True)
@click.option("--public-key", "public_key", required=True, help="PEM .pub file or base64 of the raw key.")
def register_key(data_dir: Path, owner: str, public_key: str) -> None:
    """Register an owner's first signing key (later keys need rotate-key)."""
    def go() -> str:
        pub = signing.load_public_key(public_key)
        key_id = signing.public_key_id(pub)
        Storage(data_dir).add_key(owner, key_id, _raw_b64(pub))
        return key_id
    click.echo(f"registered key {_run(go)} for owner {owner}")


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
    try:
        sig = base64.b64decode(proof["signature"], validate=True)
        signing.load_public_key(active[old_id].encode()).verify(sig, signing.canonical_json(st))
    except (InvalidSignature, binascii.Error, ValueError):
        raise ApiError(403, "bad_signature", f"proof signature does not verify with the active key {old_id}") from None
    return old_id


@main.command("rotate-key")
@data_option
@click.option("--owner", required=True)
@click.option("--new-public-key", "new_public_key", required=True, help="PEM .pub file or base64 of the raw key.")
@click.option("--proof", "proof_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="JSON proof signed by the current key (`soppu rotate-key-proof`).")
def rotate_key(data_dir: Path, owner: str, new_public_key: str, proof_path: Path) -> None:
    """Replace the owner's key; the old key must sign the change."""
    def go() -> tuple[str, str]:
        store = Storage(data_dir)
        pub = signing.load_public_key(new_public_key)
        new_id = signing.public_key_id(pub)
        try:
            proof = json.loads(proof_path.read_text())
        except ValueError as e:
            raise ApiError(400, "bad_proof", f"{proof_path} is not JSON: {e}") from None
        old_id = verify_rotation_proof(store, owner, new_id, proof)
        store.add_key(owner, new_id, _raw_b64(pub), replaces=old_id)
        return old_id, new_id
    old_id, new_id = _run(go)
    click.echo(f"rotated owner {owner}: {old_id} -> {new_id}")


@main.command("issue-token")
@data_option
@click.option("--owner", default=None, help="Owner the token acts for (not for serving-read).")
@click.option("--scope", "scopes", multiple=True, required=True, type=click.Choice(SCOPES))
@click.option("--label", default=None, help="Free text to recognise the token by.")
@click.option("--json", "as_json", is_flag=True, help="Print {token_id, token, owner, scopes} as JSON.")
def issue_token_cmd(data_dir: Path, owner: str | None, scopes: tuple[str, ...], label: str | None, as_json: bool) -> None:
    """Create a token. It is printed once; only its sha256 is stored."""
    token_id, token = _run(lambda: issue_token(Storage(data_dir), owner, list(scopes), label))
    if as_json:
        click.echo(json.dumps({"token_id": token_id, "token": token, "owner": owner, "scopes": sorted(scopes)}))
    else:
        click.echo(token)
        click.echo(f"token id {token_id} ({', '.join(sorted(scopes))}); store it now, it is not shown again", err=True)


@main.command("revoke-token")
@data_option
@click.argument("token_id")
def revoke_token(data_dir: Path, token_id: str) -> None:
    """Revoke a token by id (takes effect on its next request)."""
    _run(lambda: Storage(data_dir).revoke_token(token_id))
    click.echo(f"revoked token {token_id}")


@main.command("list-tokens")
@data_option
def list_tokens(data_dir: Path) -> None:
    """List tokens (ids, owners, scopes; never secrets) as JSON lines."""
    for t in Storage(data_dir).list_tokens():
        click.echo(json.dumps(t))


def _seconds(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``24h``, ``7d`` -> seconds."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration such as 90s, 30m, 24h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@main.command("gc")
@data_option
@click.option("--grace", default="24h", show_default=True,
              help="Keep unpublished blobs touched (uploaded, re-sent or HEAD-checked) within this long: 90s, 30m, 24h, 7d.")
@click.option("--dry-run", is_flag=True, help="Report what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def gc(data_dir: Path, grace: str, dry_run: bool, as_json: bool) -> None:
    """Remove blobs that no published version lists (abandoned uploads) once past the grace period.

    Safe while `soppu-registry serve` runs: each removal is one write transaction, serialized with
    publishing, and a blob a client has just checked or re-sent is kept.
    """
    grace_s = _seconds(grace)
    if not (data_dir / "registry.sqlite3").is_file():
        _fail(f"{data_dir} is not a registry data directory (no registry.sqlite3)", 2)
    report = _run(lambda: Storage(data_dir).gc_blobs(grace_s, dry_run=dry_run))
    if as_json:
        click.echo(json.dumps({"ok": True, "grace_seconds": grace_s, **report}))
    else:
        verb = "would remove" if dry_run else "removed"
        click.echo(f"{verb} {len(report['removed'])} unpublished blob(s), {report['bytes']:,} bytes; kept "
                   f"{report['kept_referenced']} published and {report['kept_recent']} within the grace period")


if __name__ == "__main__":
    main()
