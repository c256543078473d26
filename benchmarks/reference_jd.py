"""The reference JD-Full (bruel-gabrielsson/LoRALoLA ``full_lora_pca``) on PEFT adapter dirs.

A benchmark baseline, not part of soppu: the reference's code is imported from a checkout named by
$LORALOLA_SRC and never copied here. Get it with

    git clone https://github.com/bruel-gabrielsson/LoRALoLA /path/to/LoRALoLA
    export LORALOLA_SRC=/path/to/LoRALoLA

What runs is the reference's own ``compression.full_lora_pca``: its random orthogonal init, its
fixed iteration count (``lolas.lola_loras(type="full")`` uses 10), its ``torch.svd_lowrank`` steps
and its unweighted objective (sum_i ||dW_i - U S_i V.T||^2, i.e. soppu's ``--weighting norm``).
Adaptations, all outside its code:

- inputs: per module, the raw PEFT ``lora_B`` [d_out, r] and ``lora_A.T`` [d_in, r] as float32
  tensors, the arguments ``full_lora_pca_wrapper`` passes, without its ``.to("cuda")`` (CPU here);
  ``lola_loras(transform_lora="none")`` also passes them unscaled;
- its global torch RNG is seeded (``seed``) so runs repeat;
- its cores sigma_i = U.T B_i A_i V are unscaled, and LoRALoLA keeps each adapter's alpha / r when it
  loads them (``set_lora_from_dict``), so the update is s_i U sigma_i V.T: the bundle's core is
  s_i sigma_i (a soppu bundle exports with scaling 1).

Errors are soppu's own metrics (``soppu_client.metrics``, unsquared relative Frobenius norm) on the
values as stored in the bundle dtype, exactly as ``soppu compress`` reports its own.

    LORALOLA_SRC=... .venv/bin/python benchmarks/reference_jd.py DIR [DIR ...] --rank 16 [--bundle OUT] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

ENV = "LORALOLA_SRC"
ITERS = 10  # lolas.lola_loras calls full_lora_pca_wrapper(..., niter=10)


def load_reference(src: str | Path | None = None) -> ModuleType:
    """LoRALoLA's ``compression`` module from ``src`` (default: $LORALOLA_SRC)."""
    src = src or os.environ.get(ENV)
    if not src:
        raise SystemExit(f"${ENV} is not set: point it at a checkout of https://github.com/bruel-gabrielsson/LoRALoLA "
                         f"(e.g. `git clone https://github.com/bruel-gabrielsson/LoRALoLA /tmp/LoRALoLA && "
                         f"export {ENV}=/tmp/LoRALoLA`)")
    path = Path(src) / "compression.py"
    if not path.is_file():
        raise SystemExit(f"${ENV}={src} has no compression.py: it should be the root of a LoRALoLA checkout")
    spec = importlib.util.spec_from_file_location("loralola_compression", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "full_lora_pca"):
        raise SystemExit(f"{path} has no full_lora_pca: not the LoRALoLA version this benchmark was written for")
    return module


