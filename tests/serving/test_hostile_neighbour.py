"""The serving cache against a hostile neighbour with write access to the cache dir (issue 20).

Each attack is tried the way it was found against the earlier cache: tamper the bytes of a
materialized dir and request it again, plant symlinks under the root, prune through a symlinked
owner dir, let an unpinned host sharing the cache raise a rollback mark from a compromised
registry. Everything is real: the registry process, the LoRAX source, ``soppu-cache prune``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lorax_adapter_source.source import SoppuModelSource
from soppu_client.format import signing
from soppu_serving import CacheError, Session, Settings
from soppu_serving.cache import trust_id
from soppu_serving.session import forget_sessions
from tests.serving import hostile, srckit


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_tensor_bytes(path: Path) -> None:
    """Flip every byte after the safetensors header, in place (same inode, as a neighbour would)."""
    with open(path, "r+b") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        data = bytearray(f.read())
        f.seek(8 + header)
        f.write(bytes(b ^ 0xFF for b in data))


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir(exist_ok=True)
    return out


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("form", ["peft", "compressed"])
def test_a_warm_hit_never_serves_tampered_bytes(published, source_env: Path, form: str) -> None:
    reg = published.registry
    src = SoppuModelSource("alice/ad0", api_token=reg.serving_token, form=form)
    local = Path(src.download_model_assets()[0]).parent
    weights = [local / n for n in src.cache.weight_names]
    verified = {w.name: _sha(w) for w in weights}
    for round_ in ("same process", "new process"):
        if round_ == "new process":
            forget_sessions()  # a fresh process: nothing in memory vouches for the files on disk
        for w in weights:
            _flip_tensor_bytes(w)
        assert all(_sha(w) != verified[w.name] for w in weights)  # non-vacuous: every file tampered
        again = SoppuModelSource("alice/ad0", api_token=reg.serving_token, form=form)
        files = again.weight_files() if round_ == "new process" else again.download_model_assets()
        assert {Path(f).parent for f in files} == {local}
        assert {w.name: _sha(w) for w in weights} == verified, round_  # what was verified is what is handed over
        assert again.last_stats.replaced_tampered and again.last_stats.blobs_downloaded == []


@pytest.mark.parametrize("planted", [".tmp", ".blobs/sha256", ".locks", "seen-owner", "owner", "version"])
def test_no_symlink_under_the_root_is_followed(published, source_env: Path, tmp_path: Path, planted: str) -> None:
    reg = published.registry
    outside = _outside(tmp_path)
    session = Session(Settings(registry_url=reg.url, cache_dir=source_env))
    if planted == "version":  # a look-alike of a served dir, with other weights
        good = session.serve("alice/ad1", reg.serving_token).path
        look = outside / "v1"
        shutil.copytree(good, look)
        _flip_tensor_bytes(look / "adapter_model.safetensors")
        forget_sessions()
        session = Session(Settings(registry_url=reg.url, cache_dir=source_env))
        shutil.rmtree(good)
        os.symlink(look, good)
        target = "alice/ad1"
    else:
        link = {".tmp": source_env / ".tmp", ".blobs/sha256": source_env / ".blobs" / "sha256",
                ".locks": source_env / ".locks",
                "seen-owner": session.cache.seen_path(session.trust, "alice", "x").parent,
                "owner": source_env / "alice"}[planted]
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(outside, link)
        target = "alice/ad0"
    before = _tree(outside)
    with pytest.raises(CacheError) as e:
        session.serve(target, reg.serving_token)
    assert e.value.code == "cache_tampered"
    assert "the cache follows no symlinks under its root" in str(e.value) and str(source_env) in str(e.value)
    assert _tree(outside) == before  # nothing written outside the cache, nothing served from there


def test_prune_never_leaves_the_root(published, source_env: Path, tmp_path: Path) -> None:
    reg = published.registry
    session = Session(Settings(registry_url=reg.url, cache_dir=source_env))
    session.serve("alice/ad0", reg.serving_token)
    outside = _outside(tmp_path)
    for v in (1, 2, 3):  # look-alike version dirs of an owner `mallory` that lives outside the cache
        d = outside / "alpha" / f"v{v}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"precious")
    (outside / "precious.bin").write_bytes(b"precious")
    os.symlink(outside, source_env / "mallory")
    os.symlink(outside / "precious.bin", source_env / ".blobs" / "sha256" / ("0" * 64))
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    proc = subprocess.run([str(srckit.BIN / "soppu-cache"), "prune", "--cache", str(source_env), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    assert report["links"] == 1 and not [d for d in report["removed_dirs"] if "mallory" in d]
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before
    assert not os.path.lexists(source_env / ".blobs" / "sha256" / ("0" * 64))  # the planted link went, not its target
    assert session.cache.is_complete(session.cache.version_dir("alice", "ad0", 1))


def test_rollback_marks_belong_to_the_trust_root_they_were_made_under(published, source_env: Path,
                                                                        tmp_path: Path) -> None:
    """An unpinned host on a compromised registry accepts a forged v99 (first use of the registry's
    key); a pinned host sharing the cache still serves the real latest."""
    reg = published.registry
    record = srckit.version_record(reg, "ad2")
    srckit.run("soppu", "keygen", "-o", str(tmp_path / "registry.key"))
    evil_key = signing.load_private_key(tmp_path / "registry.key")
    forged = copy.deepcopy(record)
    forged["version"] = 99
    forged["signature"] = signing.sign_statement({**record["signature"]["statement"], "version": 99}, evil_key)
    evil_id = signing.public_key_id(evil_key.public_key())
    keys_doc = {"owner": "alice", "keys": [{"key_id": evil_id, "public_key": forged["signature"]["public_key"],
                                            "status": "active", "rotation_proof": None}]}
    with hostile.Hostile(reg.url) as evil:
        evil.rules["/v1/adapters/alice/ad2"] = hostile.json_answer(forged)
        evil.rules["/v1/keys/alice"] = hostile.json_answer(keys_doc)
        unpinned = Session(Settings(registry_url=evil.url, cache_dir=source_env))
        assert unpinned.serve("alice/ad2", reg.serving_token).version == 99  # the attack on an unpinned host
    mark = unpinned.cache.seen_path(trust_id(None, evil.url), "alice", "ad2")
    assert json.loads(mark.read_text())["version"] == 99
    keys = tmp_path / "trusted"
    keys.mkdir()
    shutil.copy(f"{reg.key}.pub", keys / "alice.pub")
    pinned = Session(Settings(registry_url=reg.url, cache_dir=source_env, trusted_keys=keys))
    served = pinned.serve("alice/ad2", reg.serving_token)
    assert served.version == 1 and served.verified.record.signature["key_id"] != evil_id
    assert pinned.trust != unpinned.trust
    assert json.loads(pinned.cache.seen_path(pinned.trust, "alice", "ad2").read_text())["version"] == 1
