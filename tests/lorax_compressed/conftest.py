"""Fixtures for compressed mode: two small bundles on SmolLM2-135M's shapes (layers 0-1, q_proj/v_proj),
three adapters materialized as compressed dirs (two share a basis) and exported to PEFT; the same on
layers 0-3 (compressed dirs only); a ``--budget`` bundle whose k differs per module; a patched LoRAX
checkout (needs LORAX_SRC / LORAX_PYTHON)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lorax import loraxkit as lx
from tests.serving import srckit


@pytest.fixture(scope="session")
def patched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of LORAX_SRC with the whole series applied and its gRPC stubs generated."""
    src, python = lx.lorax_src(), lx.lorax_python()
    dest = lx.copy_lorax(src, tmp_path_factory.mktemp("lorax-c") / "lorax")
    proc = lx.apply_series(dest)
    assert proc.returncode == 0, proc.stderr
    assert "0006-layers-soppu-compressed-forward.patch: applied" in proc.stdout
    assert "0008-graph-refuse-soppu-compressed.patch: applied" in proc.stdout
    lx.generate_stubs(python, dest)
    return dest


@pytest.fixture(scope="session")
def compressed4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Compressed dirs of a0, a1 (one full bundle, rank 8: one basis) and b0 (a diag bundle, rank 6) on layers 0-3."""
    from soppu_client.compress import CompressConfig
    from soppu_client.compress.pipeline import compress_adapters
    from soppu_client.format.compressed_form import export_compressed

    tmp = tmp_path_factory.mktemp("compressed4")
    a = [srckit.write_adapter(tmp / "src" / f"a{i}", seed=60 + i, rank=4, layers=range(4)) for i in range(2)]
    b = [srckit.write_adapter(tmp / "src" / f"b{i}", seed=70 + i, rank=4, layers=range(4)) for i in range(2)]
    compress_adapters(a, tmp / "bundle_full", CompressConfig(rank=8, method="full", max_iter=30), names=["a0", "a1"])
    compress_adapters(b, tmp / "bundle_diag", CompressConfig(rank=6, method="diag", max_iter=30), names=["b0", "b1"])
    bundles = {"a0": tmp / "bundle_full", "a1": tmp / "bundle_full", "b0": tmp / "bundle_diag"}
    return {n: export_compressed(bundle, n, tmp / "compressed" / n) for n, bundle in bundles.items()}


@pytest.fixture(scope="session")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from soppu_client.compress import CompressConfig
    from soppu_client.compress.pipeline import compress_adapters
    from soppu_client.format.bundle import export_peft
    from soppu_client.format.compressed_form import export_compressed

    tmp = tmp_path_factory.mktemp("compressed")
    a = [srckit.write_adapter(tmp / "src" / f"a{i}", seed=20 + i, rank=4) for i in range(2)]
    b = [srckit.write_adapter(tmp / "src" / f"b{i}", seed=40 + i, rank=4) for i in range(2)]
    compress_adapters(a, tmp / "bundle_full", CompressConfig(rank=8, method="full", max_iter=30), names=["a0", "a1"])
    compress_adapters(b, tmp / "bundle_diag", CompressConfig(rank=6, method="diag", max_iter=30), names=["b0", "b1"])
    out = {"tmp": tmp, "bundles": {"a0": tmp / "bundle_full", "a1": tmp / "bundle_full", "b0": tmp / "bundle_diag"},
           "dirs": {}, "peft": {}}
    for name, bundle in out["bundles"].items():
        out["dirs"][name] = export_compressed(bundle, name, tmp / "compressed" / name)
        out["peft"][name] = export_peft(bundle, name, tmp / "peft" / name)
    return out


@pytest.fixture(scope="session")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two r=8 adapters in one ``--budget 6x`` bundle (k per module, at most 16; quantized storage),
    exported as compressed dirs and to PEFT (rank_pattern), and SmolLM2 with both PEFT exports."""
    from peft import PeftModel

    from soppu_client.base_model import load_base_model
    from soppu_client.compress import CompressConfig
    from soppu_client.compress.pipeline import compress_adapters
    from soppu_client.format.bundle import Bundle, export_peft
    from soppu_client.format.compressed_form import export_compressed

    tmp = tmp_path_factory.mktemp("mixed")
    src = [srckit.write_adapter(tmp / "src" / f"m{i}", seed=80 + i, rank=8) for i in range(2)]
    compress_adapters(src, tmp / "bundle", CompressConfig(rank=16, budget="6x", max_iter=30), names=["m0", "m1"])
    bundle = Bundle.open(tmp / "bundle")
    out = {"bundle": bundle, "dirs": {}, "peft": {}}
    for name in ("m0", "m1"):
        out["dirs"][name] = export_compressed(bundle, name, tmp / "compressed" / name)
        out["peft"][name] = export_peft(bundle, name, tmp / "peft" / name)
    base, _tok = load_base_model()
    model = PeftModel.from_pretrained(base, str(out["peft"]["m0"]), adapter_name="m0")
    model.load_adapter(str(out["peft"]["m1"]), adapter_name="m1")
    out["model"] = model.eval()
    return out


@pytest.fixture(scope="session")
def peft_model(compressed):
    """SmolLM2 with the three exported adapters loaded under their names (PEFT)."""
    from peft import PeftModel

    from soppu_client.base_model import load_base_model

    base, _tok = load_base_model()
    names = list(compressed["peft"])
    model = PeftModel.from_pretrained(base, str(compressed["peft"][names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(compressed["peft"][name]), adapter_name=name)
    model.eval()
    return model
