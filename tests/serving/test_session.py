"""The serving session (issue 20): one request costs one signature verification, its registry
requests and no more, over one pooled connection; the engine's check runs before any download
and a refused version raises no mark; a cache dir that is a file is a clear error.

Everything is real: the registry is a ``soppu-registry serve`` process, the connections are
counted server-side by a keep-alive proxy in front of it (:mod:`tests.serving.counting`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import requests

from soppu_client.format.errors import InputError, SoppuError
from soppu_serving import VLLM, Session, Settings
from tests.serving import srckit
from tests.serving.counting import Counting


def _session(url: str, cache: Path, **kw) -> Session:
    return Session(Settings(registry_url=url, cache_dir=cache, resolve_ttl=60, **kw), wording=VLLM)


def test_one_request_one_verification_one_connection(published, tmp_path: Path) -> None:
    reg = published.registry
    record = srckit.version_record(reg, "ad0")
    digests = {f["path"]: f["sha256"] for f in record["files"]}
    with Counting(reg.url) as proxy:
        session = _session(proxy.url, tmp_path / "cache")
        c0, r0 = proxy.snapshot()
        assert (c0, r0) == (0, 0)
        served = session.serve("alice/ad0", reg.serving_token)
        c1, r1 = proxy.snapshot()
        # Cold: the record (naming the bundle's signature document by digest), that document, the
        # owner's keys, then the three signed blobs, on one connection.
        sig = hashlib.sha256(srckit.signature_text(reg, "ad0").encode()).hexdigest()
        assert [p for _, p in proxy.requests[r0:r1]] == [
            "/v1/adapters/alice/ad0?signature=ref", f"/v1/signatures/sha256:{sig}", "/v1/keys/alice",
            f"/v1/blobs/sha256:{digests['manifest.json']}", f"/v1/blobs/sha256:{digests['basis.safetensors']}",
            f"/v1/blobs/sha256:{digests['cores/ad0.safetensors']}"]
        assert served.stats.registry_requests == r1 - r0 == 6
        assert served.stats.verifications == served.stats.signature_checks == 1
        assert served.stats.materialized and not served.stats.warm
        assert c1 - c0 == 1, f"{c1 - c0} connections for one request"

        # A second request, another adapter of the bundle: its record and its core; no new connection.
        second = session.serve("alice/ad1", reg.serving_token)
        c2, r2 = proxy.snapshot()
        core1 = next(f["sha256"] for f in srckit.version_record(reg, "ad1")["files"]
                     if f["path"] == "cores/ad1.safetensors")
        # The bundle's signature document is not moved again: verified once per request all the same,
        # from this process's verdict on the same bytes (expiry, owner, name, version checked again).
        assert [p for _, p in proxy.requests[r1:r2]] == ["/v1/adapters/alice/ad1?signature=ref",
                                                         f"/v1/blobs/sha256:{core1}"]
        assert second.stats.registry_requests == r2 - r1 == 2
        assert second.stats.verifications == 1 and second.stats.signature_checks == 0
        assert second.stats.blobs_downloaded == ["cores/ad1.safetensors"]
        assert c2 - c1 == 0

        # A third, warm: verified again (once), nothing downloaded, the record reused within the TTL.
        warm = session.serve("alice/ad0", reg.serving_token)
        c3, r3 = proxy.snapshot()
        assert warm.stats.warm and not warm.stats.materialized and warm.stats.verifications == 1
        assert warm.stats.registry_requests == r3 - r2 == 0 and c3 == c2
        assert warm.path == served.path
    # The document by digest: its exact bytes to a reader of alice's adapters, the 404 of an absent
    # one to a token of another owner (no oracle), a 400 for a malformed digest.
    url = f"{reg.url}/v1/signatures/sha256:{sig}"
    ok = requests.get(url, headers={"Authorization": f"Bearer {reg.serving_token}"}, timeout=10)
    assert ok.status_code == 200 and hashlib.sha256(ok.content).hexdigest() == sig
    other = requests.get(url, headers={"Authorization": f"Bearer {reg.other_owner_token}"}, timeout=10)
    absent = requests.get(f"{reg.url}/v1/signatures/sha256:{'0' * 64}",
                          headers={"Authorization": f"Bearer {reg.serving_token}"}, timeout=10)
    assert other.status_code == absent.status_code == 404 and other.json()["error"]["code"] == "not_found"
    bad = requests.get(f"{reg.url}/v1/signatures/md5:00", headers={"Authorization": f"Bearer {reg.serving_token}"},
                       timeout=10)
    assert bad.status_code == 400


def test_engine_check_runs_before_any_download_and_a_refusal_leaves_no_mark(published, tmp_path: Path) -> None:
    reg = published.registry
    cache = tmp_path / "cache"
    with Counting(reg.url) as proxy:
        session = _session(proxy.url, cache)
        seen: list[str] = []

        def wrong_base(verified) -> None:
            seen.append(verified.label)
            raise InputError(f"{verified.label} was made for base model {verified.statement['base_model']!r}, "
                             "but this server serves 'other'")

        with pytest.raises(InputError, match="but this server serves 'other'"):
            session.serve("alice/ad2", reg.serving_token, check=wrong_base)
        assert seen == ["soppu adapter alice/ad2@1"]  # non-vacuous: the check ran, on the verified version
        assert not [p for _, p in proxy.requests if p.startswith("/v1/blobs/")]  # nothing downloaded
        assert srckit.cache_files(cache) == []  # no rollback mark, no known key, no file at all
        # The same version without the refusal is served, and only then marked.
        served = session.serve("alice/ad2", reg.serving_token)
        mark = session.cache.seen_path(session.trust, "alice", "ad2")
        assert served.version == 1 and mark.is_file()


def test_rank_beyond_the_host_limit_is_refused_before_any_tensor_comes_down(published, tmp_path: Path) -> None:
    """Issue 19 finding 8: a tiny core on a shared basis may expand to k (d_out + d_in) parameters
    per module; the host caps k (SOPPU_MAX_SERVED_RANK) on the verified manifest, before the basis
    or the core is fetched, and a refusal leaves nothing behind."""
    reg = published.registry
    manifest_sha = next(f["sha256"] for f in srckit.version_record(reg, "ad1")["files"] if f["path"] == "manifest.json")
    assert Settings().max_served_rank == 128  # the default
    cache = tmp_path / "cache"
    with Counting(reg.url) as proxy:
        session = _session(proxy.url, cache, max_served_rank=4)  # the published bundle has k = 8
        with pytest.raises(SoppuError) as e:
            session.serve("alice/ad1", reg.serving_token)
        message = str(e.value)
        assert message.startswith("soppu adapter alice/ad1@1: refused: module ")
        assert "(k=8)" in message and "exceeds this host's rank limit SOPPU_MAX_SERVED_RANK=4" in message
        assert message.endswith("compress with --rank 4 or less, or raise SOPPU_MAX_SERVED_RANK on this host")
        blobs = [p for _, p in proxy.requests if p.startswith("/v1/blobs/")]
        assert blobs == [f"/v1/blobs/sha256:{manifest_sha}"]  # the manifest only: no basis, no core
        assert srckit.cache_files(cache) == []  # no mark, no key, no blob
        # Non-vacuous: at k's own value the same version is served.
        served = _session(proxy.url, cache, max_served_rank=8).serve("alice/ad1", reg.serving_token)
        assert served.version == 1 and served.stats.materialized
    with pytest.raises(InputError, match="SOPPU_MAX_SERVED_RANK='0' must be an integer >= 1"):
        Settings.from_env({"SOPPU_MAX_SERVED_RANK": "0"})


def test_a_cache_dir_that_is_a_file_is_a_clear_error(published, tmp_path: Path) -> None:
    file = tmp_path / "not-a-dir"
    file.write_text("x")
    with pytest.raises(InputError) as e:
        _session(published.registry.url, file)
    assert str(e.value) == (f"the soppu cache {file} (SOPPU_CACHE_DIR) is not a directory; point SOPPU_CACHE_DIR at "
                            "a directory (created if absent) or remove that file")


def test_vllm_wording_has_no_lorax_words(published, tmp_path: Path) -> None:
    session = _session(published.registry.url, tmp_path / "cache")
    with pytest.raises(SoppuError) as e:
        session.serve("alice/ad0", "soppu_0000000000000000_nope")
    assert e.value.status == 401 and "api_token" not in str(e.value) and "LoRAX" not in str(e.value)
    assert str(e.value).endswith("Start vLLM with SOPPU_REGISTRY_TOKEN set to a valid serving-read token (the "
                                 "resolver sends the server's token for every request).")
    with pytest.raises(InputError) as e:
        Session(Settings(cache_dir=tmp_path / "c2"), wording=VLLM).serve("alice/ad0")
    assert str(e.value).startswith("SOPPU_REGISTRY_URL is not set: start vLLM with SOPPU_REGISTRY_URL=")
