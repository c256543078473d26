"""End to end: adapter dirs -> validated collection -> per-module cores + metrics -> bundle.

Two ways to a bundle, one producer of its :class:`~soppu_client.format.bundle.Manifest` and
:class:`~soppu_client.format.bundle.Sizes`:

- :func:`compress_adapters` / :func:`compress_collection` fit shared bases (one per cluster) and
  every adapter's core;
- :func:`project_adapters` keeps an existing bundle's bases and fits only the new adapters' cores
  (``compress/project.py``, no refit). The new bundle reuses ``basis.safetensors`` byte for byte,
  so a registry stores it once (same sha256) and a server that holds the basis loads only the new
  cores; with several clusters each new adapter joins the cluster whose basis leaves the smallest
  total error over all modules.

Both stream module by module (one module's factors for all adapters in memory at a time); bases
and cores, the compressed result and small, accumulate until the bundle is written atomically.
"""

from __future__ import annotations

import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from soppu_client import __version__
from soppu_client.adapters import AdapterCollection, load_collection
from soppu_client.compress import CompressConfig, assign_clusters, iter_compressed_modules, stack_factors
from soppu_client.compress.project import project_cores
from soppu_client.compress.threads import fit_threads
from soppu_client.format.bundle import (
    AdapterEntry,
    Bundle,
    BundleBuilder,
    BundleMetrics,
    FileEntry,
    Manifest,
    Sizes,
    canonical_dumps,
    peft_fields,
    torch_dtype,
)
from soppu_client.format.errors import InputError
from soppu_client.format.names import BASIS, METRICS, core_path
from soppu_client.format.packed_cores import PACKED
from soppu_client.format.quant import QuantSpec
from soppu_client.metrics import ModuleMetrics, module_metrics, summarize

__all__ = ["compress_adapters", "compress_collection", "project_adapters", "write_fitted_bundle"]


# --------------------------------------------------------------------------- shared


def _adapter_entries(collection: AdapterCollection, cluster_of: list[int]) -> dict[str, AdapterEntry]:
    """The manifest's adapters: core file, cluster, source rank and alpha per adapter."""
    return {info.name: AdapterEntry(core=core_path(info.name), cluster=cluster_of[i], source_rank=info.rank,
                                    alpha=info.alpha)
            for i, info in enumerate(collection.adapters)}


def _sizes(collection: AdapterCollection, builder: BundleBuilder, *, basis_reused: bool) -> Sizes:
    """Parameters before (sum of r_i (d_in + d_out)) and after (bases + cores), and bytes."""
    shapes, ks = collection.shapes, builder.ranks  # k per module
    before = sum(info.modules[m][2] * (d_out + d_in) for info in collection.adapters for m, (d_out, d_in) in shapes.items())
    basis = sum(builder.n_clusters * ks[m] * (d_out + d_in) for m, (d_out, d_in) in shapes.items())
    cores = len(collection.adapters) * sum(ks[m] if builder.diag else ks[m] ** 2 for m in shapes)
    source_bytes = sum(info.weights_path.stat().st_size for info in collection.adapters)
    return Sizes(params_before=int(before), params_basis=int(basis), params_cores=int(cores), basis_reused=basis_reused,
                 source_bytes=int(source_bytes), tensor_bytes=builder.tensor_bytes(), source_bf16_bytes=2 * int(before))


def _metrics_parts(metrics: list[ModuleMetrics], names: list[str], sizes: Sizes) -> tuple[BundleMetrics, dict]:
    """The manifest's metrics section and metrics.json's object."""
    summary = summarize(metrics, names)
    section = BundleMetrics(summary={k: v for k, v in summary.items() if k != "layers"}, layers=summary["layers"],
                            sizes=sizes)
    detail = {"error_definition": summary["error_definition"], "modules": [m.to_json(names) for m in metrics]}
    return section, detail


