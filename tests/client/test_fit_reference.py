"""benchmarks/reference_jd.py: the LoRALoLA JD-Full baseline, scored by soppu's own metrics.

The comparison runs only where a LoRALoLA checkout is named by $LORALOLA_SRC (it is never vendored).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.client.conftest import example_adapter_dirs

ROOT = Path(__file__).resolve().parents[2]


def _reference_module():
    spec = importlib.util.spec_from_file_location("reference_jd", ROOT / "benchmarks" / "reference_jd.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reference_jd", module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_missing_checkout_names_the_variable(monkeypatch, tmp_path):
    ref = _reference_module()
    monkeypatch.delenv("LORALOLA_SRC", raising=False)
    with pytest.raises(SystemExit) as info:
        ref.load_reference()
    assert str(info.value).startswith("$LORALOLA_SRC is not set: point it at a checkout of "
                                      "https://github.com/bruel-gabrielsson/LoRALoLA")
    with pytest.raises(SystemExit) as info:
        ref.load_reference(tmp_path)
    assert str(info.value) == (f"$LORALOLA_SRC={tmp_path} has no compression.py: it should be the root of a "
                               "LoRALoLA checkout")


@pytest.mark.skipif(not os.environ.get("LORALOLA_SRC"), reason="needs a LoRALoLA checkout in $LORALOLA_SRC")
def test_reference_bundle_and_soppu_on_the_examples(tmp_path):
    """The reference's bundle opens and its manifest errors are the metrics of its own stored fit;
    soppu's default fit reaches at most the reference's error on the same adapters."""
    from soppu_client.compress import CompressConfig
    from soppu_client.compress.pipeline import compress_adapters
    from soppu_client.format.bundle import Bundle

    dirs = example_adapter_dirs()
    assert len(dirs) >= 4
    ref = _reference_module()
    out = ref.reference_bundle(dirs, tmp_path / "ref", rank=4)
    bundle = Bundle.open(out)
    assert bundle.manifest.fit["method"] == "reference" and bundle.manifest.rank == 4
    run = ref.run_reference(dirs, rank=4)
    assert bundle.manifest.metrics.summary["mean_error"] == pytest.approx(run.summary["mean_error"], abs=1e-12)
    assert 0.05 < run.summary["mean_error"] < 1.0  # a real, lossy fit
    ours = compress_adapters(dirs, tmp_path / "soppu", CompressConfig(rank=4, calibration="none"))
    assert ours.metrics.summary["mean_error"] <= run.summary["mean_error"] + 1e-4
    assert np.isfinite(ours.metrics.summary["max_error"])
