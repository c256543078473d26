"""soppu_client.fetch.fetch_verified against the real registry: the one resolve + verify + download
path of the client (``soppu project --onto-published``) and the serving side."""

from __future__ import annotations

from pathlib import Path

import pytest

from soppu_client.fetch import VerifiedVersion, fetch_verified, resolve_version, verify_version
from soppu_client.format import signing
from soppu_client.format.errors import RegistryError, SignatureError, VerificationError
from soppu_client.format.fsutil import file_digest
from soppu_client.registry_client import RegistryClient
from tests.serving import srckit

CORE = "cores/ad0.safetensors"


def test_downloads_what_is_asked_and_reuses_verified_local_files(published, tmp_path: Path) -> None:
    reg = published.registry
    client = RegistryClient(reg.url, reg.read_token, retries=0)
    basis = published.bundle / "basis.safetensors"
    basis_sha, basis_size = file_digest(basis)
    asked: list[tuple[str, int]] = []

    def reuse(sha256: str, size: int) -> Path | None:
        asked.append((sha256, size))
        return basis if (sha256, size) == (basis_sha, basis_size) else None

    got = fetch_verified(client, f"{reg.owner}/ad0", ["basis.safetensors", CORE], tmp_path / "out", reuse=reuse,
                         adapter="ad0", subject="soppu adapter")
    assert got.verified.label == "soppu adapter alice/ad0@1" and got.statement["adapters"] == published.adapters
    assert got.downloaded == ["manifest.json", CORE] and got.reused == ["basis.safetensors"]
    assert len(asked) == 3 and set(got.fresh) == {file_digest(got.dir / r)[0] for r in ("manifest.json", CORE)}
    for rel in ("manifest.json", "basis.safetensors", CORE):  # the signed bytes, at their bundle paths
        assert (got.dir / rel).read_bytes() == (published.bundle / rel).read_bytes()
    assert got.bytes_downloaded == sum((published.bundle / r).stat().st_size for r in ("manifest.json", CORE))
    assert sorted(p.name for p in (got.dir / "cores").iterdir()) == ["ad0.safetensors"]  # no other core


def test_the_steps_one_at_a_time(published, tmp_path: Path) -> None:
    reg = published.registry
    client = RegistryClient(reg.url, reg.serving_token, retries=0)
    record = resolve_version(client, f"{reg.owner}/ad1@1", subject="published adapter")
    assert (record.version, record.label) == (1, "published adapter alice/ad1@1")
    verified = verify_version(client, record, public_key=signing.load_public_key(Path(f"{reg.key}.pub")))
    assert isinstance(verified, VerifiedVersion)
    # Nothing is written for a file the signed statement does not cover.
    with pytest.raises(VerificationError) as e:
        fetch_verified(client, verified, ["cores/nope.safetensors"], tmp_path / "none")
    assert str(e.value) == "published adapter alice/ad1@1: the signed statement does not cover cores/nope.safetensors"
    assert not (tmp_path / "none").exists()
    got = fetch_verified(client, verified, [], tmp_path / "manifest-only")
    assert got.downloaded == ["manifest.json"] and got.manifest["base_model"] == srckit.BASE_MODEL


def test_wrong_pinned_key_and_refused_token(published, tmp_path: Path) -> None:
    reg = published.registry
    other = tmp_path / "other.key"
    srckit.run("soppu", "keygen", "-o", str(other))
    client = RegistryClient(reg.url, reg.read_token, retries=0)
    with pytest.raises(SignatureError, match=r"^published adapter alice/ad0@1: bad signature: "):
        fetch_verified(client, f"{reg.owner}/ad0", ["basis.safetensors"], tmp_path / "o1",
                       public_key=signing.load_public_key(Path(f"{other}.pub")), subject="published adapter")
    assert not (tmp_path / "o1").exists()
    with pytest.raises(SignatureError) as e:  # a pinned-keys dir without the owner's key
        fetch_verified(client, f"{reg.owner}/ad0", ["basis.safetensors"], tmp_path / "o2", trusted_keys=tmp_path)
    assert str(e.value) == (f"adapter alice/ad0: no trusted key for owner 'alice' in the pinned keys dir {tmp_path} "
                            f"(neither {tmp_path / 'alice.pub'} nor {tmp_path / 'alice'}/*.pub exists; add the owner's "
                            "public key there)")
    bad = RegistryClient(reg.url, "soppu_0000000000000000_nope", retries=0)
    with pytest.raises(RegistryError, match=r"^adapter alice/ad0: registry error while resolving the version: "
                                            r"GET .*: HTTP 401") as e:
        fetch_verified(bad, f"{reg.owner}/ad0", ["basis.safetensors"], tmp_path / "o3")
    assert e.value.status == 401
