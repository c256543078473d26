"""The admin CLI (`soppu-registry`, as subprocesses) and `soppu upload` / `rotate-key-proof` (click)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import requests
from click.testing import CliRunner

from soppu_client.cli.upload import rotate_key_proof, upload
from soppu_client.format import signing
from soppu_registry.devservices import Services
from tests.registry.regkit import (
    REGISTRY_BIN,
    Owner,
    Registry,
    auth,
    free_port,
    make_bundle,
)


def admin(registry: Registry, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REGISTRY_BIN), args[0], *registry.server.storage_args(), *args[1:]],
                          capture_output=True, text=True, timeout=60, check=False)


def run_upload(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(upload, list(args), env=env)
    return r.exit_code, r.stdout, r.stderr


def test_admin_flow_upload_rotate_revoke(registry: Registry, tmp_path: Path) -> None:
    assert admin(registry, "create-owner", "carol").returncode == 0
    k1, k1pub = signing.generate_keypair(tmp_path / "k1")
    k2, k2pub = signing.generate_keypair(tmp_path / "k2")
    r = admin(registry, "register-key", "--owner", "carol", "--public-key", str(k1pub))
    assert r.returncode == 0 and signing.public_key_id(k1pub) in r.stdout
    r = admin(registry, "register-key", "--owner", "carol", "--public-key", str(k2pub))
    assert r.returncode == 1 and "use rotate-key" in r.stderr
    r = admin(registry, "issue-token", "--owner", "carol", "--scope", "owner-write", "--json")
    token, token_id = json.loads(r.stdout)["token"], json.loads(r.stdout)["token_id"]
    listed = admin(registry, "list-tokens")  # shown once, stored hashed
    assert listed.returncode == 0 and token not in listed.stdout
    assert f"{token_id}  owner carol  scopes owner-write  created " in listed.stdout
    listed = json.loads(admin(registry, "list-tokens", "--json").stdout)
    mine = [t for t in listed["tokens"] if t["token_id"] == token_id]
    assert listed["ok"] is True and token not in json.dumps(listed)
    assert [(t["owner"], t["scopes"], t["revoked_at"]) for t in mine] == [("carol", "owner-write", None)]

    b1 = make_bundle(tmp_path / "b1", ("alpha",))
    signing.sign_bundle(b1, signing.load_private_key(k1), "carol", 1, "2099-01-01T00:00:00Z")
    code, out, err = run_upload(str(b1), "--registry", registry.url, env={"SOPPU_REGISTRY_TOKEN": token})
    assert (code, out) == (0, "published carol/alpha@1 (created)\n")

    # Rotation: a proof signed by the new key itself is refused; one signed by the old key works.
    bad = tmp_path / "bad.json"
    assert CliRunner().invoke(rotate_key_proof, ["--owner", "carol", "--key", str(k2), "--new-public-key",
                                                 str(k2pub), "--out", str(bad)]).exit_code == 0
    r = admin(registry, "rotate-key", "--owner", "carol", "--new-public-key", str(k2pub), "--proof", str(bad))
    assert r.returncode == 1 and "not an active key of owner 'carol'" in r.stderr
    proof = tmp_path / "proof.json"
    res = CliRunner().invoke(rotate_key_proof, ["--owner", "carol", "--key", str(k1), "--new-public-key",
                                                str(k2pub), "--out", str(proof), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["new_key_id"] == signing.public_key_id(k2pub)
    r = admin(registry, "rotate-key", "--owner", "carol", "--new-public-key", str(k2pub), "--proof", str(proof))
    assert r.returncode == 0, r.stderr
    keys = requests.get(f"{registry.url}/v1/keys/carol", headers=auth(token)).json()["keys"]
    assert [(k["key_id"], k["status"]) for k in keys] == [(signing.public_key_id(k1pub), "rotated"),
                                                          (signing.public_key_id(k2pub), "active")]

    b2 = make_bundle(tmp_path / "b2", ("alpha",))
    signing.sign_bundle(b2, signing.load_private_key(k1), "carol", 2, "2099-01-01T00:00:00Z")
    code, out, err = run_upload(str(b2), "--registry", registry.url, "--token", token, "--json")
    assert code == 1 and json.loads(out)["ok"] is False and json.loads(out)["error"]["code"] == "rotated_key"
    signing.sign_bundle(b2, signing.load_private_key(k2), "carol", 2, "2099-01-01T00:00:00Z")
    code, out, err = run_upload(str(b2), "--registry", registry.url, "--token", token, "--json")
    assert code == 0 and json.loads(out)["adapters"] == {"alpha": "created"}
    assert json.loads(out)["skipped"] == ["basis.safetensors", "cores/alpha.safetensors", "manifest.json"]

    assert admin(registry, "revoke-token", token_id).returncode == 0
    code, out, err = run_upload(str(b2), "--registry", registry.url, "--token", token)
    assert code == 1 and out == "" and "HTTP 401 unauthorized" in err


def test_upload_cli_never_prints_success_on_failure(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1)
    core = bundle / "cores" / "beta.safetensors"
    core.write_bytes(core.read_bytes()[:-1] + b"\x01")
    code, out, err = run_upload(str(bundle), "--registry", registry.url, "--token", owner.write_token)
    assert code == 1 and "published" not in out + err and "cores/beta.safetensors" in err
    code, out, err = run_upload(str(bundle), "--registry", registry.url, "--token", owner.write_token, "--json")
    assert code == 1 and json.loads(out)["ok"] is False and json.loads(out)["error"]["type"] == "SignatureError"
    assert requests.get(f"{registry.url}/v1/adapters/{owner.name}/beta", headers=auth(owner.read_token)).status_code == 404

    dead = f"http://127.0.0.1:{free_port()}"
    fresh = owner.bundle(registry.tmpdir("b"), 1)
    code, out, err = run_upload(str(fresh), "--registry", dead, "--token", owner.write_token, "--retries", "0")
    assert code == 1 and out == "" and "cannot reach the registry" in err
    code, out, err = run_upload(str(fresh), "--registry", registry.url, "--token", "soppu_00_nope")
    assert code == 1 and out == "" and "HTTP 401" in err
    code, out, err = run_upload(str(fresh), "--registry", registry.url, "--token", owner.read_token)
    assert code == 1 and out == "" and "HTTP 403 forbidden" in err


def test_admin_commands_report_json_and_errors_without_tracebacks(registry: Registry, tmp_path: Path) -> None:
    r = admin(registry, "create-owner", "dave", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"ok": True, "owner": "dave"}
    r = admin(registry, "create-owner", "dave", "--json")  # a refusal: exit 1, the ApiError as JSON
    assert r.returncode == 1 and json.loads(r.stdout) == {"ok": False, "error": {
        "type": "ApiError", "message": "owner 'dave' already exists", "exit_code": 1, "status": 409,
        "code": "owner_exists"}}
    r = admin(registry, "create-owner", "bad name!")  # bad input: exit 2, one line on stderr
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == "error: owner name 'bad name!' must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\\Z\n"

    _, pub = signing.generate_keypair(tmp_path / "dave")
    r = admin(registry, "register-key", "--owner", "dave", "--public-key", str(pub), "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"ok": True, "owner": "dave",
                                                          "key_id": signing.public_key_id(pub)}
    r = admin(registry, "register-key", "--owner", "nobody", "--public-key", str(pub))
    assert (r.returncode, r.stderr) == (2, "error: owner 'nobody' does not exist; create it first\n")

    r = admin(registry, "issue-token", "--owner", "dave", "--scope", "owner-read")
    token = r.stdout.strip()
    assert r.returncode == 0 and r.stdout == token + "\n" and token.startswith("soppu_")  # alone on stdout
    token_id = token.split("_")[1]
    assert requests.get(f"{registry.url}/v1/keys/dave", headers=auth(token)).status_code == 200
    r = admin(registry, "revoke-token", token_id, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"ok": True, "token_id": token_id}
    assert requests.get(f"{registry.url}/v1/keys/dave", headers=auth(token)).status_code == 401
    r = admin(registry, "revoke-token", token_id)
    assert (r.returncode, r.stderr) == (2, f"error: no active token with id {token_id!r}\n")
    r = admin(registry, "issue-token", "--scope", "owner-write", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["message"] == "scopes ['owner-write'] need an owner (--owner)"
    r = admin(registry, "issue-token", "--owner", "dave", "--scope", "owner-write", "--scope", "serving-read", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["message"] == (
        "serving-read cannot be combined with ['owner-write']; issue two tokens")

    r = admin(registry, "gc", "--grace", "soon", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == {
        "type": "InputError", "message": "--grace 'soon' is not a duration such as 90s, 30m, 24h or 7d", "exit_code": 2}
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    r = subprocess.run([str(REGISTRY_BIN), "create-owner", "--data", str(not_a_dir / "d"), "x"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and r.stderr.startswith(f"error: cannot open registry data directory {not_a_dir / 'd'}: ")
    # One server per data dir: a second `serve` on the shared registry's dir is refused.
    r = subprocess.run([str(REGISTRY_BIN), "serve", *registry.server.storage_args(), "--port", str(free_port()),
                        "--json"], capture_output=True, text=True, timeout=60, check=False,
                       env={**os.environ, **registry.server.backend.env})
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["message"] == (
        f"another `soppu-registry serve` is using {registry.server.data}; stop it or pick another --data")
    for out in (r.stderr, r.stdout):
        assert "Traceback" not in out


def test_storage_urls_bad_or_unreachable_are_one_line_errors(services: Services, tmp_path: Path) -> None:
    """postgres+s3 options: a bad URL, an unreachable service or a missing bucket is exit 2 with one
    line naming the option and the fix (passwords hidden); `init` creates the bucket, then it works."""
    loc = services.fresh("cli")
    db, endpoint = loc.database, services.weed.endpoint
    closed = f"127.0.0.1:{free_port()}"
    bucket = f"made-by-init-{free_port()}"
    cases = [
        (["--database", "mysql://x/y", "--blobs", loc.blobs], "--database 'mysql://x/y' must be a postgresql://"),
        (["--database", f"postgresql://postgres:hunter2@{closed}/x", "--blobs", loc.blobs],
         f"cannot connect to PostgreSQL at postgresql://postgres:***@{closed}/x"),
        (["--database", db, "--blobs", "ftp://x"], "--blobs 'ftp://x' must be s3://BUCKET"),
        (["--database", db, "--blobs", f"s3://{bucket}?endpoint={endpoint}"], "create it (or run `soppu-registry init`)"),
        (["--database", db, "--blobs", f"s3://b?endpoint=http://{closed}"], f"cannot reach S3 bucket b at http://{closed}"),
        (["--database", db], "give --data DIR (sqlite+dir), or --database postgresql://... and --blobs s3://..."),
    ]
    env = {**os.environ, **services.env}
    for args, message in cases:
        r = subprocess.run([str(REGISTRY_BIN), "list-tokens", *args], capture_output=True, text=True, timeout=120,
                           check=False, env=env)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "hunter2" not in r.stderr, r.stderr
    blobs = f"s3://{bucket}?endpoint={endpoint}"
    r = subprocess.run([str(REGISTRY_BIN), "init", "--database", db, "--blobs", blobs, "--json"], capture_output=True,
                       text=True, timeout=120, check=False, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["backend"] == "postgres+s3", r.stderr
    r = subprocess.run([str(REGISTRY_BIN), "list-tokens", "--database", db, "--blobs", blobs, "--json"],
                       capture_output=True, text=True, timeout=120, check=False, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] == [], r.stderr
