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

from soppu_client import __version__
from soppu_client.adapters import AdapterCollection, load_collection
from soppu_client.format.bundle import TORCH_DTYPES, BundleBuilder, canonical_dumps, core_path, peft_fields
from soppu_client.compress import CompressConfig, assign_clusters, iter_compressed_modules
from soppu_client.metrics import ModuleMetrics, module_metrics, parameter_counts, summarize



def adapter_entries(collection: AdapterCollection, cluster_of: list[int]) -> dict:
    """The manifest's "adapters" section: core file, cluster, source rank and alpha per adapter."""
    return {
        info.name: {"core": core_path(info.name), "cluster": cluster_of[i], "source_rank": info.rank, "alpha": info.alpha}
        for i, info in enumerate(collection.adapters)
    }


def metrics_sections(metrics: list[ModuleMetrics], names: list[str], sizes: dict) -> tuple[dict, dict[str, bytes]]:
    """(manifest "metrics" section, {"metrics.json": per-module detail}) of a bundle."""
    summary = summarize(metrics, names)
    section = {"summary": {k: v for k, v in summary.items() if k != "layers"}, "layers": summary["layers"], "sizes": sizes}
    detail = {"error_definition": summary["error_definition"], "modules": [m.to_json(names) for m in metrics]}
    return section, {"metrics.json": canonical_dumps(detail).encode()}


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
    storage = TORCH_DTYPES[dtype_name]
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
        "adapters": adapter_entries(collection, cluster_of),
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
    }
    tensor_bytes = builder.tensor_bytes()
    sizes.update(source_bytes=int(source_bytes), tensor_bytes=tensor_bytes, byte_ratio=source_bytes / tensor_bytes)
    manifest["metrics"], extra = metrics_sections(metrics, names, sizes)
    return builder.write(Path(out), manifest, extra_files=extra, force=force)


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
