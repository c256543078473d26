"""`soppu project --onto-published` and `soppu bases` against the real registry of this directory's
fixtures: client-side projection onto a published basis, fetched and verified, never the cores."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.serving import srckit

from soppu_client.format.fsutil import file_digest


def soppu(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(srckit.BIN / "soppu"), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_project_onto_a_published_basis_equals_the_local_projection(published, tmp_path: Path) -> None:
    reg = published.registry
    new = [srckit.write_adapter(tmp_path / "new" / f"nu{i}", seed=500 + i) for i in range(2)]
    out = tmp_path / "projected"
    proc = soppu("project", *new, "--onto-published", f"{reg.owner}/ad1", "--registry", reg.url,
                 "--token", reg.read_token, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["fit"]["projected_onto"] == f"{reg.url}/{reg.owner}/ad1@1"
    # The published basis, byte for byte: an upload of this bundle sends only the new cores.
    assert (out / "basis.safetensors").read_bytes() == (published.bundle / "basis.safetensors").read_bytes()
    # Same cores as projecting onto the local copy of that bundle.
    local = tmp_path / "projected-local"
    assert soppu("project", *new, "--onto", published.bundle, "-o", local).returncode == 0
    for name in ("nu0", "nu1"):
        mine, theirs = file_digest(out / "cores" / f"{name}.safetensors"), file_digest(local / "cores" / f"{name}.safetensors")
        assert mine == theirs
    errors = payload["metrics"]["summary"]["adapters"]
    assert set(errors) == {"nu0", "nu1"} and all(0 < e["error"] < 1 for e in errors.values())

    srckit.run("soppu", "sign", str(out), "--key", str(reg.key), "--owner", reg.owner, "--version", "1",
               "--expires", "30d")
    up = json.loads(srckit.run("soppu", "upload", str(out), "--registry", reg.url, "--token", reg.write_token,
                               "--no-progress", "--json"))
    assert "basis.safetensors" in up["skipped"] and "basis.safetensors" not in up["uploaded"]


def test_bases_lists_the_published_basis(published) -> None:
    reg = published.registry
    proc = soppu("bases", srckit.BASE_MODEL, "--registry", reg.url, "--token", reg.serving_token, "--json")
    assert proc.returncode == 0, proc.stderr
    digest, _ = file_digest(published.bundle / "basis.safetensors")
    found = {b["digest"]: b for b in json.loads(proc.stdout)["bases"]}
    users = {(u["owner"], u["name"]) for u in found[f"sha256:{digest}"]["used_by"]}
    assert {(reg.owner, n) for n in ("ad0", "ad1", "ad2")} <= users
    # A token of another owner sees none of alice's bases.
    other = json.loads(soppu("bases", srckit.BASE_MODEL, "--registry", reg.url, "--token", reg.other_owner_token,
                             "--json").stdout)
    assert all(u["owner"] != reg.owner for b in other["bases"] for u in b["used_by"])


def test_tampered_basis_and_wrong_key_are_refused(published, tmp_path: Path) -> None:
    reg = published.registry
    new = srckit.write_adapter(tmp_path / "nu9", seed=900)
    bundle = srckit.publish_fresh(published, ("pb0",), seed=600)

    other_key = tmp_path / "other.key"
    srckit.run("soppu", "keygen", "-o", str(other_key))
    proc = soppu("project", new, "--onto-published", f"{reg.owner}/pb0", "--registry", reg.url, "--token",
                 reg.read_token, "--public-key", f"{other_key}.pub", "-o", tmp_path / "o1")
    assert proc.returncode == 1 and "published adapter alice/pb0@1: bad signature" in proc.stderr
    assert not (tmp_path / "o1").exists()

    digest, _ = file_digest(bundle / "basis.safetensors")
    blob = next(reg.data.glob(f"blobs/sha256/*/{digest}"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    proc = soppu("project", new, "--onto-published", f"{reg.owner}/pb0", "--registry", reg.url, "--token",
                 reg.read_token, "-o", tmp_path / "o2")
    assert proc.returncode == 1
    assert "published adapter alice/pb0@1: digest mismatch: the registry served basis.safetensors" in proc.stderr
    assert not (tmp_path / "o2").exists()

    proc = soppu("project", new, "-o", tmp_path / "o3")
    assert proc.returncode == 2 and "give exactly one of --onto BUNDLE and --onto-published" in proc.stderr
    proc = soppu("project", new, "--onto-published", "no-slash", "--registry", reg.url, "-o", tmp_path / "o3")
    assert proc.returncode == 2 and "must look like `owner/name` or `owner/name@version`" in proc.stderr
