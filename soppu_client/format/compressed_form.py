"""Export one adapter of a bundle as a SOPPU compressed adapter dir (``soppu-compressed/1``).

The compressed form keeps the factorization the bundle stores: a patched LoRAX (compressed mode)
loads it, keeps the cluster's basis on the device once per layer and moves only the cores::

    <dir>/adapter_config.json   {"peft_type": "SOPPU_COMPRESSED", "format": "soppu-compressed/1",
                                 "adapter", "base_model_name_or_path", "target_modules", "method",
                                 "rank", "dtype", "modules": {"<module>": [d_out, d_in]},
                                 "source_rank", "basis": {"file", "sha256", "size", "cluster",
                                 "bundle_basis_sha256"}, "cores": {"file", "sha256", "size"}}
    <dir>/basis.safetensors     "<module>.U" [d_out, k], "<module>.V" [d_in, k]  (its cluster only)
    <dir>/cores.safetensors     "<module>.S" [k, k] (full) or [k] (diag)

Semantics: the adapter's update of ``<module>`` is ``dW = U @ S @ V.T`` (diag: ``U @ diag(s) @
V.T``), applied with scaling 1 -- the same matrix as the PEFT export (r = k, lora_A = V.T,
lora_B = U S). The basis file carries no per-adapter bytes, so every adapter of one cluster of one
bundle gets a byte-identical basis.safetensors: its sha256 is the serving side's residency key.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from soppu_client.format.bundle import BASIS, Bundle, basis_key, staged_dir
from soppu_client.format.fsutil import file_digest

FORMAT = "soppu-compressed/1"
PEFT_TYPE = "SOPPU_COMPRESSED"
CONFIG_FILE = "adapter_config.json"
BASIS_FILE = "basis.safetensors"
CORES_FILE = "cores.safetensors"

__all__ = ["BASIS_FILE", "CONFIG_FILE", "CORES_FILE", "FORMAT", "PEFT_TYPE", "export_compressed",
           "write_compressed_files"]


def _file_entry(path: Path) -> dict:
    digest, size = file_digest(path)
    return {"file": path.name, "sha256": digest, "size": size}


def write_compressed_files(bundle: Bundle, name: str, dest: Path) -> dict:
    """Write adapter ``name``'s three files into the existing empty dir ``dest``; returns its config.

    No fsync, no rename: the caller publishes ``dest`` (see :func:`export_compressed`).
    """
    entry = bundle.adapter_entry(name)
    c, n_clusters = bundle.cluster_of(name), bundle.n_clusters
    basis = bundle.load_basis()
    cores = bundle.load_cores(name)
    basis_out, cores_out, modules = {}, {}, {}
    for module, meta in bundle.manifest["modules"].items():
        basis_out[f"{module}.U"] = basis[basis_key(module, "U", c, n_clusters)].contiguous()
        basis_out[f"{module}.V"] = basis[basis_key(module, "V", c, n_clusters)].contiguous()
        cores_out[f"{module}.S"] = cores[f"{module}.S"].contiguous()
        modules[module] = [int(x) for x in meta["shape"]]
    # Metadata identical for every adapter: the basis file is the same bytes across a cluster.
    save_file(basis_out, str(dest / BASIS_FILE), metadata={"format": "pt"})
    save_file(cores_out, str(dest / CORES_FILE), metadata={"format": "pt"})
    peft = bundle.manifest.get("peft", {})
    config = {
        "peft_type": PEFT_TYPE,
        "format": FORMAT,
        "adapter": name,
        "base_model_name_or_path": bundle.manifest["base_model"],
        "target_modules": peft.get("target_modules"),
        "method": bundle.manifest["method"],
        "rank": bundle.rank,
        "dtype": bundle.manifest["dtype"],
        "modules": modules,
        "source_rank": entry.get("source_rank"),
        "basis": {**_file_entry(dest / BASIS_FILE), "cluster": c,
                  "bundle_basis_sha256": bundle.manifest["files"][BASIS]["sha256"]},
        "cores": _file_entry(dest / CORES_FILE),
    }
    (dest / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True), encoding="utf-8")
    return config


def export_compressed(bundle: Bundle | str | Path, name: str, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write adapter ``name`` of ``bundle`` as a compressed adapter dir at ``out_dir`` (atomic)."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    bundle.adapter_entry(name)  # an unknown name fails before anything is written
    with staged_dir(out_dir, force=force) as tmp:
        write_compressed_files(bundle, name, tmp)
    return Path(out_dir)
