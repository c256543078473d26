"""Quantized and mixed-rank bundles on real PEFT adapters: files, verify on stored values, PEFT
export with rank_pattern (PEFT's forward as the reference), compressed form, malformed scales."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from soppu_client.adapters import load_collection
from soppu_client.cli import cli as cli_main
from soppu_client.compress import CompressConfig
from soppu_client.compress.pipeline import compress_adapters
from soppu_client.format.bundle import Bundle, export_peft
from soppu_client.format.compressed_form import export_compressed, load_compressed
from soppu_client.format.errors import BundleError, SafetensorsFormatError
from soppu_client.verify import verify_weights
from tests.client.bundle_files import read_cores

MODULE = "model.layers.1.self_attn.q_proj"


def _decode(path: Path, name: str, shape: tuple[int, ...], bits: int, group: int, flat: bool) -> np.ndarray:
    """Independent reader: codes from the little-endian bit stream, value = scale * (code - 2^(b-1))."""
    t = load_file(str(path))
    packed, scale = t[f"{name}.q"], t[f"{name}.scale"].astype(np.float64)
    rows, cols = (int(np.prod(shape)), 1) if flat else shape
    bitstream = np.unpackbits(packed, bitorder="little")[: rows * cols * bits].reshape(rows * cols, bits)
    codes = (bitstream * (2 ** np.arange(bits))).sum(1).reshape(rows, cols)
    vals = np.empty((rows, cols))
    for r in range(rows):
        vals[r] = scale[r // group] * (codes[r] - 2 ** (bits - 1))
    return vals.reshape(shape)


def _stored(bundle_dir: Path, module: str, adapter: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U, V, S of one module as stored, read without soppu's reader."""
    m = json.loads((bundle_dir / "manifest.json").read_text())
    meta = m["modules"][module]
    k = meta.get("rank", m["rank"])
    d_out, d_in = meta["shape"]
    q = meta.get("quant", {})
    basis = bundle_dir / "basis.safetensors"

    def read(path, name, shape, role):
        if role in q:
            return _decode(path, name, shape, q[role]["bits"], q[role]["group_size"], role == "cores")
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(name).double().numpy()

    return (read(basis, f"{module}.U", (d_out, k), "basis"), read(basis, f"{module}.V", (d_in, k), "basis"),
            read_cores(bundle_dir, adapter)[f"{module}.S"].numpy())