def _raw_factors(collection, module: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """(lora_B [d_out, r], lora_A.T [d_in, r], scaling) per adapter, float32, as PEFT stores them."""
    from safetensors import safe_open

    Bs, ATs, scales = [], [], []
    for info in collection.adapters:
        ka, kb = info.keys[module]
        with safe_open(str(info.weights_path), framework="pt") as f:
            ATs.append(f.get_tensor(ka).float().T.contiguous())
            Bs.append(f.get_tensor(kb).float().contiguous())
        scales.append(info.scaling(module))
    return Bs, ATs, scales


@dataclass
class ReferenceResult:
    """The reference's fit of a collection: per module (U, V, cores with scaling folded) and metrics."""

    fit_s: float  # seconds inside full_lora_pca, summed over modules
    load_s: float
    metrics: list  # soppu_client.metrics.ModuleMetrics, on stored values
    summary: dict  # soppu_client.metrics.summarize
    fits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # module -> U, V, cores [N, k, k]
    storage_dtype: str

    @property
    def mean_module_error(self) -> float:
        return float(np.mean([m.error.mean() for m in self.metrics]))


def run_reference(adapter_dirs: list[str | Path], rank: int, iters: int = ITERS, seed: int = 0, *,
                  dtype: str = "auto", src: str | Path | None = None, progress=None) -> ReferenceResult:
    """Fit every module of ``adapter_dirs`` with the reference JD-Full; errors by soppu's metrics."""
    from soppu_client.adapters import load_collection
    from soppu_client.compress.stack import stack_factors
    from soppu_client.format.bundle import torch_dtype
    from soppu_client.metrics import module_metrics, summarize

    ref = load_reference(src)
    collection = load_collection(adapter_dirs)
    dtype_name = collection.storage_dtype if dtype == "auto" else dtype
    storage = torch_dtype(dtype_name)
    torch.manual_seed(seed)
    fit_s = load_s = 0.0
    metrics, fits = [], {}
    for module in progress(collection.modules) if progress else collection.modules:
        t0 = time.perf_counter()
        Bs, ATs, scales = _raw_factors(collection, module)
        t1 = time.perf_counter()
        U, V, sigmas = ref.full_lora_pca(Bs, ATs, rank, iters, display=False)
        fit_s += time.perf_counter() - t1
        load_s += t1 - t0
        cores = torch.stack([s * sigma for s, sigma in zip(scales, sigmas)])
        fits[module] = (U, V, cores)
        # (A_i, s_i B_i) float32, what AdapterCollection.module_factors gives soppu's own fit and metrics
        factors = [(at.T.numpy(), b.numpy() * np.float32(s)) for b, at, s in zip(Bs, ATs, scales)]
        stored = [t.to(storage).double().numpy() for t in (U, V)]
        # the same float32 stack soppu's fit builds and hands to its metrics (built here, outside fit_s)
        stack = stack_factors(factors, "norm", torch.float32)
        metrics.append(module_metrics(module, factors, [stored[0]], [stored[1]],
                                      list(cores.to(storage).double().numpy()), [0] * len(factors), rank,
                                      stack=stack))
    return ReferenceResult(fit_s=fit_s, load_s=load_s, metrics=metrics, summary=summarize(metrics, collection.names),
                           fits=fits, storage_dtype=dtype_name)


def reference_bundle(adapter_dirs: list[str | Path], out_dir: str | Path, rank: int, iters: int = ITERS,
                     seed: int = 0, *, force: bool = False, src: str | Path | None = None) -> Path:
    """Write the reference JD-Full fit of ``adapter_dirs`` as a soppu bundle at ``out_dir``; return it.

    Same writer as ``soppu compress`` (``compress.pipeline.write_fitted_bundle``), so
    ``soppu verify`` / export / the fidelity benchmark score it with the same tools; its manifest's
    ``fit`` says ``"method": "reference"`` with the source, iterations and seconds.
    """
    write_bundle(run_reference(adapter_dirs, rank, iters, seed, src=src), adapter_dirs, out_dir, rank, iters, seed,
                 force=force)
    return Path(out_dir)


def write_bundle(result: ReferenceResult, adapter_dirs: list[str | Path], out_dir: str | Path, rank: int, iters: int,
                 seed: int, *, force: bool = False) -> None:
    """Write ``result`` (a :func:`run_reference` of ``adapter_dirs``) as a soppu bundle."""
    from soppu_client.adapters import load_collection
    from soppu_client.compress.pipeline import write_fitted_bundle

    collection = load_collection(adapter_dirs, check_values=False)
    fits = {module: ([U], [V], cores) for module, (U, V, cores) in result.fits.items()}
    write_fitted_bundle(
        collection, out_dir, fits, result.metrics, rank=rank, dtype=result.storage_dtype, force=force,
        fit={"method": "reference", "reference": "bruel-gabrielsson/LoRALoLA compression.full_lora_pca",
             "iterations": iters, "seed": seed, "seconds": round(result.fit_s, 3), "torch": torch.__version__},
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter_dirs", nargs="+", type=Path)
    ap.add_argument("--rank", type=int, default=16, help="shared rank k")
    ap.add_argument("--iters", type=int, default=ITERS, help="the reference's iteration count (its own: 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", type=Path, default=None, help="also write the fit as a soppu bundle here")
    ap.add_argument("--force", action="store_true", help="replace an existing --bundle")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a line of text")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = run_reference(args.adapter_dirs, args.rank, args.iters, args.seed)
    if args.bundle:
        write_bundle(result, args.adapter_dirs, args.bundle, args.rank, args.iters, args.seed, force=args.force)
    summary = result.summary
    out = {
        "reference": "bruel-gabrielsson/LoRALoLA full_lora_pca", "rank": args.rank, "iterations": args.iters,
        "seed": args.seed, "fit_s": round(result.fit_s, 3), "load_s": round(result.load_s, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "mean_error": summary["mean_error"], "mean_module_error": result.mean_module_error,
        "mean_lower_bound": summary["mean_lower_bound"], "error_definition": summary["error_definition"],
        "bundle": str(args.bundle) if args.bundle else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"reference JD-Full k={args.rank}, {args.iters} iterations: fit {out['fit_s']:.1f}s, wall "
              f"{out['wall_s']:.1f}s, mean error {out['mean_error']:.4f} (unsquared relative Frobenius)"
              + (f"; bundle {args.bundle}" if args.bundle else ""))


if __name__ == "__main__":
    main()
