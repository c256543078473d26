"""The serving host against a registry it should not trust too much (issue 10, item 7).

A real ``soppu-registry serve`` process holds the owner's signed bundles; :mod:`tests.serving.hostile`
is a malicious registry in front of it (a real HTTP server on loopback) that proxies the real
answers and then misbehaves. Each test first shows the request succeeding when legitimate (the
control) and the attack's precondition, then that the attack is refused, that nothing entered
the cache and that the next legitimate request works.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests

from lorax_adapter_source.source import SoppuModelSource
from soppu_client.format import signing
from soppu_client.format.errors import RegistryError, SignatureError, SoppuError, VerificationError
from soppu_serving import settings as settings_mod
from soppu_serving.cache import Cache, trust_id
from soppu_serving.session import forget_sessions
from tests.serving import hostile, srckit


def _sign_and_upload(reg: srckit.Registry, bundle: Path, version: int, expires: str) -> None:
    srckit.run("soppu", "sign", str(bundle), "--key", str(reg.key), "--owner", reg.owner, "--version", str(version),
               "--expires", expires)
    srckit.run("soppu", "upload", str(bundle), "--registry", reg.url, "--token", reg.write_token, "--retries", "0",
               "--no-progress", "--json")


def _fresh_bundle(published, names: tuple[str, ...], seed: int) -> Path:
    tmp = published.tmp / f"hostile-{seed}"
    ads = [srckit.write_adapter(tmp / n, seed=seed + i) for i, n in enumerate(names)]
    return srckit.compress(ads, tmp / "bundle", rank=4)


def _get(reg: srckit.Registry, path: str) -> dict:
    r = requests.get(reg.url + path, headers={"Authorization": f"Bearer {reg.serving_token}"}, timeout=10)
    r.raise_for_status()
    return r.json()


def _src(model_id: str, reg: srckit.Registry) -> SoppuModelSource:
    return SoppuModelSource(model_id, api_token=reg.serving_token)


def _seen(cache: Path, url: str, name: str) -> Path:
    """The rollback mark of alice/<name> under the unpinned trust root of registry ``url``."""
    return Cache(cache).seen_path(trust_id(None, url), "alice", name)


# -- expiry and revocation, warm or cold ----------------------------------------------------------

def test_expired_statement_is_refused_warm_and_cold(published, source_env: Path) -> None:
    reg = published.registry
    bundle = _fresh_bundle(published, ("ex0",), seed=700)
    _sign_and_upload(reg, bundle, 1, "10s")
    expires_at = srckit.version_record(reg, "ex0")["signature"]["statement"]["expires_at"]
    # Control: before expiry it is materialized, and the warm calls serve it.
    src = _src(f"{reg.owner}/ex0", reg)
    weights = src.download_model_assets()[0].parent / "adapter_model.safetensors"
    assert src.weight_files() == [weights] and src.provenance()["expires_at"] == expires_at
    assert _src(f"{reg.owner}/ex0@1", reg).weight_files() == [weights]
    wait = (datetime.strptime(expires_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
            - datetime.now(timezone.utc)).total_seconds()
    time.sleep(max(0.0, wait) + 1.0)
    # The version record is still the one reused within SOPPU_RESOLVE_TTL: expiry is checked on the clock.
    for call in (src.weight_files, src.download_model_assets, _src(f"{reg.owner}/ex0", reg).weight_files,
                 _src(f"{reg.owner}/ex0@1", reg).download_model_assets, src.get_weight_bytes):
        with pytest.raises(SignatureError) as e:
            call()
        assert e.value.code == "expired"
        assert str(e.value).startswith(f"soppu adapter alice/ex0@1: bad signature: statement expired at {expires_at} ")
        assert str(e.value).endswith("re-sign the bundle with a later --expires")
    assert weights.is_file()  # the files are still on disk; they are just no longer served


def test_withdrawn_version_and_unpinned_key_stop_the_warm_path(published, source_env: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    reg = published.registry
    bundle = _fresh_bundle(published, ("wd0",), seed=710)
    _sign_and_upload(reg, bundle, 1, "30d")
    with hostile.Hostile(reg.url) as evil:
        monkeypatch.setenv("SOPPU_REGISTRY_URL", evil.url)
        monkeypatch.setenv("SOPPU_RESOLVE_TTL", "0")
        keys = tmp_path / "trusted"
        (keys / reg.owner).mkdir(parents=True)
        shutil.copy(f"{reg.key}.pub", keys / reg.owner / "current.pub")
        monkeypatch.setenv("SOPPU_TRUSTED_KEYS", str(keys))
        src = _src(f"{reg.owner}/wd0", reg)
        local = src.download_model_assets()[0].parent
        assert src.weight_files() == [local / "adapter_model.safetensors"]  # control: warm, served
        # Revocation 1: the registry no longer lists the version (the owner or admin withdrew it).
        gone = {"error": {"code": "not_found", "message": "alice/wd0 has no version 1"}}
        evil.rules["/v1/adapters/alice/wd0/versions/1"] = hostile.json_answer(gone, status=404)
        evil.rules["/v1/adapters/alice/wd0"] = hostile.json_answer(gone, status=404)
        # (a source is one request: it verified once; every new request asks the registry again)
        for call in (_src(f"{reg.owner}/wd0", reg).weight_files, _src(f"{reg.owner}/wd0@1", reg).weight_files,
                     _src(f"{reg.owner}/wd0", reg).download_model_assets):
            with pytest.raises(RegistryError) as e:
                call()
            assert e.value.status == 404 and "unknown adapter: the registry at" in str(e.value)
        evil.rules.clear()
        assert src.weight_files() == [local / "adapter_model.safetensors"]
        # Revocation 2: the operator unpins the owner's key.
        (keys / reg.owner / "current.pub").unlink()
        with pytest.raises(SignatureError) as e:
            _src(f"{reg.owner}/wd0", reg).weight_files()
        assert e.value.code == "untrusted_key"
        assert str(e.value).startswith("soppu adapter alice/wd0: no trusted key for owner 'alice' in the pinned keys")


def test_key_rotation_with_several_pinned_keys(tmp_path: Path, source_env: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins keep working through a rotation: the old and the new key side by side in ``<owner>/``."""
    reg = srckit.start_registry(tmp_path / "rot")
    try:
        monkeypatch.setenv("SOPPU_REGISTRY_URL", reg.url)
        ads = [srckit.write_adapter(tmp_path / "ro0", seed=720)]
        bundle = srckit.compress(ads, tmp_path / "bundle", rank=4)
        reg.publish(bundle, version=1)  # signed by the first key
        old_pub, new_key = Path(f"{reg.key}.pub"), tmp_path / "keys2" / "alice-2.key"
        new_key.parent.mkdir()
        srckit.run("soppu", "keygen", "-o", str(new_key))
        proof = tmp_path / "proof.json"
        srckit.run("soppu", "rotate-key-proof", "--owner", reg.owner, "--key", str(reg.key), "--new-public-key",
                   f"{new_key}.pub", "--out", str(proof))
        srckit.run("soppu-registry", "rotate-key", "--data", str(reg.data), "--owner", reg.owner, "--new-public-key",
                   f"{new_key}.pub", "--proof", str(proof))
        reg.key = new_key
        reg.publish(bundle, version=2)  # signed by the new key
        statuses = {k["key_id"]: k["status"] for k in _get(reg, "/v1/keys/alice")["keys"]}
        old_id, new_id = signing.public_key_id(old_pub), signing.public_key_id(Path(f"{new_key}.pub"))
        assert statuses == {old_id: "rotated", new_id: "active"}

        # Unpinned: the registry's keys, active or rotated, verify both versions.
        assert _src("alice/ro0@1", reg).download_model_assets()[0].parent.name == "v1"
        assert _src("alice/ro0", reg).download_model_assets()[0].parent.name == "v2"
        # ... under trust on first use: v1 made the old key known, v2's key came in through its rotation proof.
        known = Cache(source_env).trust_dir(trust_id(None, reg.url)) / "keys" / "alice.json"
        assert set(json.loads(known.read_text())["keys"]) == {old_id, new_id}
        # Pinned with only the old key: v1 still served, v2 refused naming the key and the fix.
        keys = tmp_path / "trusted"
        keys.mkdir()
        shutil.copy(old_pub, keys / "alice.pub")
        monkeypatch.setenv("SOPPU_TRUSTED_KEYS", str(keys))
        forget_sessions()
        assert _src("alice/ro0@1", reg).weight_files()[0].parent.name == "v1"
        with pytest.raises(SignatureError) as e:
            _src("alice/ro0", reg).weight_files()
        assert e.value.code == "untrusted_key"
        assert str(e.value) == (f"soppu adapter alice/ro0@2: bad signature: it names key {new_id!r}, which is not a "
                                f"pinned key of owner 'alice' (pinned in {keys}: {old_id}); if the owner rotated to "
                                f"a new key, add its public key as {keys / 'alice'}/<any name>.pub")
        # The new key pinned beside the old one: both versions served.
        (keys / "alice").mkdir()
        shutil.copy(f"{new_key}.pub", keys / "alice" / "2025-rotation.pub")
        assert _src("alice/ro0", reg).weight_files()[0].parent.name == "v2"
        assert _src("alice/ro0@1", reg).weight_files()[0].parent.name == "v1"
    finally:
        reg.stop()


