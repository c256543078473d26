"""`soppu upload`, `soppu bases`, `soppu rotate-key-proof`: the owner's side of the registry.

``upload`` exits 0 only when every adapter of the bundle is published (created or identical);
a refusal is exit 1 and never prints a success line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from soppu_client.cli.options import read_passphrase, registry_option, token_option
from soppu_client.format import signing
from soppu_client.format.fsutil import atomic_write
from soppu_client.format.errors import InputError
from soppu_client.format.reporting import emit, json_option, reporting
from soppu_client.registry_client import RegistryClient, make_rotation_proof

__all__ = ["COMMANDS", "bases", "rotate_key_proof", "upload"]


@click.command("upload")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@registry_option()
@token_option("Owner-write token")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(min=0),
              help="Extra attempts per request on connection errors, 5xx and 429.")
@click.option("--jobs", "-j", default=4, show_default=True, type=click.IntRange(min=1),
              help="Blobs uploaded in parallel.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a TTY).")
@json_option
def upload(bundle: Path, registry: str, token: str, retries: int, jobs: int, progress: bool | None,
           as_json: bool) -> None:
    """Upload a signed BUNDLE: only blobs the registry lacks (--jobs at a time; a re-run resumes),
    then publish every adapter in one request (all or nothing)."""
    with reporting(as_json):
        if not bundle.is_dir():
            raise InputError(f"bundle {bundle} is not a directory")
        client = RegistryClient(registry, token, retries=retries)
        res = client.upload_bundle(bundle, jobs=jobs, progress=sys.stderr.isatty() if progress is None else progress)
        emit(as_json, {"registry": client.base_url, **res.as_dict()},
             "\n".join(f"published {res.owner}/{name}@{res.version} ({status})"
                       for name, status in res.adapters.items()))
        if not as_json:
            click.echo(f"{len(res.uploaded)} file(s) uploaded ({res.bytes_uploaded} bytes), "
                       f"{len(res.skipped)} already on the registry", err=True)


@click.command("bases")
@click.argument("base_model")
@registry_option()
@token_option("A read token")
@json_option
def bases(base_model: str, registry: str, token: str, as_json: bool) -> None:
    """List the bases published for BASE_MODEL that the token may read, and the adapters on each.

    Join one with `soppu project NEW_ADAPTER... --onto-published OWNER/NAME -o BUNDLE`.
    """
    with reporting(as_json):
        found = RegistryClient(registry, token, retries=2).get_bases(base_model)
        lines = []
        for b in found:
            users = [f"{u['owner']}/{u['name']}@{u['version']}" for u in b["used_by"]]
            shown = ", ".join(users[:4]) + (f", ... ({len(users)} in all)" if len(users) > 4 else "")
            lines.append(f"{b['digest'][:19]}...  {b['size']:>12,} bytes  {shown}")
        emit(as_json, {"base_model": base_model, "bases": found},
             "\n".join(lines) or f"no published basis for {base_model} that this token may read")


@click.command("rotate-key-proof")
@click.option("--owner", required=True)
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Current (old) private key.")
@click.option("--new-public-key", required=True, help="New public key (.pub PEM or base64).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@json_option
def rotate_key_proof(owner: str, key_path: Path, new_public_key: str, out_path: Path, as_json: bool) -> None:
    """Sign "OWNER's new key is NEW" with the current key, for `soppu-registry rotate-key --proof`.

    The private key passphrase, if any, comes from $SOPPU_KEY_PASSPHRASE.
    """
    with reporting(as_json):
        priv = signing.load_private_key(key_path, read_passphrase(None))
        proof = make_rotation_proof(owner, priv, new_public_key)
        atomic_write(out_path, json.dumps(proof, indent=2, sort_keys=True).encode() + b"\n")
        st = proof["statement"]
        emit(as_json, {"proof": str(out_path), "old_key_id": proof["key_id"], "new_key_id": st["new_key_id"]},
             f"wrote {out_path}: {proof['key_id']} -> {st['new_key_id']} for owner {owner}")


COMMANDS: list[click.Command] = [upload, bases, rotate_key_proof]
