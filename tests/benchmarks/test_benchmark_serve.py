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
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--device", "cpu", "--hidden", "64", "--tokens", "8",
         "--adapters", "1", "5", "--ranks", "4", "--lora-rank", "4", "--warmup", "0", "--repeats", "2"],
        capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "kernels")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["machine"]["device"] == "cpu" and out["config"]["inner"] == 1
    assert len(out["results"]) == 4  # 2 adapter counts x 2 popularities
    for row in out["results"]:
        assert "errors" not in row, row["errors"]
        t = row["times_ms"]
        assert {"base", "base+1lora", "base+N_lora_ref", "base+N_soppu_k4_reference", "base+N_soppu_k4_torchgemm"} <= set(t)
        for key, v in t.items():
            assert row["ratio_to_one_lora"][key] == pytest.approx(v / t["base+1lora"], rel=1e-2, abs=1e-3)
    rows = out["targets"]["rows"]
    assert out["targets"]["adapters"] == 5 and out["targets"]["applies"] is False and len(rows) == 2
    for target, row in zip(rows, [r for r in out["results"] if r["adapters"] == 5]):
        t = row["times_ms"]
        best = min(v for k, v in t.items() if k.startswith("base+N_soppu"))
        assert target["throughput_vs_one_lora"] == pytest.approx(t["base+1lora"] / best, rel=1e-2, abs=1e-3)
        assert target["speedup_vs_uncompressed"] == pytest.approx(t["base+N_lora_ref"] / best, rel=1e-2, abs=1e-3)