# -- a registry substituting its own key ----------------------------------------------------------

def test_substituted_owner_key_is_accepted_only_without_pins(published, source_env: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    reg = published.registry
    bundle = _fresh_bundle(published, ("sk0",), seed=730)
    _sign_and_upload(reg, bundle, 1, "30d")
    record = srckit.version_record(reg, "sk0")
    real_id = record["signature"]["key_id"]
    # The registry's own key, and the owner's statement re-signed with it, stretched to 2999.
    srckit.run("soppu", "keygen", "-o", str(tmp_path / "registry.key"))
    evil_key = signing.load_private_key(tmp_path / "registry.key")
    evil_id = signing.public_key_id(evil_key.public_key())
    forged = copy.deepcopy(record)
    forged["signature"] = signing.sign_statement({**record["signature"]["statement"],
                                                  "expires_at": "2999-01-01T00:00:00Z"}, evil_key)
    keys_doc = {"owner": "alice", "keys": [{"key_id": evil_id, "public_key": forged["signature"]["public_key"],
                                            "status": "active", "created_at": "2025-01-01T00:00:00Z",
                                            "rotated_at": None, "replaced_by": None}]}
    with hostile.Hostile(reg.url) as evil:
        monkeypatch.setenv("SOPPU_REGISTRY_URL", evil.url)
        evil.rules["/v1/adapters/alice/sk0"] = hostile.json_answer(forged)
        evil.rules["/v1/keys/alice"] = hostile.json_answer(keys_doc)
        # Control: without pins the host believes the registry, and warns once at start-up.
        monkeypatch.setattr(settings_mod, "_warned", set())
        with caplog.at_level(logging.WARNING, logger="soppu_serving"):
            src = _src("alice/sk0", reg)
            _src("alice/sk0", reg)
        warnings = [r.getMessage() for r in caplog.records if r.name == "soppu_serving"]
        assert len(warnings) == 1 and warnings[0].startswith(
            f"soppu source: SOPPU_TRUSTED_KEYS is not set, so adapters from the registry at {evil.url} are verified "
            "with the keys that registry supplies")
        src.download_model_assets()
        assert src.provenance()["key_id"] == evil_id != real_id  # the attack works without pins
        assert src.provenance()["expires_at"] == "2999-01-01T00:00:00Z"

        # Pinned: the owner's real key only. The same answers are refused, nothing is cached.
        keys = tmp_path / "trusted"
        keys.mkdir()
        shutil.copy(f"{reg.key}.pub", keys / "alice.pub")
        monkeypatch.setenv("SOPPU_TRUSTED_KEYS", str(keys))
        monkeypatch.setenv("SOPPU_CACHE_DIR", str(tmp_path / "pinned-cache"))
        forget_sessions()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="soppu_serving"):
            pinned = _src("alice/sk0", reg)
        assert [r for r in caplog.records if r.name == "soppu_serving"] == []  # pinned: no warning
        with pytest.raises(SignatureError) as e:
            pinned.download_model_assets()
        assert e.value.code == "untrusted_key"
        assert str(e.value).startswith(f"soppu adapter alice/sk0@1: bad signature: it names key {evil_id!r}, which "
                                       f"is not a pinned key of owner 'alice' (pinned in {keys}: {real_id})")
        assert srckit.cache_files(tmp_path / "pinned-cache") == []
        evil.rules.clear()  # the honest answer, same host, same pins: served
        forget_sessions()
        assert pinned.download_model_assets()[0].parent == tmp_path / "pinned-cache" / "alice" / "sk0" / "v1"


