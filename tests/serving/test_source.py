"""SoppuModelSource against a real registry: materialization, PEFT equivalence, errors, tampering."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from tests.serving import srckit
import torch

from lorax_adapter_source.source import SoppuModelSource, get_soppu_local_dir
from soppu_client.format.errors import RegistryError, SignatureError, VerificationError


def test_materializes_a_peft_dir_and_reuses_the_basis(published, source_env: Path) -> None:
    owner, tok = published.registry.owner, published.registry.serving_token
    src = SoppuModelSource(f"{owner}/ad1", api_token=tok)
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        src.weight_files()
    files = src.download_model_assets()
    assert [p.name for p in files] == ["adapter_config.json", "adapter_model.safetensors", "soppu_source.json"]
    assert src.last_stats.blobs_downloaded == ["manifest.json", "basis.safetensors", "cores/ad1.safetensors"]
    assert src.weight_files() == [source_env / owner / "ad1" / "v1" / "adapter_model.safetensors"]
    assert src.get_weight_bytes() > 0
    assert get_soppu_local_dir(f"{owner}/ad1").resolve() == (source_env / owner / "ad1" / "v1").resolve()
    config = json.loads((files[0]).read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    prov = src.provenance()
    assert prov["version"] == 1 and prov["key_id"].startswith("ed25519:")

    # A second adapter of the same bundle downloads only its core.
    src2 = SoppuModelSource(f"{owner}/ad2@1", api_token=published.registry.read_token)
    assert src2.download_file("config.json", ignore_errors=True) is None
    assert src2.last_stats.blobs_downloaded == ["cores/ad2.safetensors"]
    # (the manifest was checked against this statement once in this process: not even read again)
    assert sorted(src2.last_stats.blobs_reused) == ["basis.safetensors"]
    # Warm: nothing downloaded at all.
    src3 = SoppuModelSource(f"{owner}/ad1", api_token=tok)
    src3.download_model_assets()
    assert not src3.last_stats.materialized and src3.last_stats.blobs_downloaded == []


def _logits(model, tok, prompt: str) -> torch.Tensor:
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


def test_peft_on_smollm2_matches_client_export(published, source_env: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from soppu_client.base_model import load_base_model

    owner = published.registry.owner
    local = SoppuModelSource(f"{owner}/ad0", api_token=published.registry.serving_token)
    served_dir = local.download_model_assets()[0].parent
    exported = tmp_path / "export-ad0"
    srckit.run("soppu", "export", str(published.bundle), "ad0", "-o", str(exported))

    base, tok = load_base_model()
    base.eval()
    prompt = "The shared basis of many adapters"
    base_logits = _logits(base, tok, prompt)
    model = PeftModel.from_pretrained(base, str(served_dir), adapter_name="served")
    model.load_adapter(str(exported), adapter_name="exported")
    model.eval()
    model.set_adapter("served")
    served = _logits(model, tok, prompt)
    model.set_adapter("exported")
    client = _logits(model, tok, prompt)
    # Non-vacuous: the adapter changes the base model's output.
    assert (served - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(served, client, rtol=0, atol=1e-5)


def test_errors_name_the_adapter_and_the_fix(published, source_env: Path) -> None:
    reg = published.registry
    with pytest.raises(RegistryError, match=r"rejected the token .*HTTP 401.*Send a valid registry token") as e:
        SoppuModelSource(f"{reg.owner}/ad0", api_token="soppu_0000000000000000_nope").weight_files()
    assert e.value.status == 401
    with pytest.raises(RegistryError, match=r"may not read adapters of owner 'alice'") as e:
        SoppuModelSource(f"{reg.owner}/ad0", api_token=reg.other_owner_token).download_model_assets()
    assert e.value.status == 403
    with pytest.raises(RegistryError) as e:
        SoppuModelSource(f"{reg.owner}/missing", api_token=reg.serving_token).download_model_assets()
    assert str(e.value).startswith(
        f"soppu adapter alice/missing: unknown adapter: the registry at {reg.url} has no published version of "
        "alice/missing"
    )
    with pytest.raises(RegistryError, match=r"no published version 7 of alice/ad0"):
        SoppuModelSource(f"{reg.owner}/ad0@7", api_token=reg.serving_token).download_model_assets()
    with pytest.raises(Exception, match=r"must look like `owner/name` or `owner/name@version`"):
        SoppuModelSource("no-owner", api_token=reg.serving_token)
    assert srckit.cache_files(source_env) == []


def test_unreachable_registry(source_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = srckit.free_port()  # nothing listens there
    monkeypatch.setenv("SOPPU_REGISTRY_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SOPPU_REGISTRY_RETRIES", "0")
    with pytest.raises(RegistryError, match=r"cannot reach the registry at http://127.0.0.1:\d+ .*Check SOPPU_REGISTRY_URL"):
        SoppuModelSource("alice/ad0", api_token="t").download_model_assets()
    assert srckit.cache_files(source_env) == []


def test_tampered_blob_is_refused_and_nothing_is_cached(published, source_env: Path) -> None:
    reg = published.registry
    srckit.publish_fresh(published, ("tb0", "tb1"), seed=100)
    record = srckit.version_record(reg, "tb0")
    core = next(f for f in record["files"] if f["path"] == "cores/tb0.safetensors")
    blob = next(reg.data.glob(f"blobs/sha256/*/{core['sha256']}"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01  # one bit of one tensor value
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    assert hashlib.sha256(data).hexdigest() != core["sha256"]

    with pytest.raises(VerificationError, match=r"digest mismatch: the registry served cores/tb0.safetensors"):
        SoppuModelSource(f"{reg.owner}/tb0", api_token=reg.serving_token).download_model_assets()
    assert srckit.cache_files(source_env) == []


def test_tampered_signature_is_refused_and_nothing_is_cached(published, source_env: Path) -> None:
    reg = published.registry
    srckit.publish_fresh(published, ("ts0",), seed=200)
    # a longer life than the owner signed
    srckit.edit_signature(reg, "ts0", lambda sig: sig["statement"].update(expires_at="2999-01-01T00:00:00Z"))
    with pytest.raises(SignatureError, match=r"soppu adapter alice/ts0@1: bad signature: signature does not verify"):
        SoppuModelSource(f"{reg.owner}/ts0", api_token=reg.serving_token).download_model_assets()
    assert srckit.cache_files(source_env) == []


def test_latest_follows_new_versions_and_pins_stay(published, source_env: Path) -> None:
    reg = published.registry
    tmp = published.tmp / "versions"
    ads = [srckit.write_adapter(tmp / "nv0", seed=300)]
    bundle = srckit.compress(ads, tmp / "bundle", rank=4)
    reg.publish(bundle, version=1)
    first = SoppuModelSource(f"{reg.owner}/nv0", api_token=reg.serving_token)
    assert first.download_model_assets()[0].parent.name == "v1"
    reg.publish(bundle, version=2)  # same content, re-signed as version 2
    first.session.forget()  # the process's one session: the next request asks the registry again
    latest = SoppuModelSource(f"{reg.owner}/nv0", api_token=reg.serving_token)
    with pytest.raises(FileNotFoundError):  # v2 is not here yet: LoRAX will call download_model_assets
        latest.weight_files()
    assert latest.download_model_assets()[0].parent.name == "v2"
    assert get_soppu_local_dir(f"{reg.owner}/nv0").resolve().name == "v2"
    pinned = SoppuModelSource(f"{reg.owner}/nv0@1", api_token=reg.serving_token)
    assert pinned.weight_files() == [source_env / reg.owner / "nv0" / "v1" / "adapter_model.safetensors"]
    # Version 2 reused every blob of version 1 (same files): nothing downloaded.
    assert latest.last_stats.blobs_downloaded == []


def test_signature_naming_an_unregistered_key_is_refused(published, source_env: Path) -> None:
    reg = published.registry
    srckit.publish_fresh(published, ("tk0",), seed=250)

    def other_key(sig: dict) -> None:
        assert sig["key_id"].startswith("ed25519:")
        sig["key_id"] = "ed25519:" + "0" * 32  # a key the owner never registered

    srckit.edit_signature(reg, "tk0", other_key)
    with pytest.raises(SignatureError, match=r"soppu adapter alice/tk0: bad signature: the signature names key "
                                             r"'ed25519:0{32}', which is not a registered key of owner 'alice'"):
        SoppuModelSource(f"{reg.owner}/tk0", api_token=reg.serving_token).download_model_assets()
    assert srckit.cache_files(source_env) == []


def test_pinned_owner_keys(published, source_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SOPPU_TRUSTED_KEYS: the owner's pinned key verifies; a missing or different one is refused."""
    import shutil

    reg = published.registry
    keys = tmp_path / "trusted"
    keys.mkdir()
    monkeypatch.setenv("SOPPU_TRUSTED_KEYS", str(keys))
    with pytest.raises(SignatureError) as e:
        SoppuModelSource(f"{reg.owner}/ad0", api_token=reg.serving_token).download_model_assets()
    assert str(e.value) == (f"soppu adapter alice/ad0: no trusted key for owner 'alice' in the pinned keys dir {keys} "
                            f"(neither {keys / 'alice.pub'} nor {keys / 'alice'}/*.pub exists; add the owner's public "
                            "key there)")
    srckit.run("soppu", "keygen", "-o", str(tmp_path / "other.key"))
    shutil.copy(tmp_path / "other.key.pub", keys / "alice.pub")
    with pytest.raises(SignatureError, match=r"^soppu adapter alice/ad0@1: bad signature: "):
        SoppuModelSource(f"{reg.owner}/ad0", api_token=reg.serving_token).download_model_assets()
    assert srckit.cache_files(source_env) == []
    shutil.copy(f"{reg.key}.pub", keys / "alice.pub")
    src = SoppuModelSource(f"{reg.owner}/ad0", api_token=reg.serving_token)
    assert src.download_model_assets()[0].parent == source_env / reg.owner / "ad0" / "v1"
    assert src.last_stats.materialized
