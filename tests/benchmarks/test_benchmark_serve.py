"""benchmarks/serve.py runs end to end on tiny sizes and its derived fields follow from its own
times (a harness check: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_serve_benchmark_json_is_consistent() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--device", "cpu", "--hidden", "64", "--tokens", "1", "8",
         "--adapters", "1", "5", "--ranks", "4", "--lora-rank", "4", "--warmup", "0", "--repeats", "2", "--graphs"],
        capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "kernels")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    cfg = out["config"]
    assert out["machine"]["device"] == "cpu" and cfg["inner"] == 1
    assert cfg["graphs"] == "unavailable on cpu" and cfg["routing"] == "identity (no sort)"
    assert cfg["tokens"] == [1, 8] and cfg["grouped_backend"] == "reference" and "setup_errors" not in out
    assert len(out["results"]) == 8  # 2 token counts x 2 adapter counts x 2 popularities
    for row in out["results"]:
        assert "errors" not in row, row["errors"]
        assert "graphs" not in row  # no CUDA graphs on CPU
        t = row["times_ms"]
        assert {"base", "base+1lora", "base+N_lora_ref", "base+N_lora_grouped", "base+N_soppu_k4_reference",
                "base+N_soppu_k4_torchgemm"} == set(t)
        for key, v in t.items():
            assert row["ratio_to_one_lora"][key] == pytest.approx(v / t["base+1lora"], rel=1e-2, abs=1e-3)
        unc = min(t["base+N_lora_ref"], t["base+N_lora_grouped"])
        for key, v in row["ratio_to_grouped"].items():
            assert v == pytest.approx(t[key] / t["base+N_lora_grouped"], rel=1e-2, abs=1e-3)
            assert row["ratio_to_uncompressed"][key] == pytest.approx(t[key] / unc, rel=1e-2, abs=1e-3)
    rows = out["targets"]["rows"]
    assert out["targets"]["adapters"] == 5 and out["targets"]["applies"] is False and len(rows) == 4
    for target, row in zip(rows, [r for r in out["results"] if r["adapters"] == 5]):
        t = row["times_ms"]
        assert (target["tokens"], target["popularity"], target["timing"]) == (row["tokens"], row["popularity"], "eager")
        best = min(v for k, v in t.items() if k.startswith("base+N_soppu"))
        unc = min(t["base+N_lora_ref"], t["base+N_lora_grouped"])
        assert target["throughput_vs_one_lora"] == pytest.approx(t["base+1lora"] / best, rel=1e-2, abs=1e-3)
        assert target["speedup_vs_uncompressed"] == pytest.approx(unc / best, rel=1e-2, abs=1e-3)
        assert target["speedup_vs_grouped"] == pytest.approx(t["base+N_lora_grouped"] / best, rel=1e-2, abs=1e-3)
    # no Triton paths on CPU, so nothing to choose FUSED_MAX_TOKENS from
    assert out["fused_choice"]["fused_over_gemm_median_ratio"] == {}
    assert out["fused_choice"]["suggested_fused_max_tokens"] is None


def test_fused_choice_picks_the_largest_winning_batch() -> None:
    """_fused_choice on made-up rows: fused beats gemm at T = 1 and 16, loses at 64."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import serve
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = []
    for T, fused, fused2, gemm in [(1, 0.5, 0.6, 1.0), (16, 0.9, 0.8, 1.0), (64, 1.5, 1.2, 1.0)]:
        times = {"base+N_soppu_k16_triton_fused": fused, "base+N_soppu_k16_triton_fused2": fused2,
                 "base+N_soppu_k16_triton_gemm": gemm}
        rows.append({"tokens": T, "adapters": 10, "times_ms": times, "graphs": {"times_ms": times}})
    choice = serve._fused_choice(rows, 10, graphs=True)
    assert choice["timing"] == "graphs"
    assert choice["fused_over_gemm_median_ratio"] == {1: 0.5, 16: 0.8, 64: 1.2}
    assert choice["suggested_fused_max_tokens"] == 16