def _write(builder: BundleBuilder, out: str | Path, manifest: Manifest, metrics: list[ModuleMetrics],
           collection: AdapterCollection, *, basis_reused: bool, force: bool) -> Manifest:
    """Attach metrics (manifest summary + metrics.json detail) and sizes, then write the bundle."""
    section, detail = _metrics_parts(metrics, collection.names, _sizes(collection, builder, basis_reused=basis_reused))
    manifest = replace(manifest, modules=dict(builder.shapes), metrics=section, **builder.manifest_fields())
    return builder.write(Path(out), manifest, extra_files={METRICS: canonical_dumps(detail).encode()}, force=force)


_WIDE_FLOAT = 1.2345678901234567e-05
"""A float whose JSON text (22 characters) is as long as any non-negative float below 1e16 above 1e-100."""


def _widen(obj: object, wide_int: int, ints: bool = False) -> object:
    """``obj`` with every float (and, with ``ints``, every int) at its widest JSON text."""
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, float):
        return _WIDE_FLOAT
    if isinstance(obj, int):
        return wide_int if ints else obj
    if isinstance(obj, dict):
        return {k: _widen(v, wide_int, ints) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_widen(v, wide_int, ints) for v in obj]
    return obj


def _fit_section(config: CompressConfig, *, iterations: list[int], converged: bool, calibration: dict | None,
                 storage_plan: dict, seconds: float) -> dict:
    """The manifest's ``fit`` section of ``soppu compress``."""
    return {
        **config.to_json(),
        "iterations_mean": float(np.mean(iterations)),
        "iterations_max": int(np.max(iterations)),
        "all_converged": bool(converged),
        "calibration_used": calibration,
        **({"storage": storage_plan} if storage_plan else {}),
        "seconds": round(seconds, 3),
        "soppu_version": __version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def json_bytes_bound(collection: AdapterCollection, config: CompressConfig, cluster_of: list[int],
                     calibration: dict | None, dtype_name: str) -> int:
    """Upper bound of manifest.json + metrics.json of ``compress_collection``'s bundle, known
    before the fit: both rendered as written, with every measured float at its widest text
    (22 characters), every byte count and size at the widest the bytes could need, each module
    with its own rank and both roles quantized, and each plan entry with k = --rank and bits null."""
    names, shapes = collection.names, collection.shapes
    params_before = sum(info.modules[m][2] * (d_out + d_in) for info in collection.adapters
                        for m, (d_out, d_in) in shapes.items())
    source = sum(info.weights_path.stat().st_size for info in collection.adapters)
    budget = 0
    if config.budget is not None:
        from soppu_client.compress.budget import parse_budget

        budget = parse_budget(config.budget, 2 * params_before)
    wide = 10 ** (len(str(max(budget, source, 2 * params_before, 4 * params_before * config.rank))) + 1) - 1
    ones = np.ones(len(names))
    dummy = [ModuleMetrics(m, ones, 0.5 * ones, 0.25 * ones) for m in shapes]
    sizes = Sizes(params_before=wide, params_basis=wide, params_cores=wide, source_bytes=wide, tensor_bytes=wide,
                  source_bf16_bytes=wide, safetensors_bytes=wide, file_bytes=wide)
    section, detail = _metrics_parts(dummy, names, sizes)
    section = BundleMetrics(summary=_widen(section.summary, wide), layers=_widen(section.layers, wide), sizes=sizes)
    plan = {}
    if config.quantized:
        plan = {"modules": {m: {"k": config.rank, "basis_bits": None, "core_bits": None} for m in shapes}}
        if config.budget is not None:
            plan.update({key: wide for key in ("budget_bytes", "planned_bytes", "planned_safetensors_bytes",
                                               "json_bytes_bound", "planned_file_bytes", "source_bf16_bytes")},
                        budget=config.budget)
    fit = _fit_section(config, iterations=[config.max_iter], converged=False, calibration=calibration,
                       storage_plan=plan, seconds=1.0)
    fit["iterations_mean"] = fit["seconds"] = _WIDE_FLOAT
    spec = QuantSpec(8, config.group_size)
    n_clusters = max(cluster_of) + 1
    files = {rel: FileEntry("0" * 64, wide) for rel in [BASIS, *(core_path(n) for n in names), METRICS]}
    manifest = Manifest(base_model=collection.base_model, method=config.method, rank=config.rank, dtype=dtype_name,
                        clusters=n_clusters, modules=dict(shapes), adapters=_adapter_entries(collection, cluster_of),
                        files=files, peft=peft_fields([info.config for info in collection.adapters]), fit=fit,
                        metrics=section, ranks={m: config.rank for m in shapes},
                        quant={m: {"basis": spec, "cores": spec} for m in shapes}, cores_layout=PACKED)
    data = manifest.to_json()
    data["metrics"]["sizes"] = _widen(data["metrics"]["sizes"], wide, ints=True)  # its ratios too
    return len(canonical_dumps(data).encode()) + len(canonical_dumps(_widen(detail, wide)).encode())


def write_fitted_bundle(
    collection: AdapterCollection,
    out: str | Path,
    fits: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]],
    metrics: list[ModuleMetrics],
    *,
    rank: int,
    dtype: str,
    fit: dict,
    cluster_of: list[int] | None = None,
    method: str = "full",
    force: bool = False,
) -> Manifest:
    """Write a bundle of fits made outside :func:`compress_collection` (a benchmark's baseline, say),
    with the same writer, manifest and metrics layout as ``soppu compress``.

    ``fits``: module -> (U per cluster [d_out, k], V per cluster [d_in, k], cores [N, k, k] or [N, k]
    with scaling folded in), in the collection's module and adapter order; ``metrics``: one
    ModuleMetrics per module, computed on the values as stored at ``dtype``; ``fit``: the
    manifest's ``fit`` section (how the fit was made).
    """
    cluster_of = cluster_of or [0] * len(collection.names)
    builder = BundleBuilder(collection.names, rank, method == "diag", n_clusters=max(cluster_of) + 1,
                            dtype=torch_dtype(dtype))
    for module, (Us, Vs, cores) in fits.items():
        builder.add_module(module, list(Us), list(Vs), cores)
    manifest = Manifest(
        base_model=collection.base_model, method=method, rank=rank, dtype=dtype, clusters=max(cluster_of) + 1,
        modules={}, adapters=_adapter_entries(collection, cluster_of),
        peft=peft_fields([info.config for info in collection.adapters]), fit=fit,
    )
    return _write(builder, out, manifest, metrics, collection, basis_reused=False, force=force)


