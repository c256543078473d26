"""`soppu keygen`, `soppu sign`, `soppu verify-signature`: Ed25519 keys and the bundle's signed statement.

Passphrases never travel on the command line: ``--passphrase-file`` (``-`` for stdin) or
$SOPPU_KEY_PASSPHRASE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from soppu_client.cli.options import passphrase_file_option, read_passphrase
from soppu_client.format import signing
from soppu_client.format.reporting import emit, json_option, reporting

__all__ = ["COMMANDS", "keygen", "sign", "verify_signature"]


@click.command("keygen")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="Private key path; the public key goes to <path>.pub.")
@passphrase_file_option
@click.option("--force", is_flag=True, help="Replace existing key files.")
@json_option
def keygen(output: str, passphrase_file: str | None, force: bool, as_json: bool) -> None:
    """Create an Ed25519 signing key pair (private key mode 0600)."""
    with reporting(as_json):
        passphrase = read_passphrase(passphrase_file)
        priv, pub = signing.generate_keypair(Path(output), passphrase, overwrite=force)
        key_id = signing.public_key_id(pub)
        emit(as_json, {"private_key": str(priv), "public_key": str(pub), "key_id": key_id,
                       "encrypted": passphrase is not None},
             f"wrote private key {priv} (mode 0600{', encrypted' if passphrase else ''})\n"
             f"wrote public key {pub}\nkey id {key_id}")


@click.command("sign")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="Ed25519 private key written by `soppu keygen`.")
@click.option("--owner", required=True, help="Owner name the statement is signed for.")
@click.option("--version", "version", required=True, type=click.IntRange(min=1),
              help="Bundle version (positive integer; versions only grow).")
@click.option("--expires", default="365d", show_default=True,
              help="Expiry: a duration (90d, 12h, 2w, 1y) or a date/time (2027-02-21T00:00:00Z).")
@passphrase_file_option
@json_option
def sign(bundle: str, key_path: str, owner: str, version: int, expires: str,
         passphrase_file: str | None, as_json: bool) -> None:
    """Sign BUNDLE: write BUNDLE/signature.json over its names, version and every file."""
    with reporting(as_json):
        expires_at = signing.parse_expiry(expires)
        key = signing.load_private_key(Path(key_path), read_passphrase(passphrase_file))
        out = signing.sign_bundle(Path(bundle), key, owner, version, expires_at)
        doc = json.loads(out.read_bytes())
        st = doc["statement"]
        emit(as_json, {"signature": str(out), "key_id": doc["key_id"], "owner": st["owner"],
                       "adapters": st["adapters"], "version": st["version"],
                       "expires_at": st["expires_at"], "files": len(st["files"])},
             f"signed {bundle} for owner {st['owner']} version {st['version']} "
             f"(adapters: {', '.join(st['adapters'])}; {len(st['files'])} files)\n"
             f"key {doc['key_id']}, expires {st['expires_at']}\nwrote {out}")


@click.command("verify-signature")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--public-key", "public_key", required=True,
              help="Trusted public key: a .pub file or base64 of the raw 32 bytes.")
@click.option("--owner", default=None, help="Require the statement to be for this owner.")
@click.option("--adapter", "adapters", multiple=True, help="Require the statement to cover this adapter (repeatable).")
@click.option("--version", "version", default=None, type=int, help="Require this version.")
@json_option
def verify_signature(bundle: str, public_key: str, owner: str | None, adapters: tuple[str, ...],
                     version: int | None, as_json: bool) -> None:
    """Verify BUNDLE/signature.json with a trusted public key and check every file's digest."""
    with reporting(as_json):
        pub = signing.load_public_key(Path(public_key) if os.path.exists(public_key) else public_key)
        st = signing.verify_bundle(Path(bundle), pub, owner=owner, adapter=list(adapters) or None,
                                   version=version)
        key_id = signing.public_key_id(pub)
        emit(as_json, {"bundle": bundle, "key_id": key_id, "owner": st["owner"],
                       "adapters": st["adapters"], "version": st["version"],
                       "base_model": st["base_model"], "expires_at": st["expires_at"],
                       "files": len(st["files"])},
             f"OK: {bundle} is signed by {key_id} for owner {st['owner']} version {st['version']} "
             f"(adapters: {', '.join(st['adapters'])}; {len(st['files'])} files verified; "
             f"expires {st['expires_at']})")


COMMANDS: list[click.Command] = [keygen, sign, verify_signature]
