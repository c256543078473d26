"""Add adapters to an existing basis: project them onto a bundle's published (U, V), no refit.

The new bundle reuses ``basis.safetensors`` byte for byte, so a registry stores it once (same
sha256) and a server that already holds the basis loads only the new cores. Cores are the best
ones for the fixed basis (``compress/project.py``); with several clusters each new adapter joins
the cluster whose basis leaves the smallest total error over all modules.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from soppu_client.adapters import load_collection
from soppu_client.format.bundle import BASIS, TORCH_DTYPES, Bundle, BundleBuilder, basis_key
from soppu_client.compress.pipeline import adapter_entries, metrics_sections
from soppu_client.compress import stack_factors
from soppu_client.compress.project import project_cores
from soppu_client.format.errors import InputError
from soppu_client.metrics import module_metrics, parameter_counts

def _check_compatible(base: Bundle, collection, label: str) -> None:
    problems = []
    if collection.base_model != base.manifest["base_model"]:
        problems.append(f"the adapters are for `{collection.base_model}`, the bundle for `{base.manifest['base_model']}`")
    shapes = {m: tuple(v["shape"]) for m, v in base.manifest["modules"].items()}
    if set(shapes) != set(collection.shapes):
        missing = sorted(set(shapes) ^ set(collection.shapes))
        problems.append(f"the adapters and the bundle target different modules (e.g. `{missing[0]}`)")
    else:
        bad = [m for m in shapes if shapes[m] != tuple(collection.shapes[m])]
        if bad:
            problems.append(f"module `{bad[0]}` is {list(collection.shapes[bad[0]])} in the adapters, {list(shapes[bad[0]])} in the bundle")
    taken = sorted(set(collection.names) & set(base.names))
    if taken:
        problems.append(f"adapter name(s) {', '.join(f'`{n}`' for n in taken)} already in the bundle; rename the directories")
    if problems:
        raise InputError(f"cannot project onto {label}: " + "; ".join(problems))


def project_adapters(
    adapter_dirs: list[str | Path], onto: str | Path | Bundle, out: str | Path, *, force: bool = False,
    progress: Callable | None = None, onto_label: str | None = None,
) -> dict:
    """Write bundle ``out`` holding the new adapters' cores on the basis of bundle ``onto``.

    ``onto``: a bundle dir, or an opened Bundle whose basis.safetensors is already verified (e.g.
    one fetched by ``registry_fetch.fetch_published_basis``); ``onto_label`` names it in errors and
    in the manifest's ``fit.projected_onto`` (default: its path).
    """
    started = time.perf_counter()
    base = onto if isinstance(onto, Bundle) else Bundle.open(onto)
    label = onto_label or str(base.path)
    collection = load_collection(adapter_dirs)
    _check_compatible(base, collection, label)
    basis = base.load_basis()
    n_clusters, diag, k = base.n_clusters, base.diag, base.rank
    modules = base.modules

    def bases(module: str, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (basis[basis_key(module, "U", c, n_clusters)].double(),
                basis[basis_key(module, "V", c, n_clusters)].double())

    cluster_of = [0] * len(collection.names)
    if n_clusters > 1:  # pass 1: total residual per (adapter, cluster)
        residual = np.zeros((len(collection.names), n_clusters))
        for module in modules:
            factors = collection.module_factors(module, dtype=np.float64)
            stack = stack_factors(factors, dtype=torch.float64)
            for c in range(n_clusters):
                U, V = bases(module, c)
                S = project_cores(stack, U, V, diag=diag).numpy()
                m = module_metrics(module, factors, [U.numpy()], [V.numpy()], list(S), [0] * len(factors), k)
                residual[:, c] += m.sq_residual
        cluster_of = residual.argmin(1).tolist()

    storage = TORCH_DTYPES[base.manifest["dtype"]]
    builder = BundleBuilder(collection.names, k, diag, n_clusters, storage, reuse_basis=base.path / BASIS)
    metrics = []
    for module in progress(modules) if progress else modules:
        factors = collection.module_factors(module, dtype=np.float64)
        stack = stack_factors(factors, dtype=torch.float64)
        cores = torch.zeros((len(factors), k) if diag else (len(factors), k, k), dtype=torch.float64)
        for c in set(cluster_of):
            members = [i for i, ci in enumerate(cluster_of) if ci == c]
            U, V = bases(module, c)
            cores[members] = project_cores(stack.subset(members), U, V, diag=diag)
        Us = [bases(module, c)[0] for c in range(n_clusters)]
        Vs = [bases(module, c)[1] for c in range(n_clusters)]
        builder.add_module(module, Us, Vs, cores)
        stored = [s.to(storage).double().numpy() for s in cores]
        metrics.append(module_metrics(module, factors, [u.numpy() for u in Us], [v.numpy() for v in Vs], stored, cluster_of, k))
    ranks = [{m: info.modules[m][2] for m in collection.modules} for info in collection.adapters]
    sizes = parameter_counts(collection.shapes, ranks, k, n_clusters, diag)
    sizes["params_basis_reused"] = sizes.pop("params_basis")
    sizes["params_after"] = sizes["params_cores"]
    sizes["param_ratio"] = sizes["params_before"] / sizes["params_after"]
    manifest = {
        key: base.manifest[key] for key in ("format", "base_model", "method", "rank", "dtype", "clusters", "peft")
    }
    manifest["adapters"] = adapter_entries(collection, cluster_of)
    manifest["fit"] = {"projected_onto": label, "basis_sha256": base.manifest["files"][BASIS]["sha256"],
                       "seconds": round(time.perf_counter() - started, 3)}
    manifest["metrics"], extra = metrics_sections(metrics, collection.names, sizes)
    return builder.write(Path(out), manifest, extra_files=extra, force=force)