# --------------------------------------------------------------------------- compress


def compress_collection(
    collection: AdapterCollection,
    out: str | Path,
    config: CompressConfig,
    *,
    force: bool = False,
    progress: Callable | None = None,
    base_model: str | None = None,
    calibration_stats: dict | None = None,
) -> Manifest:
    """Compress ``collection`` into the bundle ``out``; return its manifest (with metrics).

    With ``config.calibration == "auto"`` and adapters holding ``calibration.jsonl``, the fit is
    weighted by statistics computed on ``base_model`` (``calibration.py``; ``calibration_stats``
    reuses ones computed before for the same prompts).
    """
    from soppu_client.compress.calibration import prepare

    started = time.perf_counter()
    stats, calibration = prepare(collection, config, base_model, stats=calibration_stats)
    names = collection.names
    dtype_name = collection.storage_dtype if config.dtype == "auto" else config.dtype
    storage = torch_dtype(dtype_name)
    cluster_of = assign_clusters(collection, config.clusters, config.rank, seed=config.seed, weighting=config.weighting)
    n_clusters = max(cluster_of) + 1
    builder = BundleBuilder(names, config.rank, config.diag, n_clusters=n_clusters, dtype=storage)
    metrics: list[ModuleMetrics] = []
    iterations: list[int] = []
    converged = True
    fitted = iter_compressed_modules(collection, config, cluster_of, progress=progress, stats=stats)
    storage_plan: dict = {}
    if config.quantized:  # --bits / --budget: quantized (and, with a budget, per-module k) storage
        from soppu_client.compress.budget import stored_modules

        json_bytes = json_bytes_bound(collection, config, cluster_of, calibration, dtype_name) if config.budget else 0
        fitted = stored_modules(collection, config, fitted, storage, storage_plan, json_bytes=json_bytes,
                                n_clusters=n_clusters)
    for module, factors, fit in fitted:
        if fit.stored is not None:
            from soppu_client.compress.quantize import stored_values

            builder.add_module(module, fit.stored.U, fit.stored.V, fit.stored.cores)
            U, V, cores = stored_values(fit.stored, storage)  # metrics on the dequantized stored values
        else:
            builder.add_module(module, fit.U, fit.V, fit.cores)
            # metrics on what is stored (after rounding to the storage dtype)
            U = [u.to(storage).double().numpy() for u in fit.U]
            V = [v.to(storage).double().numpy() for v in fit.V]
            cores = [c.to(storage).double().numpy() for c in fit.cores]
        metrics.append(module_metrics(module, factors, U, V, cores, fit.cluster_of, int(fit.U[0].shape[1]),
                                      stack=fit.stack))
        fit.stack = None  # one module's stack in memory at a time
        iterations.extend(fit.iterations)
        converged &= all(fit.converged)
    manifest = Manifest(
        base_model=collection.base_model,
        method=config.method,
        rank=config.rank,
        dtype=dtype_name,
        clusters=n_clusters,
        modules={},
        adapters=_adapter_entries(collection, cluster_of),
        peft=peft_fields([info.config for info in collection.adapters]),
        fit=_fit_section(config, iterations=iterations, converged=converged, calibration=calibration,
                         storage_plan=storage_plan, seconds=time.perf_counter() - started),
    )
    return _write(builder, out, manifest, metrics, collection, basis_reused=False, force=force)


