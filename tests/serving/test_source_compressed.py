"""SoppuModelSource in compressed form (SOPPU_SERVE_FORMAT=compressed) against a real registry.

The served dir must hold the signed bundle's own tensors (checked with the safetensors library on
the uploaded bundle), keep one copy of a shared basis on disk, and apply like the PEFT form of the
same adapter (``lorax_adapter_source.compressed.apply_compressed`` against PEFT's LoRA layer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorax_adapter_source import compressed as lc
from lorax_adapter_source.source import SoppuModelSource, get_soppu_local_dir
from soppu_client.format import compressed_form as cf
from soppu_client.format.errors import InputError, VerificationError
from tests.client.bundle_files import read_cores
from tests.serving import srckit


@pytest.fixture
def compressed_env(source_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SOPPU_SERVE_FORMAT", "compressed")
    return source_env


def test_compressed_form_serves_the_signed_tensors_and_shares_the_basis(published, compressed_env: Path) -> None:
    reg = published.registry
    src = SoppuModelSource(f"{reg.owner}/ad0", api_token=reg.serving_token)
    assert src.remote_weight_files() == ["basis.safetensors", "cores.safetensors"]
    files = src.download_model_assets()
    served = compressed_env / ".compressed" / reg.owner / "ad0" / "v1"
    assert [p.name for p in files] == ["adapter_config.json", "basis.safetensors", "cores.safetensors",
                                       "soppu_source.json"]
    assert files[0].parent == served
    assert src.weight_files() == [served / "basis.safetensors", served / "cores.safetensors"]
    assert get_soppu_local_dir(f"{reg.owner}/ad0").resolve() == served.resolve()
    assert not (compressed_env / reg.owner).exists()  # nothing in the PEFT tree

    config = cf.read_compressed_config(served)
    assert config is not None and config["adapter"] == "ad0" and config["rank"] == 8
    _, basis, cores = cf.load_compressed(served)  # digests in the config checked
    bundle_basis = load_file(str(published.bundle / "basis.safetensors"))
    bundle_cores = read_cores(published.bundle, "ad0")  # packed core file, read from the format spec
    assert set(basis) == set(bundle_basis) and set(cores) == set(bundle_cores)
    for key, value in bundle_basis.items():
        assert torch.equal(basis[key], value), key
    for key, value in bundle_cores.items():
        assert torch.equal(cores[key].double(), value), key

    # The second adapter of the bundle downloads only its core, and its basis file is the same
    # bytes, stored once: both dirs hard-link the blob store's copy.
    src2 = SoppuModelSource(f"{reg.owner}/ad1@1", api_token=reg.serving_token)
    src2.download_model_assets()
    assert src2.last_stats.blobs_downloaded == ["cores/ad1.safetensors"]
    served2 = compressed_env / ".compressed" / reg.owner / "ad1" / "v1"
    config2 = cf.read_compressed_config(served2)
    assert config2["basis"]["sha256"] == config["basis"]["sha256"]
    assert config2["cores"]["sha256"] != config["cores"]["sha256"]
    blob = compressed_env / ".blobs" / "sha256" / config["basis"]["sha256"]
    assert blob.is_file()
    assert (served / "basis.safetensors").stat().st_ino == blob.stat().st_ino
    assert (served2 / "basis.safetensors").stat().st_ino == blob.stat().st_ino

    prov = json.loads((served / "soppu_source.json").read_text())
    assert prov["version"] == 1 and {f["path"] for f in prov["files"]} == {
        "manifest.json", "basis.safetensors", "cores/ad0.safetensors"}


def test_compressed_form_applies_like_the_peft_form(published, compressed_env: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file as load

    reg = published.registry
    compressed_dir = SoppuModelSource(f"{reg.owner}/ad2", api_token=reg.serving_token).download_model_assets()[0].parent
    peft_dir = SoppuModelSource(f"{reg.owner}/ad2", api_token=reg.serving_token,
                                form="peft").download_model_assets()[0].parent
    assert peft_dir == compressed_env / reg.owner / "ad2" / "v1"  # both forms side by side

    _, basis, cores = cf.load_compressed(compressed_dir)
    peft = load(str(peft_dir / "adapter_model.safetensors"))
    torch.manual_seed(0)
    x = torch.randn(5, 576)
    index = torch.tensor([0, -1, 0, 0, -1])
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        U, V, S = basis[f"{module}.U"], basis[f"{module}.V"], cores[f"{module}.S"]
        A = peft[f"base_model.model.{module}.lora_A.weight"]
        B = peft[f"base_model.model.{module}.lora_B.weight"]
        want = (x @ A.T) @ B.T  # PEFT's LoRA delta, scaling 1 (lora_alpha = r in the export)
        assert want.abs().max() > 1e-3  # non-vacuous
        y = torch.zeros(5, U.shape[0])
        lc.apply_compressed(y, x, U, V, S.unsqueeze(0), index, diag=False, backend="reference")
        torch.testing.assert_close(y[index >= 0], want[index >= 0], rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(y[index < 0]) == 0


def test_tampered_core_is_refused_in_compressed_form(published, compressed_env: Path) -> None:
    reg = published.registry
    srckit.publish_fresh(published, ("ct0",), seed=400)
    record = srckit.version_record(reg, "ct0")
    core = next(f for f in record["files"] if f["path"] == "cores/ct0.safetensors")
    blob = next(reg.data.glob(f"blobs/sha256/*/{core['sha256']}"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"digest mismatch: the registry served cores/ct0.safetensors"):
        SoppuModelSource(f"{reg.owner}/ct0", api_token=reg.serving_token).download_model_assets()
    assert srckit.cache_files(compressed_env) == []


def test_unknown_serve_format_is_a_clear_error(published, source_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOPPU_SERVE_FORMAT", "gguf")
    with pytest.raises(InputError, match=r"SOPPU_SERVE_FORMAT='gguf' is not a serving form; use one of peft, compressed"):
        SoppuModelSource(f"{published.registry.owner}/ad0", api_token=published.registry.serving_token)
    assert srckit.cache_files(source_env) == []