# -- rollback ------------------------------------------------------------------------------------

def test_rollback_of_latest_is_refused(published, source_env: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    reg = published.registry
    bundle = _fresh_bundle(published, ("rb0",), seed=740)
    _sign_and_upload(reg, bundle, 1, "30d")
    _sign_and_upload(reg, bundle, 2, "30d")
    v1 = _get(reg, "/v1/adapters/alice/rb0/versions/1")
    with hostile.Hostile(reg.url) as evil:
        monkeypatch.setenv("SOPPU_REGISTRY_URL", evil.url)
        assert _src("alice/rb0", reg).download_model_assets()[0].parent.name == "v2"  # the host sees v2
        assert json.loads(_seen(source_env, evil.url, "rb0").read_text())["version"] == 2
        evil.rules["/v1/adapters/alice/rb0"] = hostile.json_answer(v1)  # `latest` rolled back to v1
        forget_sessions()
        # Precondition: a host that never saw v2 takes the rolled-back answer (as every host did before).
        monkeypatch.setenv("SOPPU_CACHE_DIR", str(tmp_path / "amnesiac"))
        assert _src("alice/rb0", reg).download_model_assets()[0].parent.name == "v1"
        monkeypatch.setenv("SOPPU_CACHE_DIR", str(source_env))
        forget_sessions()
        for call in (lambda: _src("alice/rb0", reg).weight_files(),
                     lambda: _src("alice/rb0", reg).download_model_assets()):
            with pytest.raises(VerificationError) as e:
                call()
            assert e.value.code == "rollback"
            assert str(e.value) == (
                f"soppu adapter alice/rb0: rollback refused: the registry at {evil.url} answers version 1 as the "
                "latest, but this host has already verified version 2 of alice/rb0. Ask for alice/rb0@1 to serve "
                f"that version on purpose; if the owner withdrew the newer versions, delete "
                f"{_seen(source_env, evil.url, 'rb0')}")
        assert not (source_env / "alice" / "rb0" / "v1").exists()
        # Pinned on purpose: served.
        assert _src("alice/rb0@1", reg).download_model_assets()[0].parent.name == "v1"
        assert json.loads(_seen(source_env, evil.url, "rb0").read_text())["version"] == 2
        assert (source_env / "alice" / "rb0" / "latest").resolve().name == "v2"


# -- size caps and deadlines ----------------------------------------------------------------------

def test_huge_json_is_cut_at_the_cap(published, source_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = published.registry
    total = 256 << 20
    with hostile.Hostile(reg.url) as evil:
        monkeypatch.setenv("SOPPU_REGISTRY_URL", evil.url)
        monkeypatch.setenv("SOPPU_REGISTRY_RETRIES", "0")
        assert _src("alice/ad0", reg).download_model_assets()  # control: through the proxy, served
        path = "/v1/adapters/alice/ad1"
        for declare in (False, True):
            forget_sessions()
            evil.sent.clear()
            evil.rules[path] = hostile.endless_json(total, declare=declare)
            t0 = time.monotonic()
            with pytest.raises(RegistryError) as e:
                _src("alice/ad1", reg).download_model_assets()
            assert e.value.code == "response_too_large" and time.monotonic() - t0 < 10
            if declare:
                assert str(e.value) == (f"soppu adapter alice/ad1: refused the registry's answer while resolving the "
                                        f"version: GET {evil.url}{path}?signature=ref: the registry declared a JSON "
                                        f"answer of "
                                        f"{total} bytes, over the cap of {4 << 20} bytes; refused before reading it")
            else:
                assert str(e.value) == (f"soppu adapter alice/ad1: refused the registry's answer while resolving the "
                                        f"version: GET {evil.url}{path}?signature=ref: the registry sent a JSON answer "
                                        f"of more than "
                                        f"{4 << 20} bytes, over the cap; refused without reading the rest")
            time.sleep(0.5)
            # What the registry got out before the host hung up: the cap plus socket buffers, not 256 MiB.
            assert evil.sent.get(path, 0) < (4 << 20) + (32 << 20)
        assert not (source_env / "alice" / "ad1").exists()
        evil.rules.clear()
        forget_sessions()
        assert _src("alice/ad1", reg).download_model_assets()[0].parent.name == "v1"


def test_trickled_blob_is_cut_at_the_deadline(published, source_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = published.registry
    record = srckit.version_record(reg, "ad2")
    core = next(f for f in record["files"] if f["path"] == "cores/ad2.safetensors")
    data = (published.bundle / "cores" / "ad2.safetensors").read_bytes()
    with hostile.Hostile(reg.url) as evil:
        monkeypatch.setenv("SOPPU_REGISTRY_URL", evil.url)
        monkeypatch.setenv("SOPPU_DOWNLOAD_DEADLINE", "2")
        monkeypatch.setenv("SOPPU_REGISTRY_TIMEOUT", "30")  # each byte comes well within the per-read timeout
        monkeypatch.setenv("SOPPU_REGISTRY_RETRIES", "0")
        blob = f"/v1/blobs/sha256:{core['sha256']}"
        evil.rules[blob] = hostile.trickle(data, every=0.1)
        t0 = time.monotonic()
        with pytest.raises(RegistryError) as e:
            _src("alice/ad2", reg).download_model_assets()
        elapsed = time.monotonic() - t0
        assert e.value.code == "deadline" and 2.0 <= elapsed < 6.0, elapsed
        assert str(e.value).startswith(f"soppu adapter alice/ad2: refused the registry's answer while downloading "
                                       f"cores/ad2.safetensors: GET {evil.url}{blob}: the download passed its "
                                       "deadline of 2 s after ")
        assert str(e.value).endswith(f" of {core['size']} bytes; refused")
        assert 10 <= evil.sent[blob] <= 40 and core["size"] > 1000  # ~1 byte per 0.1 s, for ~2 s
        assert srckit.cache_files(source_env) == []
        evil.rules.clear()  # the next legitimate request works
        assert _src("alice/ad2", reg).download_model_assets()[0].parent.name == "v1"


# -- malformed answers ----------------------------------------------------------------------------

def _record_with(published, change) -> dict:
    doc = copy.deepcopy(srckit.version_record(published.registry, "ad0"))
    change(doc)
    return doc


def _resigned(published, change) -> dict:
    """The record of alice/ad0 whose statement ``change`` edits, signed again with the owner's key
    (a well-signed but malformed statement)."""
    doc = copy.deepcopy(srckit.version_record(published.registry, "ad0"))
    change(doc["signature"]["statement"])
    doc["signature"] = signing.sign_statement(doc["signature"]["statement"],
                                              signing.load_private_key(published.registry.key))
    return doc


VERSION = "/v1/adapters/alice/ad0"
KEYS = "/v1/keys/alice"
# (the serving host asks for records naming the signature document by digest: ?signature=ref)
_PREFIX_V = "soppu adapter alice/ad0: refused the registry's answer while resolving the version: GET {url}" + VERSION \
    + "?signature=ref"
_PREFIX_K = "soppu adapter alice/ad0: refused the registry's answer while fetching the owner's keys: GET {url}" + KEYS
_BAD_RECORD = "soppu adapter alice/ad0: the registry at {url} answered a malformed version record: "

MALFORMED = [
    ("record-list", VERSION, lambda p: hostile.json_answer([]), RegistryError, "bad_response",
     _PREFIX_V + ": the registry answered a JSON list, not an object"),
    ("record-bad-json", VERSION, lambda p: hostile.raw_answer(b'{"version": 1,'), RegistryError, "bad_response",
     _PREFIX_V + ": the registry answered invalid JSON (Expecting property name enclosed in double quotes: "
                 "line 1 column 15 (char 14))"),
    ("record-deep", VERSION, lambda p: hostile.raw_answer(b"[" * 200_000), RegistryError, "bad_response",
     _PREFIX_V + ": the registry answered JSON nested too deeply"),
    ("record-gzip", VERSION, lambda p: hostile.raw_answer(b"\x1f\x8b", headers={"Content-Encoding": "gzip"}),
     RegistryError, "bad_response",
     _PREFIX_V + ": the registry sent a JSON answer with Content-Encoding 'gzip'; only identity is accepted"),
    ("record-version-str", VERSION, lambda p: hostile.json_answer(_record_with(p, lambda d: d.update(version="1"))),
     RegistryError, "bad_record", _BAD_RECORD + "`version` must be an integer >= 1, got '1'"),
    ("record-no-signature", VERSION, lambda p: hostile.json_answer(_record_with(p, lambda d: d.pop("signature"))),
     RegistryError, "bad_record", _BAD_RECORD + "`signature` must be a JSON object, got nothing"),
    ("record-other-owner", VERSION,
     lambda p: hostile.json_answer(_record_with(p, lambda d: d.update(owner="mallory"))),
     RegistryError, "bad_record", _BAD_RECORD + "`owner` must be 'alice', got 'mallory'"),
    ("signature-empty", VERSION, lambda p: hostile.json_answer(_record_with(p, lambda d: d.update(signature={}))),
     SignatureError, "unknown_key", "soppu adapter alice/ad0: bad signature: the signature names key None, which is "
                                    "not a registered key of owner 'alice'"),
    ("statement-size-str", VERSION,
     lambda p: hostile.json_answer(_resigned(p, lambda st: st["files"][0].update(size="12"))),
     SignatureError, "bad_statement", "soppu adapter alice/ad0@1: bad signature: signed statement is malformed: "
                                      "files must be a list of {path, sha256 (64 hex), size (int)}"),
    ("keys-str", KEYS, lambda p: hostile.json_answer({"owner": "alice", "keys": "x"}), RegistryError, "bad_response",
     _PREFIX_K + ": the registry's answer has no valid `keys` (expected a list, got a str)"),
    ("keys-missing", KEYS, lambda p: hostile.json_answer({"owner": "alice"}), RegistryError, "bad_response",
     _PREFIX_K + ": the registry's answer has no valid `keys` (expected a list, got nothing)"),
    ("keys-entry-junk", KEYS, lambda p: hostile.json_answer({"keys": [{"key_id": 1}, 5]}), RegistryError,
     "bad_response", _PREFIX_K + ": the registry's answer has no valid `keys` (expected a list of objects)"),
    ("keys-bad-base64", KEYS,
     lambda p: hostile.json_answer({"keys": [{"key_id": srckit.version_record(p.registry, "ad0")["signature"]
                                              ["key_id"], "public_key": "not base64!"}]}),
     SignatureError, "unknown_key", "soppu adapter alice/ad0: bad signature: the signature names key 'ed25519:"),
    ("keys-huge", KEYS, lambda p: hostile.endless_json(64 << 20, declare=False), RegistryError, "response_too_large",
     _PREFIX_K + f": the registry sent a JSON answer of more than {4 << 20} bytes, over the cap; refused without "
                 "reading the rest"),
    ("error-huge", VERSION, lambda p: hostile.endless_json(64 << 20, declare=False, status=500), RegistryError, None,
     "soppu adapter alice/ad0: registry error while resolving the version: GET {url}" + VERSION
     + "?signature=ref: HTTP 500 Internal Server Error: {\"pad\": \""),
]


@pytest.mark.parametrize("case, path, rule, kind, code, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_answers_are_named_errors(published, source_env: Path, monkeypatch: pytest.MonkeyPatch,
                                            case, path, rule, kind, code, message) -> None:
    reg = published.registry
    with hostile.Hostile(reg.url) as evil:
        monkeypatch.setenv("SOPPU_REGISTRY_URL", evil.url)
        monkeypatch.setenv("SOPPU_REGISTRY_RETRIES", "0")
        evil.rules[path] = rule(published)
        with pytest.raises(SoppuError) as e:
            _src("alice/ad0", reg).download_model_assets()
        assert type(e.value) is kind and e.value.code == code, repr(e.value)
        assert str(e.value).startswith(message.replace("{url}", evil.url)), str(e.value)
        assert (("GET", path) in evil.seen) and srckit.cache_files(source_env) == []
        evil.rules.clear()
        forget_sessions()
        assert _src("alice/ad0", reg).download_model_assets()[0].parent.name == "v1"  # the next one works


def test_the_client_path_has_the_same_caps(published, tmp_path: Path) -> None:
    """``soppu project --onto-published`` fetches through the same ``fetch_verified`` and client caps."""
    from soppu_client.fetch import fetch_published_basis
    from soppu_client.registry_client import DOWNLOAD_DEADLINE, MAX_JSON_BYTES, RegistryClient

    reg = published.registry
    assert (RegistryClient(reg.url).max_json_bytes, RegistryClient(reg.url).download_deadline) == (
        MAX_JSON_BYTES, DOWNLOAD_DEADLINE) == (4 << 20, 600.0)  # what the CLI's client gets
    record = srckit.version_record(reg, "ad1")
    basis = next(f for f in record["files"] if f["path"] == "basis.safetensors")
    with hostile.Hostile(reg.url) as evil:
        client = RegistryClient(evil.url, reg.read_token, retries=0, download_deadline=1.0)
        bundle, _ = fetch_published_basis(client, "alice/ad1", tmp_path / "ok")  # control
        assert (tmp_path / "ok" / "basis.safetensors").stat().st_size == basis["size"]
        evil.rules[f"/v1/blobs/sha256:{basis['sha256']}"] = hostile.trickle(b"x" * basis["size"], every=0.05)
        with pytest.raises(RegistryError) as e:
            fetch_published_basis(client, "alice/ad1", tmp_path / "slow")
        assert e.value.code == "deadline" and str(e.value).startswith(
            f"published adapter alice/ad1@1: registry error while downloading basis.safetensors: GET {evil.url}"
            f"/v1/blobs/sha256:{basis['sha256']}: the download passed its deadline of 1 s after ")
        assert not (tmp_path / "slow").exists()
        evil.rules["/v1/adapters/alice/ad1"] = hostile.endless_json(64 << 20, declare=False)
        with pytest.raises(RegistryError) as e:
            fetch_published_basis(client, "alice/ad1", tmp_path / "huge")
        assert e.value.code == "response_too_large" and not (tmp_path / "huge").exists()
