"""Quantized, mixed-rank bundles through a real registry and the LoRAX source.

* the registry accepts a good quantized bundle made with ``--budget`` and refuses, at publish, one
  whose scales are malformed although it is properly signed;
* the source materializes it (PEFT with rank_pattern; compressed form with float tensors per
  module k), equal to what the bundle stores (read independently) and to PEFT's forward of the
  client's export;
* a registry that serves the malformed, signed bundle anyway is refused by the source, naming the
  adapter, module and field, and nothing is cached.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from lorax_adapter_source import compressed as lc
from lorax_adapter_source.source import SoppuModelSource
from soppu_client.format import compressed_form as cf
from soppu_client.format.bundle import Bundle
from soppu_client.format.errors import SoppuError
from tests.serving import hostile, srckit

NAMES = ("qz0", "qz1", "qz2")


@pytest.fixture(scope="module")
def quantized(published):
    """A --budget bundle (mixed k, 4-bit) of three adapters, published as version 1."""
    tmp = published.tmp / "quantized"
    ads = [srckit.write_adapter(tmp / n, seed=900 + i, rank=8) for i, n in enumerate(NAMES)]
    bundle = tmp / "bundle"
    srckit.run("soppu", "compress", *map(str, ads), "-o", str(bundle), "--rank", "8", "--bits", "4",
               "--budget", "12x", "--calibration", "none", "--max-iter", "50")
    m = Bundle.open(bundle).manifest
    assert len({m.module_rank(x) for x in m.modules}) > 1 and m.quant  # mixed k, quantized
    published.registry.publish(bundle, version=1)
    return bundle, ads


def _bad_copy(bundle: Path, dst: Path, adapter: str) -> tuple[Path, str]:
    """The bundle with one zero scale in ``adapter``'s cores, digests re-listed (signable)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(bundle, dst)
    (dst / "signature.json").unlink(missing_ok=True)
    rel = f"cores/{adapter}.safetensors"
    tensors = load_file(str(dst / rel))
    key = "cores.scale"  # a packed core file: every module's core scales in one tensor
    tensors[key] = np.zeros_like(tensors[key])
    save_file(tensors, str(dst / rel))
    data = (dst / rel).read_bytes()
    m = json.loads((dst / "manifest.json").read_text())
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst, key


def test_registry_refuses_signed_bundle_with_malformed_scales(published, quantized) -> None:
    reg = published.registry
    bundle, _ = quantized
    bad, key = _bad_copy(bundle, published.tmp / "bad-publish", "qz1")
    srckit.run("soppu", "sign", str(bad), "--key", str(reg.key), "--owner", reg.owner, "--version", "2",
               "--expires", "30d")
    with pytest.raises(AssertionError) as e:
        srckit.run("soppu", "upload", str(bad), "--registry", reg.url, "--token", reg.write_token, "--retries", "0",
                   "--no-progress", "--json")
    msg = str(e.value)
    assert "bad_safetensors" in msg and "cores/qz1.safetensors has malformed quantization scales" in msg
    assert f"`{key}`[" in msg and "(cores scales) has" in msg and "zero or negative entries" in msg
    assert srckit.version_record(reg, "qz1")["version"] == 1  # nothing published