def compress_adapters(
    adapter_dirs: list[str | Path],
    out: str | Path,
    config: CompressConfig,
    *,
    names: list[str] | None = None,
    force: bool = False,
    progress: Callable | None = None,
    base_model: str | None = None,
) -> Manifest:
    """Validate ``adapter_dirs`` (all problems at once) and compress them into ``out``."""
    collection = load_collection(adapter_dirs, names)
    with fit_threads(largest_stack(collection)):
        return compress_collection(collection, out, config, force=force, progress=progress, base_model=base_model)


def largest_stack(collection: AdapterCollection) -> int:
    """Elements of the largest module's stacked factors, sum_i r_i * (d_in + d_out)."""
    ranks = sum(info.rank for info in collection.adapters)
    return ranks * max((d_out + d_in for d_out, d_in in collection.shapes.values()), default=0)


# --------------------------------------------------------------------------- project


def _check_compatible(base: Bundle, collection: AdapterCollection, label: str) -> None:
    problems = []
    m = base.manifest
    if collection.base_model != m.base_model:
        problems.append(f"the adapters are for `{collection.base_model}`, the bundle for `{m.base_model}`")
    if set(m.modules) != set(collection.shapes):
        missing = sorted(set(m.modules) ^ set(collection.shapes))
        problems.append(f"the adapters and the bundle target different modules (e.g. `{missing[0]}`)")
    else:
        bad = [mod for mod in m.modules if m.modules[mod] != tuple(collection.shapes[mod])]
        if bad:
            problems.append(f"module `{bad[0]}` is {list(collection.shapes[bad[0]])} in the adapters, "
                            f"{list(m.modules[bad[0]])} in the bundle")
    taken = sorted(set(collection.names) & set(base.names))
    if taken:
        problems.append(f"adapter name(s) {', '.join(f'`{n}`' for n in taken)} already in the bundle; rename the directories")
    if problems:
        raise InputError(f"cannot project onto {label}: " + "; ".join(problems))


