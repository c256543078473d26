"""Hand-written tiny bundles for signing / validation tests (independent of soppu_client.format.bundle).

Writes the v1 layout from docs/TEAM_NOTES.md with the real ``safetensors`` library:
manifest.json + basis.safetensors + cores/<name>.safetensors, per-file sha256 and size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODULES = {"model.layers.0.self_attn.q_proj": (6, 5), "model.layers.0.self_attn.v_proj": (3, 5)}
RANK = 2


def _digest(path: Path) -> dict:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def make_bundle(root: Path, adapters: tuple[str, ...] = ("a", "b"), *, seed: int = 0,
                base_model: str = BASE_MODEL, method: str = "full", rank: int = RANK,
                modules: dict[str, tuple[int, int]] | None = None) -> Path:
    """Write a valid bundle (method "full": [k, k] cores; "diag": [k]) with the given adapters
    and ``modules`` (name -> (d_out, d_in), default MODULES) under ``root``; return it."""
    modules = MODULES if modules is None else modules
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "cores").mkdir(exist_ok=True)
    basis = {}
    for mod, (d_out, d_in) in modules.items():
        basis[f"{mod}.U"] = rng.standard_normal((d_out, rank)).astype(np.float32)
        basis[f"{mod}.V"] = rng.standard_normal((d_in, rank)).astype(np.float32)
    save_file(basis, str(root / "basis.safetensors"))
    for name in adapters:
        shape = (rank, rank) if method == "full" else (rank,)
        core = {f"{mod}.S": rng.standard_normal(shape).astype(np.float32) for mod in modules}
        save_file(core, str(root / "cores" / f"{name}.safetensors"))
    files = {"basis.safetensors": _digest(root / "basis.safetensors")}
    for name in adapters:
        rel = f"cores/{name}.safetensors"
        files[rel] = _digest(root / rel)
    manifest = {
        "format": "soppu-bundle/1", "base_model": base_model, "method": method, "rank": rank,
        "dtype": "float32", "clusters": 1,
        "peft": {"target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False, "task_type": "CAUSAL_LM"},
        "modules": {mod: {"shape": list(shape)} for mod, shape in modules.items()},
        "adapters": {name: {"core": f"cores/{name}.safetensors", "cluster": 0, "source_rank": 8,
                            "alpha": 16.0} for name in adapters},
        "files": files, "fit": {}, "metrics": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root


def expected_core(rank: int = RANK) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The ``expected`` dict for a core file of a bundle made by :func:`make_bundle`."""
    return {f"{mod}.S": ("F32", (rank, rank)) for mod in MODULES}