def test_source_serves_quantized_mixed_rank_as_peft(published, quantized, source_env: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from soppu_client.base_model import load_base_model

    reg = published.registry
    bundle, _ = quantized
    served = SoppuModelSource(f"{reg.owner}/qz0", api_token=reg.serving_token).download_model_assets()[0].parent
    cfg = json.loads((served / "adapter_config.json").read_text())
    m = Bundle.open(bundle).manifest
    assert cfg["rank_pattern"] == {x: m.module_rank(x) for x in m.modules if m.module_rank(x) != m.rank}
    exported = tmp_path / "export"
    srckit.run("soppu", "export", str(bundle), "qz0", "-o", str(exported))
    base, tok = load_base_model()
    ids = tok("Quantized bases, dequantized once", return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**ids).logits
    model = PeftModel.from_pretrained(base, str(served), adapter_name="served")
    model.load_adapter(str(exported), adapter_name="exported")
    with torch.no_grad():
        model.set_adapter("served")
        a = model(**ids).logits
        model.set_adapter("exported")
        b = model(**ids).logits
    model.unload()
    assert (a - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_source_serves_quantized_mixed_rank_compressed(published, quantized, source_env: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.client.test_client_quantized_bundle import _stored

    monkeypatch.setenv("SOPPU_SERVE_FORMAT", "compressed")
    reg = published.registry
    bundle, _ = quantized
    files = SoppuModelSource(f"{reg.owner}/qz2", api_token=reg.serving_token).download_model_assets()
    config, basis, cores = cf.load_compressed(files[0].parent)
    m = Bundle.open(bundle).manifest
    assert config["dtype"] == "float32" and config["rank"] == m.rank
    for module in m.modules:
        k = m.module_rank(module)
        assert config["ranks"][module] == k and tuple(cores[f"{module}.S"].shape) == (k, k)
        U, V, S = _stored(bundle, module, "qz2")  # decoded without soppu's reader
        np.testing.assert_allclose(basis[f"{module}.U"].double().numpy(), U, atol=1e-6)
        np.testing.assert_allclose(basis[f"{module}.V"].double().numpy(), V, atol=1e-6)
        np.testing.assert_allclose(cores[f"{module}.S"].double().numpy(), S, atol=1e-6)
    # the op applies each module at its own k, as the stored factors say
    module = next(x for x in m.modules if m.module_rank(x) < m.rank)
    U, V, S = (torch.from_numpy(a).float() for a in _stored(bundle, module, "qz2"))
    x = torch.randn(3, V.shape[0])
    y = lc.apply_compressed(torch.zeros(3, U.shape[0]), x, basis[f"{module}.U"], basis[f"{module}.V"],
                            cores[f"{module}.S"][None], torch.zeros(3, dtype=torch.long), diag=False,
                            backend="reference")
    torch.testing.assert_close(y, x @ (U @ S @ V.T).T, atol=1e-5, rtol=1e-5)


def test_source_refuses_signed_bundle_with_malformed_scales(published, quantized, source_env: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry that skipped the check serves the owner-signed bad bundle: the source refuses it."""
    reg = published.registry
    bundle, _ = quantized
    bad, key = _bad_copy(bundle, published.tmp / "bad-serve", "qz1")
    srckit.run("soppu", "sign", str(bad), "--key", str(reg.key), "--owner", reg.owner, "--version", "1",
               "--expires", "30d")
    signature = json.loads((bad / "signature.json").read_text())
    record = srckit.version_record(reg, "qz1")
    forged = copy.deepcopy(record)
    forged["signature"] = signature
    if "files" in forged:
        forged["files"] = signature["statement"]["files"]
    with hostile.Hostile(reg.url) as evil:
        monkeypatch.setenv("SOPPU_REGISTRY_URL", evil.url)
        for path in ("/v1/adapters/alice/qz1", "/v1/adapters/alice/qz1/versions/1"):
            evil.rules[path] = hostile.json_answer(forged)
        for f in signature["statement"]["files"]:
            evil.rules[f"/v1/blobs/sha256:{f['sha256']}"] = hostile.raw_answer(
                (bad / f["path"]).read_bytes(), headers={"Content-Type": "application/octet-stream"})
        for form in ("peft", "compressed"):
            monkeypatch.setenv("SOPPU_SERVE_FORMAT", form)
            with pytest.raises(SoppuError) as e:
                SoppuModelSource("alice/qz1", api_token=reg.serving_token).download_model_assets()
            msg = str(e.value)
            assert "alice/qz1" in msg and "malformed quantization scales" in msg, msg
            assert f"`{key}`[" in msg and "(cores scales) has" in msg and "zero or negative entries" in msg
    assert srckit.cache_files(source_env) == []  # nothing verified-but-bad entered the cache
