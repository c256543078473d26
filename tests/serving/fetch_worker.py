"""One process of the concurrency test: wait for the start signal, fetch, report JSON on stdout."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from lorax_adapter_source.source import SoppuModelSource  # imported before the start signal

adapter_id, token, go_file = sys.argv[1], sys.argv[2], Path(sys.argv[3])
src = SoppuModelSource(adapter_id, api_token=token)
Path(f"{go_file}.ready.{os.getpid()}").touch()
deadline = time.monotonic() + 120
while not go_file.exists():
    if time.monotonic() > deadline:
        sys.exit("start signal never came")
    time.sleep(0.005)
files = src.download_model_assets()
local = files[0].parent
print(json.dumps({
    "materialized": src.last_stats.materialized,
    "downloaded": src.last_stats.blobs_downloaded,
    "dir": str(local),
    "files": {p.name: p.stat().st_size for p in sorted(local.iterdir())},
}))
