"""`soppu upload`, `soppu bases` and `soppu rotate-key-proof`: thin click commands over registry_client.py.

Registered on the `soppu` group by cli.py via ``COMMANDS``. Exit codes: 0 only when every adapter
of the bundle is published (created or identical), 1 refused or failed verification, 2 bad input.
``--json`` prints one JSON object on stdout (``{"ok": false, "error": {...}}`` on failure);
text mode prints failures as ``error: ...`` on stderr and never prints a success line for them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from soppu_client.format import signing
from soppu_client.format.reporting import reporting as _reporting
from soppu_client.format.errors import InputError
from soppu_client.registry_client import RegistryClient, make_rotation_proof

__all__ = ["COMMANDS", "bases", "rotate_key_proof", "upload"]

TOKEN_ENV = "SOPPU_TOKEN"
PASSPHRASE_ENV = "SOPPU_KEY_PASSPHRASE"


@click.command("upload")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--registry", required=True, envvar="SOPPU_REGISTRY", help="Registry base URL (or $SOPPU_REGISTRY).")
@click.option("--token", required=True, envvar=TOKEN_ENV, help=f"Owner-write token (or ${TOKEN_ENV}).")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(min=0),
              help="Extra attempts per request on connection errors, 5xx and 429.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a TTY).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def upload(bundle: Path, registry: str, token: str, retries: int, progress: bool | None, as_json: bool) -> None:
    """Upload a signed BUNDLE: only blobs the registry lacks, then publish each adapter."""
    with _reporting(as_json):
        if not bundle.is_dir():
            raise InputError(f"bundle {bundle} is not a directory")
        client = RegistryClient(registry, token, retries=retries)
        show = sys.stderr.isatty() if progress is None else progress
        res = client.upload_bundle(bundle, progress=show)
        if as_json:
            click.echo(json.dumps({"ok": True, "registry": client.base_url, **res.as_dict()}, indent=2))
        else:
            for name, status in res.adapters.items():
                click.echo(f"published {res.owner}/{name}@{res.version} ({status})")
            click.echo(f"{len(res.uploaded)} file(s) uploaded ({res.bytes_uploaded} bytes), "
                       f"{len(res.skipped)} already on the registry", err=True)


@click.command("bases")
@click.argument("base_model")
@click.option("--registry", required=True, envvar="SOPPU_REGISTRY", help="Registry base URL (or $SOPPU_REGISTRY).")
@click.option("--token", required=True, envvar=TOKEN_ENV, help=f"A read token (or ${TOKEN_ENV}).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def bases(base_model: str, registry: str, token: str, as_json: bool) -> None:
    """List the bases published for BASE_MODEL that the token may read, and the adapters on each.

    Join one with `soppu project NEW_ADAPTER... --onto-published OWNER/NAME -o BUNDLE`.
    """
    with _reporting(as_json):
        found = RegistryClient(registry, token, retries=2).get_bases(base_model)
        if as_json:
            click.echo(json.dumps({"ok": True, "base_model": base_model, "bases": found}, indent=2))
            return
        if not found:
            click.echo(f"no published basis for {base_model} that this token may read")
        for b in found:
            users = [f"{u['owner']}/{u['name']}@{u['version']}" for u in b["used_by"]]
            shown = ", ".join(users[:4]) + (f", ... ({len(users)} in all)" if len(users) > 4 else "")
            click.echo(f"{b['digest'][:19]}...  {b['size']:>12,} bytes  {shown}")


@click.command("rotate-key-proof")
@click.option("--owner", required=True)
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Current (old) private key.")
@click.option("--new-public-key", required=True, help="New public key (.pub PEM or base64).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def rotate_key_proof(owner: str, key_path: Path, new_public_key: str, out_path: Path, as_json: bool) -> None:
    """Sign "OWNER's new key is NEW" with the current key, for `soppu-registry rotate-key --proof`.

    The private key passphrase, if any, comes from $SOPPU_KEY_PASSPHRASE.
    """
    with _reporting(as_json):
        pw = os.environ.get(PASSPHRASE_ENV)
        priv = signing.load_private_key(key_path, pw.encode() if pw else None)
        proof = make_rotation_proof(owner, priv, new_public_key)
        signing.atomic_write(out_path, json.dumps(proof, indent=2, sort_keys=True).encode() + b"\n")
        st = proof["statement"]
        if as_json:
            click.echo(json.dumps({"ok": True, "proof": str(out_path), "old_key_id": proof["key_id"],
                                   "new_key_id": st["new_key_id"]}, indent=2))
        else:
            click.echo(f"wrote {out_path}: {proof['key_id']} -> {st['new_key_id']} for owner {owner}")


COMMANDS = [upload, bases, rotate_key_proof]
