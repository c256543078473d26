"""benchmarks/fidelity.py --quick runs end to end on two real adapters and its JSON has the promised
shape; the uncompressed adapters beat the base model (non-vacuity). No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fidelity_quick_json_shape(tmp_path: Path) -> None:
    adapters = [ROOT / "examples" / "adapters" / n for n in ("initials", "last_word")]
    out = tmp_path / "fidelity.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--quick", "--adapters", *map(str, adapters),
         "--max-prompts", "6", "--no-cache", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text()) | {"plot": result["plot"]}
    assert Path(result["plot"]).is_file() and Path(result["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert result["adapters"] == ["initials", "last_word"]
    base, original = result["base"]["accuracy"], result["original"]["accuracy"]
    assert set(base) == set(original) == {"initials", "last_word"}
    assert result["original"]["mean_accuracy"] > result["base"]["mean_accuracy"]  # the adapters do something
    assert result["original"]["accuracy_kept"] == 1.0
    rows = result["rows"]
    assert [r["label"] for r in rows] == ["k=4 full norm", "k=4 full norm 4-bit"]
    assert rows[0]["status"] == "ok"
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["reason"]
            continue
        assert set(r["accuracy"]) == {"initials", "last_word"}
        assert 0.0 <= r["accuracy_kept"] <= 2.0 and 0.0 <= r["mean_module_error"] < 1.0
        assert r["source_bf16_bytes"] == 2 * r["params_before"]
        assert r["byte_ratio"] == r["source_bf16_bytes"] / r["tensor_bytes"] and r["byte_ratio"] > 1.0
        assert r["param_ratio"] == r["params_before"] / r["params_after"] > 1.0
    assert set(result["goal"]) == {"accuracy_kept", "byte_ratio", "met", "best"}
