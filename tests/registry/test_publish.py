"""Publishing signed versions against a real `soppu-registry serve`: the happy path and every refusal."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soppu_client.format import signing
from soppu_client.format.errors import RegistryError
from soppu_client.registry_client import RegistryClient
from tests.registry.regkit import (
    BASE_MODEL,
    Owner,
    Registry,
    auth,
    error_code,
    make_bundle,
    publish,
    put_blob,
    upload_blobs,
)


def test_upload_publishes_every_adapter_and_fetch_matches_bytes(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1)
    res = RegistryClient(registry.url, owner.write_token).upload_bundle(bundle)
    assert res.adapters == {"alpha": "created", "beta": "created"}
    assert sorted(res.uploaded) == ["basis.safetensors", "cores/alpha.safetensors", "cores/beta.safetensors", "manifest.json"]

    reader = RegistryClient(registry.url, owner.read_token)
    doc = reader.get_version(owner.name, "beta")
    assert (doc["owner"], doc["name"], doc["version"]) == (owner.name, "beta", 1)
    assert doc["signature"] == signing.read_signature(bundle)
    assert set(doc) == {"owner", "name", "version", "base_model", "signature", "files", "published_at"}
    for f in doc["files"]:  # every acknowledged byte comes back, and verifies with the registered key
        assert reader.get_blob(f["sha256"]) == (bundle / f["path"]).read_bytes()
    keys = reader.get_keys(owner.name)
    assert [k["status"] for k in keys] == ["active"]
    signing.verify_statement(doc["signature"], keys[0]["public_key"].encode(), owner=owner.name, adapter="beta", version=1)
    bases = reader.get_bases(BASE_MODEL)
    basis = next(f["sha256"] for f in doc["files"] if f["path"] == "basis.safetensors")
    mine = [b for b in bases if b["digest"] == f"sha256:{basis}"]
    assert mine and {(u["owner"], u["name"]) for u in mine[0]["used_by"]} == {(owner.name, "alpha"), (owner.name, "beta")}


def test_second_upload_skips_present_blobs_and_is_idempotent(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 3)
    client = RegistryClient(registry.url, owner.write_token)
    client.upload_bundle(bundle)
    again = client.upload_bundle(bundle)
    assert again.adapters == {"alpha": "unchanged", "beta": "unchanged"} and again.uploaded == []
    r = publish(registry.url, owner.write_token, owner.name, "alpha", 3, signing.read_signature(bundle))
    assert r.status_code == 200


def test_rollback_and_conflict_are_409(registry: Registry, owner: Owner) -> None:
    client = RegistryClient(registry.url, owner.write_token)
    client.upload_bundle(owner.bundle(registry.tmpdir("v5"), 5, seed=1))
    with pytest.raises(RegistryError) as e:
        client.upload_bundle(owner.bundle(registry.tmpdir("v4"), 4, seed=2))
    assert (e.value.status, e.value.code) == (409, "rollback")
    with pytest.raises(RegistryError) as e:
        client.upload_bundle(owner.bundle(registry.tmpdir("v5b"), 5, seed=3))
    assert (e.value.status, e.value.code) == (409, "conflict")
    assert e.value.url and e.value.url.endswith(f"/v1/bundles/{owner.name}/versions/5")  # one batch publish
    assert f"{owner.name}/alpha version 5" in str(e.value)
    assert client.get_version(owner.name, "alpha")["version"] == 5
    assert client.list_versions(owner.name, "alpha") == [5]


def test_tampered_byte_is_refused(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1)
    core = bundle / "cores" / "alpha.safetensors"
    data = bytearray(core.read_bytes())
    data[-1] ^= 1
    core.write_bytes(bytes(data))
    st = signing.read_signature(bundle)["statement"]
    listed = next(f["sha256"] for f in st["files"] if f["path"] == "cores/alpha.safetensors")
    # Under the signed digest the tampered bytes do not verify ...
    r = put_blob(registry.url, owner.write_token, bytes(data), listed)
    assert (r.status_code, error_code(r)) == (400, "digest_mismatch")
    assert "sha256" in r.json()["error"]["message"]
    # ... and under their own digest they are stored, but the signed statement still wants the original.
    assert put_blob(registry.url, owner.write_token, bytes(data)).status_code == 201
    for f in st["files"]:
        if f["path"] != "cores/alpha.safetensors":
            put_blob(registry.url, owner.write_token, (bundle / f["path"]).read_bytes(), f["sha256"])
    r = publish(registry.url, owner.write_token, owner.name, "alpha", 1, signing.read_signature(bundle))
    assert (r.status_code, error_code(r)) == (400, "missing_blob")
    assert "cores/alpha.safetensors" in r.json()["error"]["message"]
    assert requests.get(f"{registry.url}/v1/adapters/{owner.name}/alpha", headers=auth(owner.read_token)).status_code == 404


def _resign(owner: Owner, doc: dict, **changes: object) -> dict:
    st = {**doc["statement"], **changes}
    return signing.sign_statement(st, owner.key)


@pytest.mark.parametrize("change", ["added", "removed", "renamed"])
def test_file_list_changes_break_signature_or_manifest(registry: Registry, owner: Owner, change: str) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1)
    upload_blobs(registry.url, owner.write_token, bundle)
    doc = signing.read_signature(bundle)
    files = list(doc["statement"]["files"])
    if change == "added":
        extra = b"not part of the bundle"
        put_blob(registry.url, owner.write_token, extra)
        files.append({"path": "extra.bin", "sha256": hashlib.sha256(extra).hexdigest(), "size": len(extra)})
    elif change == "removed":
        files = [f for f in files if f["path"] != "cores/beta.safetensors"]
    else:
        files = [({**f, "path": "cores/gamma.safetensors"} if f["path"] == "cores/beta.safetensors" else f) for f in files]
    files.sort(key=lambda f: f["path"])
    # An attacker editing the statement breaks the owner's signature.
    forged = {**doc, "statement": {**doc["statement"], "files": files}}
    r = publish(registry.url, owner.write_token, owner.name, "alpha", 1, forged)
    assert (r.status_code, error_code(r)) == (403, "bad_signature")
    # Even the owner cannot publish a statement that disagrees with the manifest.
    r = publish(registry.url, owner.write_token, owner.name, "alpha", 1, _resign(owner, doc, files=files))
    assert (r.status_code, error_code(r)) == (400, "bad_manifest")


def test_unknown_key_and_other_owners_key_are_403(registry: Registry, owner: Owner, tmp_path: Path) -> None:
    stranger, _ = signing.generate_keypair(tmp_path / "stranger")
    bundle = owner.bundle(registry.tmpdir("b"), 1, key=signing.load_private_key(stranger))
    upload_blobs(registry.url, owner.write_token, bundle)
    r = publish(registry.url, owner.write_token, owner.name, "alpha", 1, signing.read_signature(bundle))
    assert (r.status_code, error_code(r)) == (403, "unknown_key")

    other = registry.new_owner()
    bundle2 = owner.bundle(registry.tmpdir("b"), 1, seed=9, key=other.key)  # statement for owner, other's key
    upload_blobs(registry.url, owner.write_token, bundle2)
    r = publish(registry.url, owner.write_token, owner.name, "alpha", 1, signing.read_signature(bundle2))
    assert (r.status_code, error_code(r)) == (403, "wrong_owner_key")
    assert other.name in r.json()["error"]["message"]


def test_expired_statement_is_403(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1)
    upload_blobs(registry.url, owner.write_token, bundle)
    expired = _resign(owner, signing.read_signature(bundle), expires_at="2020-01-01T00:00:00Z")
    r = publish(registry.url, owner.write_token, owner.name, "alpha", 1, expired)
    assert (r.status_code, error_code(r)) == (403, "expired")
    assert r.json()["error"]["message"] == "statement expired at 2020-01-01T00:00:00Z"


def test_name_owner_and_version_swaps_are_403(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 2, adapters=("alpha",))
    upload_blobs(registry.url, owner.write_token, bundle)
    doc = signing.read_signature(bundle)
    r = publish(registry.url, owner.write_token, owner.name, "beta", 2, doc)
    assert (r.status_code, error_code(r)) == (403, "name_mismatch")
    r = publish(registry.url, owner.write_token, owner.name, "alpha", 3, doc)
    assert (r.status_code, error_code(r)) == (403, "version_mismatch")
    forged = {**doc, "statement": {**doc["statement"], "adapters": ["beta"]}}
    r = publish(registry.url, owner.write_token, owner.name, "beta", 2, forged)
    assert (r.status_code, error_code(r)) == (403, "bad_signature")
    other = registry.new_owner()
    r = publish(registry.url, other.write_token, other.name, "alpha", 2, doc)
    assert (r.status_code, error_code(r)) == (403, "wrong_owner_key")
    assert publish(registry.url, owner.write_token, owner.name, "alpha", 2, doc).status_code == 201


def test_invalid_safetensors_is_refused(registry: Registry, owner: Owner) -> None:
    root = make_bundle(registry.tmpdir("b"), ("alpha",))
    core = root / "cores" / "alpha.safetensors"
    core.write_bytes(core.read_bytes() + b"trailing")  # structurally broken, manifest updated to match
    m = json.loads((root / "manifest.json").read_text())
    m["files"]["cores/alpha.safetensors"] = {"sha256": hashlib.sha256(core.read_bytes()).hexdigest(),
                                             "size": core.stat().st_size}
    (root / "manifest.json").write_text(json.dumps(m))
    signing.sign_bundle(root, owner.key, owner.name, 1, "2099-01-01T00:00:00Z")
    upload_blobs(registry.url, owner.write_token, root)
    r = publish(registry.url, owner.write_token, owner.name, "alpha", 1, signing.read_signature(root))
    assert (r.status_code, error_code(r)) == (400, "bad_safetensors")
    assert "cores/alpha.safetensors" in r.json()["error"]["message"]


def test_wrong_core_shape_is_refused(registry: Registry, owner: Owner) -> None:
    root = make_bundle(registry.tmpdir("b"), ("alpha",))
    m = json.loads((root / "manifest.json").read_text())
    m["rank"] = 3  # the tensors are rank 2
    (root / "manifest.json").write_text(json.dumps(m))
    signing.sign_bundle(root, owner.key, owner.name, 1, "2099-01-01T00:00:00Z")
    upload_blobs(registry.url, owner.write_token, root)
    r = publish(registry.url, owner.write_token, owner.name, "alpha", 1, signing.read_signature(root))
    assert (r.status_code, error_code(r)) == (400, "bad_safetensors")


def test_concurrent_publishes_of_one_version_exactly_one_wins(registry: Registry, owner: Owner) -> None:
    docs = []
    for seed in range(4):
        b = owner.bundle(registry.tmpdir("c"), 7, adapters=("alpha",), seed=100 + seed)
        upload_blobs(registry.url, owner.write_token, b)
        docs.append(signing.read_signature(b))
    barrier = threading.Barrier(len(docs))
    statuses: list[int] = [0] * len(docs)

    def go(i: int) -> None:
        barrier.wait()
        statuses[i] = publish(registry.url, owner.write_token, owner.name, "alpha", 7, docs[i]).status_code

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(docs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [201, 409, 409, 409]
    winner = docs[statuses.index(201)]
    got = RegistryClient(registry.url, owner.read_token).get_version(owner.name, "alpha", 7)
    assert got["signature"] == winner


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_one_byte_of_the_signature_document_never_publishes(registry: Registry, data: st.DataObject) -> None:
    """Sign, flip one byte of signature.json, publish: refused every time, and the server stays up."""
    if registry.url not in _FUZZ:  # one signed bundle per registry (backend)
        o = registry.new_owner("fz")
        b = o.bundle(registry.tmpdir("fz"), 1, adapters=("alpha",))
        upload_blobs(registry.url, o.write_token, b)
        _FUZZ[registry.url] = (o, signing.canonical_json(signing.read_signature(b)))
    o, raw = _FUZZ[registry.url]
    i = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    mutated = bytearray(raw)
    mutated[i] ^= 1 << bit
    try:
        doc = json.loads(bytes(mutated))
    except ValueError:
        return  # not JSON any more: nothing to publish
    r = publish(registry.url, o.write_token, o.name, "alpha", 1, doc)
    assert r.status_code in (400, 403), (i, bit, r.status_code, r.text)
    assert set(r.json()) == {"error"}


_FUZZ: dict[str, tuple[Owner, bytes]] = {}