@pytest.fixture(scope="module")
def q4_bundle(peft_adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "q4"
    compress_adapters(peft_adapters, out, CompressConfig(rank=6, bits=4, group_size=32, dtype="float32"))
    return out


@pytest.fixture(scope="module")
def budget_bundle(peft_adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "budget"
    compress_adapters(peft_adapters, out, CompressConfig(rank=8, bits=4, budget="12x"))
    return out


def test_quantized_bundle_files_and_round_trip(q4_bundle: Path) -> None:
    bundle = Bundle.open(q4_bundle)
    m = bundle.manifest
    assert m.quant_spec(MODULE, "basis").bits == 4 and m.quant_spec(MODULE, "cores").group_size == 32
    with safe_open(str(q4_bundle / "basis.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice(f"{MODULE}.U.q").get_dtype() == "U8"
        assert f.get_slice(f"{MODULE}.U.scale").get_shape() == [18, 6]  # 576 rows / 32 per group, per column
    assert f"{MODULE}.U" not in names
    U, V = bundle.bases(MODULE, 0)
    S = bundle.load_cores("beta")[f"{MODULE}.S"]
    rU, rV, rS = _stored(q4_bundle, MODULE, "beta")
    np.testing.assert_allclose(U.double().numpy(), rU, rtol=0, atol=1e-7)
    np.testing.assert_allclose(V.double().numpy(), rV, rtol=0, atol=1e-7)
    np.testing.assert_allclose(S.double().numpy(), rS, rtol=0, atol=1e-7)
    sizes = m.metrics.sizes
    assert sizes.source_bf16_bytes == 2 * sizes.params_before and sizes.bf16_byte_ratio > 3


def test_verify_reports_the_error_of_stored_values(smollm2, peft_adapters, q4_bundle: Path) -> None:
    """verify's errors == dense numpy errors of the independently decoded tensors against PEFT's own dW."""
    from peft import PeftModel

    model, _ = smollm2
    summary, metrics = verify_weights(Bundle.open(q4_bundle), load_collection(peft_adapters))
    by_module = {mm.module: mm for mm in metrics}
    stored_summary = json.loads((q4_bundle / "manifest.json").read_text())["metrics"]["summary"]
    # metrics.json agrees: compress scores on the fit's float32 stack (errors trusted to ~1e-5 relative,
    # metrics.module_metrics), verify in float64
    assert summary["mean_error"] == pytest.approx(stored_summary["mean_error"], rel=1e-6)
    names = [p.name for p in peft_adapters]
    for j, adapter in enumerate(peft_adapters):
        peft_model = PeftModel.from_pretrained(model, str(adapter))
        try:
            for module in (MODULE, "model.layers.0.self_attn.v_proj"):
                layer = peft_model.base_model.model.get_submodule(module)
                dW = layer.get_delta_weight("default").double().numpy()
                U, V, S = _stored(q4_bundle, module, names[j])
                dense = np.linalg.norm(dW - U @ S @ V.T) / np.linalg.norm(dW)
                assert by_module[module].error[j] == pytest.approx(dense, rel=1e-5)
                assert dense > 0.01  # the quantized bundle is not exact: the check sees the stored values
        finally:
            peft_model.unload()


def test_budget_bundle_has_mixed_ranks_within_budget(budget_bundle: Path) -> None:
    m = Bundle.open(budget_bundle).manifest
    ks = {m.module_rank(x) for x in m.modules}
    assert len(ks) > 1 and max(ks) == m.rank <= 8
    plan = m.fit["storage"]
    sizes = m.metrics.sizes
    assert sizes.tensor_bytes < sizes.safetensors_bytes < sizes.file_bytes <= plan["budget_bytes"]
    assert plan["budget_bytes"] == sizes.source_bf16_bytes // 12 and sizes.bf16_byte_ratio >= 12
    assert {plan["modules"][x]["k"] for x in m.modules} == ks
    raw = json.loads((budget_bundle / "manifest.json").read_text())
    small = next(x for x in m.modules if m.module_rank(x) < m.rank)
    assert raw["modules"][small]["rank"] == m.module_rank(small)


def test_mixed_rank_export_matches_hand_applied_update_on_smollm2(smollm2, budget_bundle: Path, tmp_path) -> None:
    from peft import PeftModel

    model, tok = smollm2
    bundle = Bundle.open(budget_bundle)
    out = export_peft(bundle, "beta", tmp_path / "beta")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == bundle.rank and cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
    ids = tok("Mixed ranks under one budget", return_tensors="pt")
    with torch.no_grad():
        base_logits = model(**ids).logits
    peft_model = PeftModel.from_pretrained(model, str(out))
    small = next(iter(cfg["rank_pattern"]))
    assert peft_model.base_model.model.get_submodule(small).lora_A["default"].weight.shape[0] == cfg["rank_pattern"][small]
    with torch.no_grad():
        peft_logits = peft_model(**ids).logits
    peft_model.unload()
    assert (peft_logits - base_logits).abs().max() > 1e-2
    saved = {}
    with torch.no_grad():
        for module in bundle.modules:
            lin = model.get_submodule(module)
            saved[module] = lin.weight.detach().clone()
            U, V, S = _stored(budget_bundle, module, "beta")
            lin.weight += torch.from_numpy(U @ S @ V.T).float()
        hand_logits = model(**ids).logits
        for module, w in saved.items():
            model.get_submodule(module).weight.copy_(w)
    torch.testing.assert_close(peft_logits, hand_logits, atol=2e-4, rtol=1e-4)


def test_compressed_form_of_mixed_rank_bundle_is_float_per_module_k(budget_bundle: Path, tmp_path) -> None:
    bundle = Bundle.open(budget_bundle)
    out = export_compressed(bundle, "alpha", tmp_path / "alpha-c")
    config, basis, cores = load_compressed(out)
    for module in bundle.modules:
        k = bundle.manifest.module_rank(module)
        assert config["ranks"][module] == k
        assert basis[f"{module}.U"].shape[1] == k and basis[f"{module}.U"].dtype == torch.float32
        assert tuple(cores[f"{module}.S"].shape) == (k, k)
        U, V, S = _stored(budget_bundle, module, "alpha")
        np.testing.assert_allclose(basis[f"{module}.U"].double().numpy(), U, atol=1e-6)
        np.testing.assert_allclose(cores[f"{module}.S"].double().numpy(), S, atol=1e-6)


def _tamper(src: Path, dst: Path, rel: str, change) -> Path:
    """Copy a bundle, edit one safetensors file's tensors, and re-list its digest in the manifest
    (what a careless or hostile signer could publish: digests fine, values not)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / rel))
    change(tensors)
    save_file(tensors, str(dst / rel))
    data = (dst / rel).read_bytes()
    m = json.loads((dst / "manifest.json").read_text())
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_malformed_scales_are_rejected_naming_module_and_field(q4_bundle: Path, tmp_path) -> None:
    key = "cores.scale"  # packed core file: every module's core scales in one tensor
    seg = next(s for s in Bundle.open(q4_bundle).manifest.core_segments() if s.module == MODULE)
    where = rf"`{key}`\[{seg.scale_offset}:{seg.scale_offset + seg.scale_size}\]"

    def zero(t):
        t[key] = t[key].copy()
        t[key][seg.scale_offset + 1] = 0

    def negative(t):
        t[key] = -t[key]

    def nan(t):
        t[key] = t[key].copy()
        t[key][seg.scale_offset] = np.nan

    def wrong_dtype(t):
        t[key] = t[key].astype(np.float32)

    def wrong_shape(t):
        t[key] = np.concatenate([t[key], t[key]])

    rel = "cores/beta.safetensors"
    for change, err, msg in [
        (zero, BundleError, rf"module `{MODULE}`: {where} \(cores scales\) has 1 zero or negative entries"),
        (negative, BundleError, rf"{where} \(cores scales\) has \d+ zero or negative entries \(scales must be > 0\)"),
        (nan, SafetensorsFormatError, r"non-finite|NaN"),
        (wrong_dtype, SafetensorsFormatError, rf"tensor `{key}` has dtype F32, expected F16"),
        (wrong_shape, SafetensorsFormatError, rf"`{key}`"),
    ]:
        bad = _tamper(q4_bundle, tmp_path / change.__name__, rel, change)
        bundle = Bundle.open(bad)  # digests match: only the values are wrong
        bundle.load_cores("alpha")  # other adapters are untouched
        with pytest.raises(err, match=msg):
            bundle.load_cores("beta")
        with pytest.raises(err, match=msg):
            export_peft(bundle, "beta", tmp_path / f"{change.__name__}-export")
        assert not (tmp_path / f"{change.__name__}-export").exists()


def test_cli_reports_ranks_bits_and_ratios(peft_adapters, tmp_path) -> None:
    out = tmp_path / "cli"
    args = ["compress", *map(str, peft_adapters), "-o", str(out), "--rank", "8", "--budget", "10x",
            "--calibration", "none"]
    res = CliRunner().invoke(cli_main, [*args, "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    plan = payload["fit"]["storage"]
    assert plan["budget"] == "10x" and len(plan["modules"]) == 60
    assert payload["metrics"]["sizes"]["bf16_byte_ratio"] >= 10
    text = CliRunner().invoke(cli_main, [*args, "--force"]).output
    assert "bytes vs the sources at bf16 (" in text and "k  basis bits  core bits  modules" in text
    bad = CliRunner().invoke(cli_main, [*args[:-2], "--force", "--budget", "10 bananas", "--json"])
    assert bad.exit_code == 2 and "is neither a ratio like 9x nor a size like 2MB" in bad.output


def test_project_onto_quantized_mixed_rank_basis(peft_adapters, budget_bundle: Path, tmp_path) -> None:
    from soppu_client.compress.pipeline import project_adapters

    new = tmp_path / "delta"
    shutil.copytree(peft_adapters[0], new)  # alpha's weights under a new name
    out = tmp_path / "projected"
    m = project_adapters([new], budget_bundle, out)
    assert (out / "basis.safetensors").read_bytes() == (budget_bundle / "basis.safetensors").read_bytes()
    base = Bundle.open(budget_bundle).manifest
    assert m.quant_spec(MODULE, "basis") == base.quant_spec(MODULE, "basis")
    assert all(m.module_rank(x) == base.module_rank(x) for x in m.modules)
    projected = Bundle.open(out)
    S = projected.load_cores("delta")
    assert all(S[f"{x}.S"].shape[0] == base.module_rank(x) for x in m.modules)
    # same adapter, same basis: its error is no worse than alpha's own fitted cores (float, not quantized)
    err = {a: v["error"] for a, v in m.metrics.summary["adapters"].items()}
    assert err["delta"] <= base.metrics.summary["adapters"]["alpha"]["error"] + 1e-6
