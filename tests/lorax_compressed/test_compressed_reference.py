"""Compressed mode without LoRAX: the materialized compressed adapters, applied with soppu_kernels'
reference (as the patched LoRAX forward does), equal PEFT on the adapters exported from the same bundle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tests.lorax_compressed.compressedkit import MODULES, REPO, peft_layer

from lorax_adapter_source import compressed as lc


def test_module_imports_without_lorax() -> None:
    code = ("import sys, lorax_adapter_source.compressed as m; "
            "assert 'lorax_server' not in sys.modules; print(m.ADAPTER_TYPE)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "soppu"


def test_format_and_shared_basis_digest(compressed) -> None:
    dirs = compressed["dirs"]
    cfg = {n: lc.read_compressed_config(d) for n, d in dirs.items()}
    assert cfg["a0"]["peft_type"] == lc.PEFT_TYPE and cfg["a0"]["format"] == lc.FORMAT
    assert (cfg["a0"]["method"], cfg["a0"]["rank"], cfg["b0"]["method"], cfg["b0"]["rank"]) == ("full", 8, "diag", 6)
    assert sorted(cfg["a0"]["modules"]) == sorted(MODULES)
    assert sorted(p.name for p in dirs["a0"].iterdir()) == ["adapter_config.json", "basis.safetensors",
                                                             "cores.safetensors"]
    # one cluster, one basis: byte-identical files, same residency key; another bundle, another key
    assert cfg["a0"]["basis"]["sha256"] == cfg["a1"]["basis"]["sha256"]
    assert (dirs["a0"] / "basis.safetensors").read_bytes() == (dirs["a1"] / "basis.safetensors").read_bytes()
    assert cfg["a0"]["basis"]["sha256"] != cfg["b0"]["basis"]["sha256"]
    assert cfg["a0"]["cores"]["sha256"] != cfg["a1"]["cores"]["sha256"]
    # a PEFT dir is not a compressed adapter
    assert lc.read_compressed_config(compressed["peft"]["a0"]) is None
    config, basis, cores = lc.load_compressed(dirs["b0"])
    assert basis["model.layers.0.self_attn.v_proj.U"].shape == (192, 6)
    assert basis["model.layers.0.self_attn.v_proj.V"].shape == (576, 6)
    assert cores["model.layers.0.self_attn.v_proj.S"].shape == (6,)


def test_tampered_files_are_rejected(compressed, tmp_path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(compressed["dirs"]["a0"], bad)
    (bad / "cores.safetensors").write_bytes((compressed["dirs"]["a1"] / "cores.safetensors").read_bytes())
    with pytest.raises(lc.CompressedAdapterError, match="cores.safetensors does not match"):
        lc.load_compressed(bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["format"] = "soppu-compressed/9"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(lc.CompressedAdapterError, match="format"):
        lc.read_compressed_config(bad)


def test_weight_bytes_count_basis_only_when_not_resident(compressed) -> None:
    d = compressed["dirs"]["a1"]
    cfg = lc.read_compressed_config(d)
    reg = lc.BasisRegistry()
    files = [d / "basis.safetensors", d / "cores.safetensors"]
    assert lc.compressed_weight_bytes(files, reg) == cfg["cores"]["size"] + cfg["basis"]["size"]
    held = reg.get_or_load((cfg["basis"]["sha256"], "q_proj"),
                           lambda: lc.ResidentBasis(cfg["basis"]["sha256"], "q_proj", torch.zeros(1), torch.zeros(1)))
    assert reg.get_or_load((cfg["basis"]["sha256"], "q_proj"), lambda: pytest.fail("loaded twice")) is held
    assert lc.compressed_weight_bytes(files, reg) == cfg["cores"]["size"]
    assert lc.compressed_weight_bytes(compressed["dirs"]["b0"], reg) > lc.read_compressed_config(
        compressed["dirs"]["b0"])["basis"]["size"]
    assert lc.compressed_weight_bytes([compressed["peft"]["a0"] / "adapter_model.safetensors"], reg) is None
    del held  # the registry holds bases weakly: the last adapter gone, the basis goes
    import gc

    gc.collect()
    assert reg.resident() == [] and not reg.is_resident(cfg["basis"]["sha256"])
    assert reg.loads == 1


def test_mixed_batch_reference_equals_peft(compressed, peft_model) -> None:
    """Base tokens (-1) and tokens of three adapters over two bases, grouped by basis as LoRAX does."""
    names = ["a0", "a1", "b0"]
    loaded = {n: lc.load_compressed(compressed["dirs"][n]) for n in names}
    token_adapter = [0, 0, -1, 1, 2, 2, -1, 1, 0, 2]
    T = len(token_adapter)
    torch.manual_seed(1)
    x = torch.randn(T, 576)
    idx = torch.tensor(token_adapter)
    for module in MODULES:
        layer = peft_layer(peft_model, module)
        with torch.no_grad():
            base_y = layer.base_layer(x)
            y = base_y.clone()
            # group by basis digest: a0 and a1 share one, b0 has its own
            groups: dict[str, list[int]] = {}
            for j, n in enumerate(names):
                groups.setdefault(loaded[n][0]["basis"]["sha256"], []).append(j)
            assert len(groups) == 2
            for members in groups.values():
                cfg, basis, _ = loaded[names[members[0]]]
                S = torch.stack([loaded[names[j]][2][f"{module}.S"] for j in members])
                lut = torch.full((len(names),), -1)
                lut[members] = torch.arange(len(members))
                local = torch.where(idx >= 0, lut[idx.clamp_min(0)], -1)
                lc.apply_compressed(y, x, basis[f"{module}.U"], basis[f"{module}.V"], S, local,
                                    diag=cfg["method"] == "diag", backend="reference")
            for j, n in enumerate(names):
                peft_model.set_adapter(n)
                rows = idx == j
                want = layer(x[rows])
                assert (want - base_y[rows]).abs().max() > 1e-3  # the adapter changes this layer
                torch.testing.assert_close(y[rows], want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y[idx < 0], base_y[idx < 0], rtol=0, atol=0)


def test_single_basis_equals_kernel_op(compressed) -> None:
    """apply_compressed (shrink / core / expand) == soppu_kernels.shared_basis_lora on one basis."""
    import soppu_kernels as sk

    cfgs = [lc.load_compressed(compressed["dirs"][n]) for n in ("a0", "a1")]
    module = MODULES[1]
    U, V = cfgs[0][1][f"{module}.U"], cfgs[0][1][f"{module}.V"]
    S = torch.stack([c[2][f"{module}.S"] for c in cfgs])
    idx = torch.tensor([1, -1, 0, 0, 1])
    x = torch.randn(5, 576)
    y0 = torch.randn(5, U.shape[0])
    got = lc.apply_compressed(y0.clone(), x, U, V, S, idx, diag=False, backend="reference")
    want = sk.shared_basis_lora(y0.clone(), x, U[None], V[None], S, idx, None, diag=False, backend="reference")
    torch.testing.assert_close(got, want)
