"""The SOPPU compressed adapter dir (``soppu-compressed/1``): its writer and its engine-neutral reader.

The compressed form keeps the factorization the bundle stores: a patched LoRAX (compressed mode)
loads it, keeps the cluster's basis on the device once per layer and moves only the cores::

    <dir>/adapter_config.json   {"peft_type": "SOPPU_COMPRESSED", "format": "soppu-compressed/1",
                                 "adapter", "base_model_name_or_path", "target_modules", "method",
                                 "rank", "ranks": {"<module>": k}, "dtype",
                                 "modules": {"<module>": [d_out, d_in]},
                                 "source_rank", "basis": {"file", "sha256", "size", "cluster",
                                 "bundle_basis_sha256"}, "cores": {"file", "sha256", "size"}}
    <dir>/basis.safetensors     "<module>.U" [d_out, k], "<module>.V" [d_in, k]  (its cluster only)
    <dir>/cores.safetensors     "<module>.S" [k, k] (full) or [k] (diag)

``rank`` is the largest k; ``ranks`` gives each module's own k (bundles with per-module ranks).
Tensors are float: a quantized bundle is dequantized here, once, and written as float32
(``dtype`` then says ``float32``); engines that stack layers pad smaller k with zeros (exact).

Semantics: the adapter's update of ``<module>`` is ``dW = U @ S @ V.T`` (diag: ``U @ diag(s) @
V.T``), applied with scaling 1 -- the same matrix as the PEFT export (r = k, lora_A = V.T,
lora_B = U S). The basis file carries no per-adapter bytes, so every adapter of one cluster of one
bundle gets a byte-identical basis.safetensors: its sha256 is the serving side's residency key.

Writing: :func:`export_compressed` / :func:`write_compressed_files`. Reading (any engine, no LoRAX):
:func:`read_compressed_config` (None for a dir that is not one), :func:`load_compressed` (tensors,
digests checked), :func:`check_compressed_file`. Problems raise :class:`CompressedAdapterError`.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from soppu_client.format.bundle import Bundle
from soppu_client.format.errors import BundleError
from soppu_client.format.fsutil import file_digest, staged_dir
from soppu_client.format.names import BASIS, COMPRESSED_FORMAT

PEFT_TYPE = "SOPPU_COMPRESSED"
CONFIG_FILE = "adapter_config.json"
BASIS_FILE = "basis.safetensors"
CORES_FILE = "cores.safetensors"

__all__ = ["BASIS_FILE", "CONFIG_FILE", "CORES_FILE", "PEFT_TYPE", "CompressedAdapterError",
           "check_compressed_file", "export_compressed", "load_compressed", "read_compressed_config",
           "write_compressed_files"]

_REQUIRED = ("format", "base_model_name_or_path", "method", "rank", "modules", "basis", "cores")


class CompressedAdapterError(BundleError):
    """A compressed adapter dir is malformed or its files do not match its config (exit 2)."""


def _file_entry(path: Path) -> dict:
    digest, size = file_digest(path)
    return {"file": path.name, "sha256": digest, "size": size}


def write_compressed_files(bundle: Bundle, name: str, dest: Path, *, basis: dict | None = None) -> dict:
    """Write adapter ``name``'s three files into the existing empty dir ``dest``; returns its config.

    No fsync, no rename: the caller publishes ``dest`` (see :func:`export_compressed`). ``basis``:
    the ``{"sha256", "size"}`` of this cluster's basis.safetensors as written for another adapter
    of the same bundle (byte-identical across a cluster): then no basis file is written (nor the
    bundle's basis read) and the caller places that file at ``dest / basis.safetensors``.
    """
    entry = bundle.adapter_entry(name)
    c = bundle.cluster_of(name)
    cores = bundle.load_cores(name)
    basis_out, cores_out, modules, ranks = {}, {}, {}, {}
    for module, shape in bundle.manifest.modules.items():
        S = cores[f"{module}.S"]
        if bundle.manifest.quant:  # one dtype per file: every tensor float32 (quantized ones are already)
            S = S.float()
        if basis is None:
            U, V = bundle.bases(module, c)
            if bundle.manifest.quant:
                U, V = U.float(), V.float()
            basis_out[f"{module}.U"] = U.contiguous()
            basis_out[f"{module}.V"] = V.contiguous()
        cores_out[f"{module}.S"] = S.contiguous()
        modules[module] = list(shape)
        ranks[module] = bundle.manifest.module_rank(module)
    # Metadata identical for every adapter: the basis file is the same bytes across a cluster.
    if basis is None:
        save_file(basis_out, str(dest / BASIS_FILE), metadata={"format": "pt"})
    save_file(cores_out, str(dest / CORES_FILE), metadata={"format": "pt"})
    peft = bundle.manifest.peft
    config = {
        "peft_type": PEFT_TYPE,
        "format": COMPRESSED_FORMAT,
        "adapter": name,
        "base_model_name_or_path": bundle.manifest.base_model,
        "target_modules": peft.get("target_modules"),
        "method": bundle.manifest.method,
        "rank": bundle.rank,
        "ranks": ranks,
        "dtype": "float32" if bundle.manifest.quant else bundle.manifest.dtype,
        "modules": modules,
        "source_rank": entry.source_rank,
        "basis": {**(_file_entry(dest / BASIS_FILE) if basis is None else
                     {"file": BASIS_FILE, "sha256": basis["sha256"], "size": int(basis["size"])}),
                  "cluster": c, "bundle_basis_sha256": bundle.manifest.files[BASIS].sha256},
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


def read_compressed_config(path: str | Path) -> dict | None:
    """The config of a compressed adapter (``path``: its dir or its adapter_config.json); None if not one.

    Unreadable or non-JSON files and configs of another ``peft_type`` are not one (None). A config that
    says it is one but is malformed raises CompressedAdapterError. The result holds ``"_dir"``: the dir.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILE
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(config, dict) or config.get("peft_type") != PEFT_TYPE:
        return None
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise CompressedAdapterError(f"{p}: compressed adapter config lacks {', '.join(missing)}")
    if config["format"] != COMPRESSED_FORMAT:
        raise CompressedAdapterError(f"{p}: format is {config['format']!r}, expected {COMPRESSED_FORMAT!r}")
    if config["method"] not in ("full", "diag"):
        raise CompressedAdapterError(f"{p}: method {config['method']!r} is not 'full' or 'diag'")
    config["_dir"] = str(p.parent)
    return config


def check_compressed_file(adapter_dir: Path, entry: dict) -> Path:
    """The path of the file that config ``entry`` ({"file", "sha256", "size"}) names in ``adapter_dir``.

    Raises CompressedAdapterError when it is missing or its size or sha256 differs from the entry.
    """
    path: Path = adapter_dir / entry["file"]
    if not path.is_file():
        raise CompressedAdapterError(f"compressed adapter {adapter_dir}: {entry['file']} is missing")
    digest, size = file_digest(path)
    if size != entry["size"] or not hmac.compare_digest(digest, str(entry["sha256"])):
        raise CompressedAdapterError(f"compressed adapter {adapter_dir}: {entry['file']} does not match its "
                                     f"size / sha256 in {CONFIG_FILE}")
    return path


def load_compressed(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, basis {"<module>.U"/".V"}, cores {"<module>.S"}) of a compressed adapter dir, digests checked."""
    adapter_dir = Path(adapter_dir)
    config = read_compressed_config(adapter_dir)
    if config is None:
        raise CompressedAdapterError(f"{adapter_dir} is not a SOPPU compressed adapter")
    basis = load_file(str(check_compressed_file(adapter_dir, config["basis"])))
    cores = load_file(str(check_compressed_file(adapter_dir, config["cores"])))
    return config, basis, cores
