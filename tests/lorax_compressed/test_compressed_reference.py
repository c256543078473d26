"""Compressed mode without LoRAX: the materialized compressed adapters, applied with soppu_kernels'
reference (as the patched LoRAX forward does), equal PEFT on the adapters exported from the same bundle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lorax_adapter_source import compressed as lc
from soppu_client.format import compressed_form as cf
from soppu_client.format.errors import BundleError
from tests.lorax_compressed.compressedkit import (
    MODULES,
    REPO,
    abs_product,
    matmul_tolerance,
    peft_layer,
)

SPLIT_PROBE = """
import sys
def loaded():
    return sorted(m for m in sys.modules if m.startswith(("lorax_adapter_source", "lorax_server")))
import soppu_serving.prune, soppu_client.format.compressed_form
print(loaded())
import lorax_adapter_source.compressed as m
print(m.ADAPTER_TYPE, "lorax_server" in sys.modules)
try:
    import lorax_adapter_source.lorax_layers
except ModuleNotFoundError as e:
    print(e)
"""


def test_module_split_follows_the_import_arrows() -> None:
    """The reader is engine-neutral (prune uses it without the LoRAX glue), the pure-torch part
    imports without LoRAX, and only the LoRAX classes need ``lorax_server`` (imported at the top)."""
    proc = subprocess.run([sys.executable, "-c", SPLIT_PROBE], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "soppu False", "No module named 'lorax_server'"]


def test_format_and_shared_basis_digest(compressed) -> None:
    dirs = compressed["dirs"]
    cfg = {n: cf.read_compressed_config(d) for n, d in dirs.items()}
    assert cfg["a0"]["peft_type"] == cf.PEFT_TYPE and cfg["a0"]["format"] == "soppu-compressed/1"
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
    assert cf.read_compressed_config(compressed["peft"]["a0"]) is None
    config, basis, cores = cf.load_compressed(dirs["b0"])
    assert basis["model.layers.0.self_attn.v_proj.U"].shape == (192, 6)
    assert basis["model.layers.0.self_attn.v_proj.V"].shape == (576, 6)
    assert cores["model.layers.0.self_attn.v_proj.S"].shape == (6,)


def test_tampered_files_are_rejected(compressed, tmp_path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(compressed["dirs"]["a0"], bad)
    (bad / "cores.safetensors").write_bytes((compressed["dirs"]["a1"] / "cores.safetensors").read_bytes())
    with pytest.raises(cf.CompressedAdapterError, match="cores.safetensors does not match") as info:
        cf.load_compressed(bad)
    assert isinstance(info.value, BundleError) and info.value.exit_code == 2  # one exception tree
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["format"] = "soppu-compressed/9"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(cf.CompressedAdapterError, match="format"):
        cf.read_compressed_config(bad)


def test_weight_bytes_count_each_basis_once(compressed) -> None:
    """A basis is charged with its first user and credited with its last; download counts it only then."""
    d = compressed["dirs"]["a1"]
    cfg = cf.read_compressed_config(d)
    cfg_b = cf.read_compressed_config(compressed["dirs"]["b0"])
    digest, size = cfg["basis"]["sha256"], cfg["basis"]["size"]
    reg = lc.BasisRegistry()
    files = [d / "basis.safetensors", d / "cores.safetensors"]
    assert lc.compressed_weight_bytes(files, reg) == cfg["cores"]["size"] + size
    assert reg.charge(digest, size) == size and reg.charge(digest, size) == 0  # two users, charged once
    assert lc.compressed_weight_bytes(files, reg) == cfg["cores"]["size"]
    assert lc.compressed_weight_bytes(compressed["dirs"]["b0"], reg) == cfg_b["cores"]["size"] + cfg_b["basis"]["size"]
    assert lc.compressed_weight_bytes([compressed["peft"]["a0"] / "adapter_model.safetensors"], reg) is None
    assert reg.charged_bytes() == size
    assert reg.credit(digest) == 0 and reg.is_charged(digest)  # one user left: still resident, still charged
    assert lc.compressed_weight_bytes(files, reg) == cfg["cores"]["size"]
    assert reg.credit(digest) == size and reg.charged_bytes() == 0  # the last user gone: credited once
    assert lc.compressed_weight_bytes(files, reg) == cfg["cores"]["size"] + size
    assert reg.credit(digest) == 0  # nothing left to credit


def test_registry_holds_bases_weakly(compressed) -> None:
    cfg = cf.read_compressed_config(compressed["dirs"]["a1"])
    reg = lc.BasisRegistry()
    held = reg.get_or_load((cfg["basis"]["sha256"], "q_proj"),
                           lambda: lc.ResidentBasis(cfg["basis"]["sha256"], "q_proj", torch.zeros(1), torch.zeros(1)))
    assert reg.get_or_load((cfg["basis"]["sha256"], "q_proj"), lambda: pytest.fail("loaded twice")) is held
    assert reg.is_resident(cfg["basis"]["sha256"])
    del held  # the registry holds bases weakly: the last adapter gone, the basis goes
    import gc

    gc.collect()
    assert reg.resident() == [] and not reg.is_resident(cfg["basis"]["sha256"])
    assert reg.loads == 1


def test_core_table_slots_and_growth() -> None:
    table = lc.CoreTable(2, (3, 3), "cpu", capacity=2)
    cores = [torch.full((2, 3, 3), float(i + 1)) for i in range(3)]
    slots = [table.add(c) for c in cores]
    assert slots == [0, 1, 2] and table.cores.shape == (2, 4, 3, 3)  # grown once, contents kept
    for s, c in zip(slots, cores):
        assert torch.equal(table.cores[:, s], c)
    table.remove(1)
    assert table.add(cores[0] * 7) == 1 and torch.equal(table.cores[:, 1], cores[0] * 7)  # a freed slot is reused
    with pytest.raises(ValueError, match=r"`cores` has shape \(2, 3\), the table holds \(2, 3, 3\) per adapter"):
        table.add(torch.zeros(2, 3))


def test_mixed_batch_reference_equals_peft(compressed, peft_model) -> None:
    """Base tokens (-1) and tokens of three adapters over two bases, grouped by basis as LoRAX does."""
    names = ["a0", "a1", "b0"]
    loaded = {n: cf.load_compressed(compressed["dirs"][n]) for n in names}
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
                cfg, basis, cores = loaded[n]
                tol = matmul_tolerance(x[rows], layer.base_layer.weight.abs() + abs_product(
                    basis[f"{module}.U"], cores[f"{module}.S"], basis[f"{module}.V"].T))
                # the adapter changes this layer far beyond what rounding may: the check is not vacuous
                assert (want - base_y[rows]).abs().max() > 20 * tol["atol"]
                torch.testing.assert_close(y[rows], want, **tol)
            torch.testing.assert_close(y[idx < 0], base_y[idx < 0], rtol=0, atol=0)


def test_single_basis_equals_kernel_op(compressed) -> None:
    """apply_compressed (shrink / core / expand) == soppu_kernels.shared_basis_lora on one basis."""
    import soppu_kernels as sk

    cfgs = [cf.load_compressed(compressed["dirs"][n]) for n in ("a0", "a1")]
    module = MODULES[1]
    U, V = cfgs[0][1][f"{module}.U"], cfgs[0][1][f"{module}.V"]
    S = torch.stack([c[2][f"{module}.S"] for c in cfgs])
    idx = torch.tensor([1, -1, 0, 0, 1])
    x = torch.randn(5, 576)
    y0 = torch.randn(5, U.shape[0])
    got = lc.apply_compressed(y0.clone(), x, U, V, S, idx, diag=False, backend="reference")
    want = sk.shared_basis_lora(y0.clone(), x, U[None], V[None], S, idx, None, diag=False, backend="reference")
    torch.testing.assert_close(got, want)
