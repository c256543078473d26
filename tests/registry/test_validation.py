"""Every path, header and body field is validated (issue 10, items 5 and 6): malformed input is a
400/404 in the JSON error shape, never a 500 (the session fixture asserts no Traceback in the log),
and a bundle the serving host could not serve is refused with the field named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from soppu_client.format import signing
from soppu_client.format.bundle import Manifest
from soppu_client.format.errors import BundleError
from soppu_client.registry_client import RegistryClient
from tests import conftest_bundles
from tests.registry.regkit import (
    FUTURE,
    Owner,
    Registry,
    Server,
    auth,
    error_code,
    make_bundle,
    new_owner,
    publish,
    put_blob,
    upload_blobs,
)
from tests.registry.services import Backend

INT64_MAX = 2**63 - 1


def _error(r: requests.Response) -> tuple[int, str, str]:
    return r.status_code, error_code(r), r.json()["error"]["message"]


# --------------------------------------------------------------------------- headers, paths, JSON


def test_unicode_digit_size_header_is_400(registry: Registry, owner: Owner) -> None:
    assert "²".isdigit()  # the precondition of the old 500: isdigit() accepts it, int() does not
    with pytest.raises(ValueError):
        int("²")
    data = b"sized blob " + owner.name.encode()
    assert put_blob(registry.url, owner.write_token, data, **{"X-Soppu-Size": str(len(data))}).status_code == 201
    for bad in ("²", "¹2", "+12", "1e3", "99999999999999999999"):
        r = put_blob(registry.url, owner.write_token, b"x" * 12, **{"X-Soppu-Size": bad})
        assert _error(r) == (400, "bad_request", f"header x-soppu-size must be a non-negative integer of ASCII "
                                                 f"digits, got {bad!r}"), bad


def test_deeply_nested_publish_body_is_400(registry: Registry, owner: Owner) -> None:
    bundle = owner.bundle(registry.tmpdir("b"), 1)
    upload_blobs(registry.url, owner.write_token, bundle)
    body = b'{"signature": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(RecursionError):  # what the old code fed to json.loads
        json.loads(body)
    url = f"{registry.url}/v1/adapters/{owner.name}/alpha/versions/1"
    r = requests.put(url, data=body, headers={**auth(owner.write_token), "Content-Type": "application/json"}, timeout=30)
    assert _error(r) == (400, "bad_request", "publish body nests JSON deeper than 32 levels")
    r = requests.put(url, data=b"\xff{not json", headers=auth(owner.write_token), timeout=30)
    assert r.status_code == 400 and error_code(r) == "bad_request" and "publish body is not JSON" in r.text
    assert publish(registry.url, owner.write_token, owner.name, "alpha", 1, signing.read_signature(bundle)).status_code == 201


@pytest.mark.parametrize("version", ["99999999999999999999999", str(INT64_MAX + 1), "0", "-1", "+1", "1.0", "٣", "1_0"])
def test_version_outside_int64_or_not_ascii_digits_is_400(registry: Registry, owner: Owner, version: str) -> None:
    client = RegistryClient(registry.url, owner.write_token)
    client.upload_bundle(owner.bundle(registry.tmpdir("b"), 1))
    base = f"{registry.url}/v1/adapters/{owner.name}/alpha/versions"
    assert requests.get(f"{base}/1", headers=auth(owner.read_token), timeout=30).status_code == 200  # control
    want = (400, "bad_request", f"version must be an integer from 1 to {INT64_MAX} in ASCII digits, got {version!r}")
    assert _error(requests.get(f"{base}/{version}", headers=auth(owner.read_token), timeout=30)) == want
    assert _error(requests.put(f"{base}/{version}", json={"signature": {}}, headers=auth(owner.write_token),
                               timeout=30)) == want
    # the largest int64 is a valid version number: a plain 404, not an overflow
    r = requests.get(f"{base}/{INT64_MAX}", headers=auth(owner.read_token), timeout=30)
    assert _error(r) == (404, "not_found", f"{owner.name}/alpha has no published version {INT64_MAX}")


def test_openapi_documents_the_error_shape(registry: Registry) -> None:
    doc = requests.get(f"{registry.url}/openapi.json", timeout=30).json()
    assert doc["components"]["schemas"]["Error"]["required"] == ["error"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (path, method)
            if method == "head":  # no body: statuses documented without content
                assert not any("content" in r for r in op["responses"].values()) and "404" in op["responses"]
                continue
            for status in ("400", "401", "404", "413", "429"):
                assert op["responses"][status]["content"]["application/json"]["schema"] == \
                    {"$ref": "#/components/schemas/Error"}, (path, method, status)


# --------------------------------------------------------------------------- bundles the host cannot serve


def _edited(owner: Owner, root: Path, edit: Callable[[dict[str, Any]], None], version: int = 1) -> Path:
    """A valid bundle whose manifest ``edit`` changed, with its digest updated and re-signed by ``owner``."""
    owner.bundle(root, version)
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    signing.sign_bundle(root, owner.key, owner.name, version, FUTURE)
    return root


def _set(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m.update(fields)


def _adapter(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["adapters"]["alpha"].update(fields)


def _shape_and_rank(m: dict[str, Any]) -> None:
    m["modules"]["model.layers.0.self_attn.q_proj"]["shape"] = [576, 576]
    m["rank"] = 1024


@pytest.mark.parametrize(("edit", "field_message"), [
    (_set(dtype="float64"), "`dtype` 'float64' is not one of float32, bfloat16, float16"),
    (_set(dtype="int32"), "`dtype` 'int32' is not one of float32, bfloat16, float16"),
    (lambda m: (m.update(clusters=2), m["adapters"]["alpha"].update(cluster=7)),
     "adapter `alpha`: `cluster` 7 is not one of the bundle's 2 cluster(s)"),
    (_adapter(core="cores/beta.safetensors"), "adapter `alpha` has an invalid name or core path `cores/beta.safetensors`"),
    (_adapter(core="other/alpha.safetensors"), "adapter `alpha` has an invalid name or core path `other/alpha.safetensors`"),
    (_shape_and_rank, "`rank` 1024 exceeds min(d_out, d_in) of module `model.layers.0.self_attn.q_proj` (576 x 576) "
                      "and 1 more"),
], ids=["float64", "int32", "cluster-7-of-2", "core-of-another", "core-outside-cores", "k1024-on-576x576"])
def test_unservable_bundle_is_refused_naming_the_field(registry: Registry, owner: Owner, edit: Callable[[dict[str, Any]], None],
                                                       field_message: str) -> None:
    control = owner.bundle(registry.tmpdir("ok"), 1)
    assert RegistryClient(registry.url, owner.write_token).upload_bundle(control).adapters["alpha"] == "created"
    bad = _edited(owner, registry.tmpdir("bad"), edit, version=2)
    upload_blobs(registry.url, owner.write_token, bad)  # the signature and every blob are in order
    r = publish(registry.url, owner.write_token, owner.name, "alpha", 2, signing.read_signature(bad))
    status, code, message = _error(r)
    assert (status, code) == (400, "bad_manifest")
    assert message.startswith("manifest.json: manifest does not match its signature: manifest.json is invalid:")
    assert f"  - {field_message}" in message.splitlines()
    # the shared core refuses it the same way wherever a manifest is read (serving source included)
    with pytest.raises(BundleError, match="is invalid") as e:
        Manifest.from_json(json.loads((bad / "manifest.json").read_text()))
    assert f"  - {field_message}" in str(e.value).splitlines()


WIDE = {"model.layers.0.self_attn.q_proj": (576, 576)}


def _wide_bundle(owner: Owner, root: Path, version: int, rank: int) -> Path:
    """A consistent diag bundle on one 576 x 576 module (basis [576, k], cores [k]), signed."""
    conftest_bundles.make_bundle(root, ("alpha",), seed=version, method="diag", rank=rank, modules=WIDE)
    signing.sign_bundle(root, owner.key, owner.name, version, FUTURE)
    return root


def _server(tmp_path_factory: pytest.TempPathFactory, backend: Backend, label: str, *args: str) -> Iterator[Registry]:
    tmp = tmp_path_factory.mktemp(label)
    server = Server(tmp / "data", "--rate", "0", *args, backend=backend).start()
    try:
        yield Registry(server, tmp)
    finally:
        server.stop()
    assert "Traceback" not in (tmp / f"server-{server.port}.log").read_text()


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Registry]:
    """Default rank cap (256), room for a k=1024 basis on 576 x 576 (4.7 MB)."""
    yield from _server(tmp_path_factory, backend, "wide", "--max-blob-bytes", str(16 << 20))


@pytest.fixture(scope="module")
def rank_capped(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Registry]:
    yield from _server(tmp_path_factory, backend, "rankcap", "--max-rank", "2")


def test_basis_rank_above_module_dims_is_refused(wide: Registry) -> None:
    owner = new_owner(wide.store, "wide1", wide.tmp / "keys")
    client = RegistryClient(wide.url, owner.write_token)
    assert client.upload_bundle(_wide_bundle(owner, wide.tmpdir("k64"), 1, 64)).adapters["alpha"] == "created"
    bad = _wide_bundle(owner, wide.tmpdir("k1024"), 2, 1024)  # every tensor agrees with the manifest
    assert (bad / "basis.safetensors").stat().st_size > 4_000_000 and (bad / "cores/alpha.safetensors").stat().st_size < 5000
    upload_blobs(wide.url, owner.write_token, bad)
    r = publish(wide.url, owner.write_token, owner.name, "alpha", 2, signing.read_signature(bad))
    assert _error(r) == (400, "bad_manifest", "manifest.json: manifest does not match its signature: manifest.json is "
                                              "invalid:\n  - `rank` 1024 exceeds min(d_out, d_in) of module "
                                              "`model.layers.0.self_attn.q_proj` (576 x 576)")


def test_default_rank_cap_is_256(wide: Registry) -> None:
    owner = new_owner(wide.store, "wide2", wide.tmp / "keys")
    client = RegistryClient(wide.url, owner.write_token)
    assert client.upload_bundle(_wide_bundle(owner, wide.tmpdir("k256"), 1, 256)).adapters["alpha"] == "created"
    bad = _wide_bundle(owner, wide.tmpdir("k257"), 2, 257)
    upload_blobs(wide.url, owner.write_token, bad)
    r = publish(wide.url, owner.write_token, owner.name, "alpha", 2, signing.read_signature(bad))
    assert _error(r) == (400, "bad_manifest", "manifest.json: `rank` 257 exceeds this registry's limit of 256 "
                                              "(--max-rank); compress with a smaller --rank")


def test_rank_cap_is_configurable(rank_capped: Registry) -> None:
    owner = new_owner(rank_capped.store, "capped", rank_capped.tmp / "keys")
    client = RegistryClient(rank_capped.url, owner.write_token)
    assert client.upload_bundle(owner.bundle(rank_capped.tmpdir("k2"), 1)).adapters["alpha"] == "created"  # k = cap
    root = rank_capped.tmpdir("k3")
    make_bundle(root, rank=3)  # k=3 fits every module (min dimension 3), but not --max-rank 2
    signing.sign_bundle(root, owner.key, owner.name, 2, FUTURE)
    upload_blobs(rank_capped.url, owner.write_token, root)
    r = publish(rank_capped.url, owner.write_token, owner.name, "alpha", 2, signing.read_signature(root))
    assert _error(r) == (400, "bad_manifest", "manifest.json: `rank` 3 exceeds this registry's limit of 2 (--max-rank); "
                                              "compress with a smaller --rank")
