"""End to end: adapter dirs -> validated collection -> per-module fits + metrics -> bundle.

Streams module by module (one module's factors for all adapters in memory at a time); the bases
and cores, which are the compressed result and small, accumulate until the bundle is written
atomically at the end.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .adapters import AdapterCollection, load_collection
from .bundle import BundleBuilder, canonical_dumps, peft_fields
from .compress import CompressConfig, assign_clusters, iter_compressed_modules
from .metrics import ModuleMetrics, module_metrics, parameter_counts, summarize

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compress_collection(
    collection: AdapterCollection,
    out: str | Path,
    config: CompressConfig,
    *,
    force: bool = False,
    progress: Callable | None = None,
) -> dict:
    """Compress ``collection`` into the bundle ``out``; return the manifest (with metrics)."""
    started = time.perf_counter()
    names = collection.names
    dtype_name = collection.storage_dtype if config.dtype == "auto" else config.dtype
    storage = _TORCH_DTYPES[dtype_name]
    cluster_of = assign_clusters(collection, config.clusters, config.rank, seed=config.seed, weighting=config.weighting)
    n_clusters = max(cluster_of) + 1
    builder = BundleBuilder(names, config.rank, config.diag, n_clusters=n_clusters, dtype=storage)
    metrics: list[ModuleMetrics] = []
    iterations: list[int] = []
    converged = True
    for module, factors, fit in iter_compressed_modules(collection, config, cluster_of, progress=progress):
        builder.add_module(module, fit.U, fit.V, fit.cores)
        # metrics on what is stored (after rounding to the storage dtype)
        U = [u.to(storage).double().numpy() for u in fit.U]
        V = [v.to(storage).double().numpy() for v in fit.V]
        cores = [c.to(storage).double().numpy() for c in fit.cores]
        metrics.append(module_metrics(module, factors, U, V, cores, fit.cluster_of, config.rank))
        iterations.extend(fit.iterations)
        converged &= all(fit.converged)
    summary = summarize(metrics, names)
    ranks = [{m: info.modules[m][2] for m in collection.modules} for info in collection.adapters]
    sizes = parameter_counts(collection.shapes, ranks, config.rank, n_clusters, config.diag)
    source_bytes = sum(info.weights_path.stat().st_size for info in collection.adapters)
    manifest = {
        "format": "soppu-bundle/1",
        "base_model": collection.base_model,
        "method": config.method,
        "rank": config.rank,
        "dtype": dtype_name,
        "clusters": n_clusters,
        "peft": peft_fields([info.config for info in collection.adapters]),
        "adapters": {
            info.name: {
                "core": f"cores/{info.name}.safetensors",
                "cluster": cluster_of[i],
                "source_rank": info.rank,
                "alpha": info.alpha,
            }
            for i, info in enumerate(collection.adapters)
        },
        "fit": {
            **config.to_json(),
            "iterations_mean": float(np.mean(iterations)),
            "iterations_max": int(np.max(iterations)),
            "all_converged": bool(converged),
            "seconds": round(time.perf_counter() - started, 3),
            "soppu_version": __version__,
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "metrics": {
            "summary": {k: v for k, v in summary.items() if k != "layers"},
            "layers": summary["layers"],
            "sizes": {**sizes, "source_bytes": int(source_bytes), "tensor_bytes": builder.tensor_bytes()},
        },
    }
    sizes_out = manifest["metrics"]["sizes"]
    sizes_out["byte_ratio"] = source_bytes / sizes_out["tensor_bytes"]
    detail = {"error_definition": summary["error_definition"], "modules": [m.to_json(names) for m in metrics]}
    return builder.write(Path(out), manifest, extra_files={"metrics.json": canonical_dumps(detail).encode()}, force=force)


def compress_adapters(
    adapter_dirs: list[str | Path],
    out: str | Path,
    config: CompressConfig,
    *,
    names: list[str] | None = None,
    force: bool = False,
    progress: Callable | None = None,
) -> dict:
    """Validate ``adapter_dirs`` (all problems at once) and compress them into ``out``."""
    collection = load_collection(adapter_dirs, names)
    return compress_collection(collection, out, config, force=force, progress=progress)
