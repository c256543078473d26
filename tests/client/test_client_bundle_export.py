"""Bundle files, atomicity, and the PEFT export on the real SmolLM2 model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from soppu_client.format.bundle import Bundle, export_peft
from soppu_client.compress import CompressConfig
from soppu_client.compress.pipeline import compress_adapters
from soppu_client.format.errors import AdapterValidationError, InputError, VerificationError
from tests.client.bundle_files import read_cores


@pytest.fixture(scope="module")
def bundle_dir(peft_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    compress_adapters(peft_adapters, out, CompressConfig(rank=6))
    return out


def test_bundle_layout_and_digests(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    m = bundle.manifest
    assert m.format == "soppu-bundle/1" and m.rank == 6 and m.method == "full"
    assert set(m.adapters) == {"alpha", "beta", "gamma"}
    assert sorted(os.listdir(bundle_dir)) == ["basis.safetensors", "cores", "manifest.json", "metrics.json"]
    assert m.modules["model.layers.0.self_attn.v_proj"] == (192, 576)
    with safe_open(str(bundle_dir / "basis.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.v_proj.U").get_shape() == [192, 6]
        assert f.get_slice("model.layers.0.self_attn.v_proj.V").get_shape() == [576, 6]
    with safe_open(str(bundle_dir / "cores/beta.safetensors"), "pt") as f:  # packed: one float tensor
        assert list(f.keys()) == ["cores"] and f.get_slice("cores").get_shape() == [len(m.modules) * 36]
    assert read_cores(bundle_dir, "beta")["model.layers.0.self_attn.q_proj.S"].shape == (6, 6)
    assert m.metrics.summary["error_definition"].startswith("unsquared relative Frobenius")


def test_tampered_bundle_is_detected(bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    core = copy / "cores" / "alpha.safetensors"
    data = bytearray(core.read_bytes())
    data[-3] ^= 0x01
    core.write_bytes(bytes(data))
    assert core.read_bytes() != (bundle_dir / "cores" / "alpha.safetensors").read_bytes()
    with pytest.raises(VerificationError, match="cores/alpha.safetensors has sha256"):
        Bundle.open(copy)


def test_export_matches_hand_applied_update_on_smollm2(smollm2, bundle_dir, tmp_path):
    """PEFT loading the export == base model with W + U S V.T patched in by hand (an independent path)."""
    from peft import PeftModel

    model, tok = smollm2
    bundle = Bundle.open(bundle_dir)
    out = export_peft(bundle, "beta", tmp_path / "beta-export")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6 and cfg["peft_type"] == "LORA"
    ids = tok("The quick brown fox jumps over", return_tensors="pt")
    with torch.no_grad():
        base_logits = model(**ids).logits
    peft_model = PeftModel.from_pretrained(model, str(out))
    with torch.no_grad():
        peft_logits = peft_model(**ids).logits
    peft_model.unload()
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter changes the output
    # by hand: W += U S V.T from the bundle files read with the safetensors library
    cores = read_cores(bundle_dir, "beta")
    with safe_open(str(bundle_dir / "basis.safetensors"), "pt") as fb:
        saved = {}
        with torch.no_grad():
            for module in bundle.modules:
                lin = model.get_submodule(module)
                saved[module] = lin.weight.detach().clone()
                U, V, S = fb.get_tensor(f"{module}.U"), fb.get_tensor(f"{module}.V"), cores[f"{module}.S"].float()
                lin.weight += U @ S @ V.T
            hand_logits = model(**ids).logits
            for module, w in saved.items():
                model.get_submodule(module).weight.copy_(w)
    torch.testing.assert_close(peft_logits, hand_logits, atol=2e-4, rtol=1e-4)


def test_failed_runs_leave_nothing(peft_adapters, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(InputError, match="`rank` 600 exceeds the smaller dimension of module"):
        compress_adapters(peft_adapters, out, CompressConfig(rank=600))
    with pytest.raises(AdapterValidationError):
        compress_adapters([*peft_adapters, tmp_path / "missing"], out, CompressConfig(rank=4))
    assert os.listdir(tmp_path) == []  # no bundle, no temp dir


def test_existing_output_is_kept_without_force(peft_adapters, bundle_dir):
    before = (bundle_dir / "manifest.json").read_bytes()
    with pytest.raises(InputError, match="already exists; choose another output path or pass --force"):
        compress_adapters(peft_adapters, bundle_dir, CompressConfig(rank=3))
    assert (bundle_dir / "manifest.json").read_bytes() == before


def test_export_unknown_adapter_names_what_exists(bundle_dir, tmp_path):
    with pytest.raises(InputError) as info:
        export_peft(bundle_dir, "delta", tmp_path / "x")
    assert str(info.value) == f"bundle {bundle_dir} has no adapter `delta`; it has: alpha, beta, gamma"
    assert not (tmp_path / "x").exists()


def test_diag_bundle_export_round_trip(peft_adapters, tmp_path):
    out = tmp_path / "diag"
    compress_adapters(peft_adapters[:2], out, CompressConfig(rank=4, method="diag"))
    bundle = Bundle.open(out)
    assert bundle.diag
    exported = export_peft(bundle, "alpha", tmp_path / "alpha-diag")
    with safe_open(str(exported / "adapter_model.safetensors"), "pt") as f, safe_open(str(out / "basis.safetensors"), "pt") as fb:
        m = "model.layers.3.self_attn.q_proj"
        B = f.get_tensor(f"base_model.model.{m}.lora_B.weight")
        expected = fb.get_tensor(f"{m}.U") @ torch.diag(read_cores(out, "alpha")[f"{m}.S"].float())
        np.testing.assert_allclose(B.numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)


def test_auto_dtype_keeps_bf16_inputs_bf16(peft_adapters, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    dirs = []
    for src in peft_adapters[:2]:
        dst = tmp_path / "in" / src.name
        shutil.copytree(src, dst)
        tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(dst / "adapter_model.safetensors")).items()}
        save_file(tensors, str(dst / "adapter_model.safetensors"))
        dirs.append(dst)
    m16 = compress_adapters(dirs, tmp_path / "auto", CompressConfig(rank=4))
    m32 = compress_adapters(dirs, tmp_path / "f32", CompressConfig(rank=4, dtype="float32"))
    assert m16.dtype == "bfloat16" and m32.dtype == "float32"
    assert Bundle.open(tmp_path / "auto").load_basis()["model.layers.0.self_attn.q_proj.U"].dtype == torch.bfloat16
    assert m32.metrics.sizes.tensor_bytes == 2 * m16.metrics.sizes.tensor_bytes
    # rounding the bases to bf16 costs little next to the compression error itself
    e16, e32 = m16.metrics.summary["mean_error"], m32.metrics.summary["mean_error"]
    assert e32 > 0.05 and abs(e16 - e32) < 0.01
