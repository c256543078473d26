"""Trust on first use of owner keys (issue 19, finding 4), against a registry that substitutes its
own key for the owner's: a real registry process behind :mod:`tests.serving.hostile`.

A host without pinned keys accepts the first key it sees for an owner, then only that key or one
the registry's rotation proofs lead to from it; pinned keys still override. The same rule holds
for ``soppu project --onto-published`` on the owner's side.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from soppu_client.format import signing
from soppu_client.format.errors import SignatureError
from soppu_client.registry_client import make_rotation_proof
from soppu_serving import Session, Settings
from tests.serving import hostile, srckit


def _forgery(reg: srckit.Registry, name: str, tmp_path: Path) -> tuple[dict, dict, str, Path]:
    """(a record of alice/<name> re-signed by the registry's own key, a keys listing that names only
    that key, its id, its private key file)."""
    record = srckit.version_record(reg, name)
    key_file = tmp_path / "registry.key"
    if not key_file.exists():
        srckit.run("soppu", "keygen", "-o", str(key_file))
    evil = signing.load_private_key(key_file)
    forged = copy.deepcopy(record)
    forged["signature"] = signing.sign_statement({**record["signature"]["statement"],
                                                  "expires_at": "2999-01-01T00:00:00Z"}, evil)
    evil_id = signing.public_key_id(evil.public_key())
    keys = {"owner": "alice", "keys": [{"key_id": evil_id, "public_key": forged["signature"]["public_key"],
                                        "status": "active", "rotation_proof": None}]}
    return forged, keys, evil_id, key_file


def test_a_substituted_key_is_refused_once_the_owner_is_known(published, tmp_path: Path) -> None:
    reg = published.registry
    real_id = srckit.version_record(reg, "ad0")["signature"]["key_id"]
    forged, keys_doc, evil_id, evil_file = _forgery(reg, "ad0", tmp_path)
    with hostile.Hostile(reg.url) as evil:
        host = Session(Settings(registry_url=evil.url, cache_dir=tmp_path / "host"))
        assert host.serve("alice/ad0", reg.serving_token).verified.record.signature["key_id"] == real_id
        known = host.keys.known.path("alice")
        assert set(json.loads(known.read_text())["keys"]) == {real_id}  # first use: the owner's real key

        evil.rules["/v1/adapters/alice/ad0"] = hostile.json_answer(forged)
        evil.rules["/v1/keys/alice"] = hostile.json_answer(keys_doc)
        # Precondition: a host that never saw alice takes the registry's word (the documented first use).
        fresh = Session(Settings(registry_url=evil.url, cache_dir=tmp_path / "fresh"))
        assert fresh.serve("alice/ad0", reg.serving_token).verified.record.signature["key_id"] == evil_id

        host.forget()
        with pytest.raises(SignatureError) as e:
            host.serve("alice/ad0", reg.serving_token)
        assert e.value.code == "untrusted_key"
        assert str(e.value) == (
            f"soppu adapter alice/ad0: bad signature: it names key {evil_id!r}, but this host trusts owner 'alice' "
            f"with key(s) {real_id} (trust on first use) and the registry shows no rotation proof for key {evil_id} "
            f"leading there from one of them; refusing a key the registry may have substituted; if the owner did "
            f"rotate keys, pin the new key (SOPPU_TRUSTED_KEYS) or, once checked, delete {known} to trust the "
            "registry's key again")
        assert set(json.loads(known.read_text())["keys"]) == {real_id}  # the refusal recorded nothing

        # A rotation "proof" the registry signed itself does not help.
        self_signed = make_rotation_proof("alice", signing.load_private_key(evil_file),
                                          signing.load_private_key(evil_file).public_key())
        listing = copy.deepcopy(keys_doc)
        listing["keys"][0]["rotation_proof"] = {**self_signed, "key_id": real_id}
        evil.rules["/v1/keys/alice"] = hostile.json_answer(listing)
        host.forget()
        with pytest.raises(SignatureError) as e:
            host.serve("alice/ad0", reg.serving_token)
        assert e.value.code == "untrusted_key" and "a rotation proof on the way is not valid" in str(e.value)

        # Pinned keys override whatever was trusted on first use: here the operator pins the other key.
        pins = tmp_path / "pins"
        pins.mkdir()
        shutil.copy(f"{evil_file}.pub", pins / "alice.pub")
        pinned = Session(Settings(registry_url=evil.url, cache_dir=tmp_path / "host", trusted_keys=pins))
        assert pinned.serve("alice/ad0", reg.serving_token).verified.record.signature["key_id"] == evil_id

        evil.rules.clear()  # the honest answer again: the known key serves it
        host.forget()
        assert host.serve("alice/ad0", reg.serving_token).verified.record.signature["key_id"] == real_id


def _project(reg: srckit.Registry, url: str, out: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    new = srckit.write_adapter(out.parent / "new" / "nu0", seed=900)
    proc = subprocess.run([str(srckit.BIN / "soppu"), "project", str(new), "--onto-published", "alice/ad1",
                           "--registry", url, "--token", reg.read_token, "-o", str(out), *extra],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "SOPPU_CONFIG_DIR": str(config)})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_project_onto_published_trusts_on_first_use(published, tmp_path: Path) -> None:
    reg = published.registry
    real_id = srckit.version_record(reg, "ad1")["signature"]["key_id"]
    forged, keys_doc, evil_id, _ = _forgery(reg, "ad1", tmp_path)
    config = tmp_path / "config"
    with hostile.Hostile(reg.url) as evil:
        assert _project(reg, evil.url, tmp_path / "p1", config).returncode == 0  # first use: the real key
        stores = list(config.glob("known_keys/*/alice.json"))
        assert len(stores) == 1 and set(json.loads(stores[0].read_text())["keys"]) == {real_id}
        evil.rules["/v1/adapters/alice/ad1"] = hostile.json_answer(forged)
        evil.rules["/v1/keys/alice"] = hostile.json_answer(keys_doc)
        proc = _project(reg, evil.url, tmp_path / "p2", config)
        assert proc.returncode == 1 and not (tmp_path / "p2").exists()
        assert proc.stderr.startswith(f"error: published adapter alice/ad1@1: bad signature: it names key {evil_id!r}, "
                                      f"but this host trusts owner 'alice' with key(s) {real_id} (trust on first use)")
        # Precondition: a user who never fetched alice's basis takes the registry's key.
        assert _project(reg, evil.url, tmp_path / "p3", tmp_path / "fresh-config").returncode == 0
        # --public-key pins the owner's key and overrides: the forgery is refused by the pin, not the store.
        proc = _project(reg, evil.url, tmp_path / "p4", tmp_path / "fresh-2", "--public-key", f"{reg.key}.pub")
        assert proc.returncode == 1 and "wrong key" in proc.stderr
