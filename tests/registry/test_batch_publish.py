"""Batch publish (issue 13): `PUT /v1/bundles/<owner>/versions/<v>` publishes every adapter of a
signed bundle in one transaction, all or nothing; `soppu upload` uses it, uploads missing blobs in
parallel (--jobs) and resumes an interrupted upload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from soppu_client.format import signing
from soppu_client.registry_client import RegistryClient
from tests.registry.regkit import (
    Owner,
    Registry,
    auth,
    error_code,
    publish,
    put_blob,
    upload_blobs,
)

ADAPTERS = ("alpha", "beta", "gamma", "delta")


def batch(url: str, token: str | None, owner: str, version: int, doc: dict[str, Any]) -> requests.Response:
    return requests.put(f"{url}/v1/bundles/{owner}/versions/{version}", json={"signature": doc},
                        headers=auth(token), timeout=30)


def test_one_request_publishes_every_adapter_and_rerun_is_unchanged(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1, adapters=ADAPTERS)
    upload_blobs(registry.url, owner.write_token, bundle)
    doc = signing.read_signature(bundle)
    r = batch(registry.url, owner.write_token, owner.name, 1, doc)
    assert r.status_code == 201, r.text
    assert r.json() == {"owner": owner.name, "version": 1, "base_model": doc["statement"]["base_model"],
                        "adapters": {a: "created" for a in sorted(ADAPTERS)}}
    reader = RegistryClient(registry.url, owner.read_token)
    for name in ADAPTERS:
        v = reader.get_version(owner.name, name, 1)
        assert v["signature"] == doc and reader.list_versions(owner.name, name) == [1]
        for f in v["files"]:
            assert reader.get_blob(f["sha256"]) == (bundle / f["path"]).read_bytes()
    again = batch(registry.url, owner.write_token, owner.name, 1, doc)
    assert again.status_code == 200 and again.json()["adapters"] == {a: "unchanged" for a in sorted(ADAPTERS)}
    assert publish(registry.url, owner.write_token, owner.name, "beta", 1, doc).status_code == 200


def test_one_rollback_refuses_the_whole_batch(registry: Registry, owner: Owner) -> None:
    client = RegistryClient(registry.url, owner.write_token)
    client.upload_bundle(owner.bundle(registry.tmpdir("g5"), 5, adapters=("gamma",)))
    bundle = owner.bundle(registry.tmpdir("b3"), 3, adapters=ADAPTERS)  # gamma@3 would roll back 5
    upload_blobs(registry.url, owner.write_token, bundle)
    r = batch(registry.url, owner.write_token, owner.name, 3, signing.read_signature(bundle))
    assert r.status_code == 409 and error_code(r) == "rollback", r.text
    reader = RegistryClient(registry.url, owner.read_token)
    for name in ("alpha", "beta", "delta"):
        assert reader.list_versions(owner.name, name) == []
    assert reader.list_versions(owner.name, "gamma") == [5]


def test_batch_runs_the_publish_checks(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 2)
    doc = signing.read_signature(bundle)
    r = batch(registry.url, owner.write_token, owner.name, 2, doc)  # nothing uploaded
    assert r.status_code == 400 and error_code(r) == "missing_blob"
    upload_blobs(registry.url, owner.write_token, bundle)
    assert error_code(batch(registry.url, owner.write_token, owner.name, 3, doc)) == "version_mismatch"
    assert batch(registry.url, owner.read_token, owner.name, 2, doc).status_code == 403
    other = registry.new_owner()
    r = batch(registry.url, other.write_token, other.name, 2, doc)
    assert r.status_code == 403 and error_code(r) == "wrong_owner_key"
    tampered = json.loads(json.dumps(doc))
    tampered["statement"]["adapters"] = ["alpha"]
    assert error_code(batch(registry.url, owner.write_token, owner.name, 2, tampered)) == "bad_signature"
    assert RegistryClient(registry.url, owner.read_token).list_versions(owner.name, "alpha") == []


def test_soppu_upload_parallel_and_resumes(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1, adapters=ADAPTERS)
    files = signing.read_signature(bundle)["statement"]["files"]
    done = files[: len(files) // 2]  # an interrupted upload: some blobs are already there
    for f in done:
        assert put_blob(registry.url, owner.write_token, (bundle / f["path"]).read_bytes(), f["sha256"]).status_code == 201
    soppu = Path(sys.executable).with_name("soppu")
    cmd = [str(soppu), "upload", str(bundle), "--registry", registry.url, "--token", owner.write_token,
           "--jobs", "3", "--no-progress", "--json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout)
    assert sorted(out["skipped"]) == sorted(f["path"] for f in done)
    assert sorted(out["uploaded"]) == sorted(f["path"] for f in files[len(done):])
    assert out["adapters"] == {a: "created" for a in sorted(ADAPTERS)}
    reader = RegistryClient(registry.url, owner.read_token)
    for name in ADAPTERS:
        for f in reader.get_version(owner.name, name, 1)["files"]:
            assert reader.get_blob(f["sha256"]) == (bundle / f["path"]).read_bytes()
    again = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout)
    assert again["uploaded"] == [] and again["adapters"] == {a: "unchanged" for a in sorted(ADAPTERS)}