def project_adapters(
    adapter_dirs: list[str | Path], onto: str | Path | Bundle, out: str | Path, *, force: bool = False,
    progress: Callable | None = None, onto_label: str | None = None,
) -> Manifest:
    """Write bundle ``out`` holding the new adapters' cores on the basis of bundle ``onto``.

    ``onto``: a bundle dir, or an opened Bundle whose basis.safetensors is already verified (e.g.
    one fetched by ``soppu_client.fetch.fetch_published_basis``); ``onto_label`` names it in errors
    and in the manifest's ``fit.projected_onto`` (default: its path).
    """
    started = time.perf_counter()
    base = onto if isinstance(onto, Bundle) else Bundle.open(onto)
    label = onto_label or str(base.path)
    collection = load_collection(adapter_dirs)
    _check_compatible(base, collection, label)
    with fit_threads(largest_stack(collection)):
        return _project_collection(base, collection, label, out, started, force=force, progress=progress)


def _project_collection(base: Bundle, collection: AdapterCollection, label: str, out: str | Path, started: float,
                        *, force: bool, progress: Callable | None) -> Manifest:
    n_clusters, diag, k = base.n_clusters, base.diag, base.rank

    def bases(module: str, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        U, V = base.bases(module, c)
        return U.double(), V.double()

    cluster_of = [0] * len(collection.names)
    if n_clusters > 1:  # pass 1: total residual per (adapter, cluster)
        residual = np.zeros((len(collection.names), n_clusters))
        for module in base.modules:
            factors = collection.module_factors(module, dtype=np.float64)
            stack = stack_factors(factors, dtype=torch.float64)
            for c in range(n_clusters):
                U, V = bases(module, c)
                S = project_cores(stack, U, V, diag=diag).numpy()
                m = module_metrics(module, factors, [U.numpy()], [V.numpy()], list(S), [0] * len(factors),
                                   base.manifest.module_rank(module), stack=stack)
                residual[:, c] += m.sq_residual
        cluster_of = residual.argmin(1).tolist()

    storage = torch_dtype(base.manifest.dtype)
    builder = BundleBuilder(collection.names, k, diag, n_clusters, storage, reuse_basis=base.path / BASIS)
    metrics = []
    for module in progress(base.modules) if progress else base.modules:
        factors = collection.module_factors(module, dtype=np.float64)
        stack = stack_factors(factors, dtype=torch.float64)
        k = base.manifest.module_rank(module)  # per-module k of a --budget basis
        cores = torch.zeros((len(factors), k) if diag else (len(factors), k, k), dtype=torch.float64)
        for c in set(cluster_of):
            members = [i for i, ci in enumerate(cluster_of) if ci == c]
            U, V = bases(module, c)
            cores[members] = project_cores(stack.subset(members), U, V, diag=diag)
        Us, Vs = zip(*(bases(module, c) for c in range(n_clusters)))
        builder.add_module(module, list(Us), list(Vs), cores)
        if (spec := base.manifest.quant_spec(module, "basis")) is not None:  # the reused basis stays quantized
            builder.quant.setdefault(module, {})["basis"] = spec
        stored = [s.to(storage).double().numpy() for s in cores]
        metrics.append(module_metrics(module, factors, [u.numpy() for u in Us], [v.numpy() for v in Vs], stored,
                                      cluster_of, k, stack=stack))
    bm = base.manifest
    manifest = Manifest(
        base_model=bm.base_model, method=bm.method, rank=bm.rank, dtype=bm.dtype, clusters=bm.clusters, modules={},
        adapters=_adapter_entries(collection, cluster_of), peft=bm.peft, format=bm.format,
        fit={"projected_onto": label, "basis_sha256": bm.files[BASIS].sha256,
             "seconds": round(time.perf_counter() - started, 3)},
    )
    return _write(builder, out, manifest, metrics, collection, basis_reused=True, force=force)
