"""benchmarks/scale.py --quick runs end to end (real compress child, real registries on 127.0.0.1,
real serving-side resolves) and its JSON has every figure; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_scale_quick_json_shape_and_batch_beats_per_adapter(tmp_path: Path) -> None:
    out_file = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick", "--threads", "1", "--workdir", str(tmp_path),
         "--out", str(out_file)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert json.loads(out_file.read_text()) == out
    assert out["benchmark"] == "scale" and "Frobenius" in out["error_definition"]
    assert {"cpus", "ram_gb", "load_avg_at_start"} <= set(out["machine"]) and out["machine"]["cpus"] >= 1
    cfg = out["config"]
    assert (cfg["N"], cfg["layers"], cfg["clusters"], cfg["fewer_layers_than_model"]) == (50, 2, [4, 1], True)
    assert out["adapter_bytes"] > 50 * 2 * 2 * 16 * 4096  # 50 adapters x 2 layers x (A and B of q_proj at least), bf16

    runs = {row["clusters"]: row for row in out["compress"]}
    assert set(runs) == {4, 1}
    for row in runs.values():
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 50 and row["bundle_bytes"] > 0
        assert 0 < row["mean_error"] < 1 and row["all_converged"] is True
    # more clusters, more bases: each adapter is served by a basis fitted to fewer others
    assert runs[4]["mean_error"] < runs[1]["mean_error"]

    assert "skipped" not in out["publish"]["sqlite+dir"]  # always measured
    pg = out["publish"]["postgres+s3"]
    assert pg.get("skipped") or {"per_adapter", "batch", "resolve"} <= set(pg), pg  # measured, or why not
    for backend, pub in out["publish"].items():
        if "skipped" in pub:
            continue
        assert pub["backend"] == backend
        assert pub["adapters"] == 50 and pub["files"] == 50 + 3  # cores + manifest, basis, metrics
        per, batch = pub["per_adapter"], pub["batch"]
        assert per["requests_by_kind"]["PUT adapter"] == 50 and "PUT bundle" not in per["requests_by_kind"]
        assert batch["requests_by_kind"]["PUT bundle"] == 1 and "PUT adapter" not in batch["requests_by_kind"]
        assert per["requests_by_kind"]["PUT blob"] == batch["requests_by_kind"]["PUT blob"] == pub["files"]
        assert batch["requests"] < per["requests"]  # non-vacuity: the batch path saves N - 1 requests
        assert per["requests"] - batch["requests"] == 50 - 1
        assert pub["ratios"]["requests_per_adapter_over_batch"] == pytest.approx(per["requests"] / batch["requests"],
                                                                                 abs=0.01)
        res = pub["resolve"]
        assert res["adapters"] == 10 and res["cold"]["n"] == res["warm"]["n"] == 10
        for phase in ("cold", "warm"):
            assert 0 < res[phase]["p50_ms"] <= res[phase]["p99_ms"] <= res[phase]["max_ms"]
        assert res["bytes_downloaded"] > 0
