"""Eight processes fetch one adapter at the same moment: one download, every process sees the full dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.serving import srckit

WORKER = Path(__file__).with_name("fetch_worker.py")


def test_eight_processes_one_download(published, source_env: Path, tmp_path: Path) -> None:
    reg = published.registry
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(WORKER), f"{reg.owner}/ad2", reg.serving_token, str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(8)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready.*"))) < len(procs):  # all imported: start them together
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker did not get ready"
        time.sleep(0.05)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))

    builders = [r for r in results if r["materialized"]]
    assert len(builders) == 1, results
    assert builders[0]["downloaded"] == ["manifest.json", "basis.safetensors", "cores/ad2.safetensors"]
    assert all(r["downloaded"] == [] for r in results if not r["materialized"])
    expected = {"adapter_config.json", "adapter_model.safetensors", "soppu_source.json"}
    assert all(set(r["files"]) == expected and r["files"] == results[0]["files"] for r in results)
    assert len({r["dir"] for r in results}) == 1
    # Nothing left behind but the adapter, the blob store and the "latest" link.
    leftovers = [f for f in srckit.cache_files(source_env) if f.startswith(".tmp")]
    assert leftovers == []
