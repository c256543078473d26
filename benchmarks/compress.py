"""Benchmark the compressor against the reference JD-Full, side by side in one run (a script, not a test).

Cases (``--case``, repeatable; default both), Mistral-7B-shaped PEFT dirs (hidden 4096, kv 1024,
``--layers`` layers, q_proj + v_proj, r=16, bf16 safetensors):

    unstructured   dW_i = B_i A_i with i.i.d. Gaussian factors: no shared subspace (issue 12's case)
    structured     each module's updates mix a shared 24-dim row/column space with their own directions

Per case, on the same dirs and with the same thread count:

1. ``soppu compress`` in a child process (so peak RSS is its own): wall, peak RSS, mean error,
   iterations;
2. the reference, LoRALoLA's ``full_lora_pca`` (``benchmarks/reference_jd.py``, needs $LORALOLA_SRC
   or ``--reference PATH``), in a child process that also writes a bundle with the same writer and
   metrics, so the two wall times cover the same work;
3. fit time only, in this process, module by module, alternating soppu's fit and the reference's
   on the same factors in memory (contention on a shared machine hits both alike).

Errors: unsquared relative Frobenius norm ||dW - U S V^T||_F / ||dW||_F, mean over adapters of the
whole-adapter error, on the stored (bf16) values, by the same metrics code for both. Ratios are
reference / soppu: above 1 means soppu is faster or smaller.

``--sweep``: the defaults study instead: for each weighting x tol, fit time, iterations and errors
on real adapters (``--adapters``, default the examples) and on small synthetic cases.

    LORALOLA_SRC=/path/LoRALoLA .venv/bin/python benchmarks/compress.py --n 100 --layers 32
    LORALOLA_SRC=/path/LoRALoLA .venv/bin/python benchmarks/compress.py --sweep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HIDDEN, KV, R, SHARED = 4096, 1024, 16, 24
LAYERS = 32  # default of write_adapters' ``layers`` (benchmarks/scale.py sets it)
MODULES = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (KV, HIDDEN)}
CASES = ("unstructured", "structured")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import reference_jd  # noqa: E402  (benchmarks/ is not a package)


def write_adapters(root: Path, n: int, seed: int = 0, shared_dims: int = SHARED, *, case: str = "structured",
                   layers: int | None = None) -> list[Path]:
    """N PEFT dirs of ``case`` (see the module docstring); shapes as Mistral-7B's q_proj / v_proj."""
    layers = LAYERS if layers is None else layers
    g = torch.Generator().manual_seed(seed)
    shared = {name: (torch.randn(layers, d_out, shared_dims, generator=g),
                     torch.randn(layers, d_in, shared_dims, generator=g))
              for name, (d_out, d_in) in MODULES.items()} if case == "structured" else {}
    dirs = []
    for i in range(n):
        d = root / f"adapter{i:04d}"
        d.mkdir(parents=True)
        tensors = {}
        for name, (d_out, d_in) in MODULES.items():
            B = torch.randn(layers, d_out, R, generator=g)
            A = torch.randn(layers, R, d_in, generator=g)
            if case == "structured":
                Ub, Vb = shared[name]
                B = Ub @ torch.randn(layers, shared_dims, R, generator=g) + 0.5 * B
                A = torch.randn(layers, R, shared_dims, generator=g) @ Vb.transpose(1, 2) + 0.5 * A
            B, A = B * 1e-3, A / np.sqrt(d_in)
            for layer in range(layers):
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
                tensors[f"{prefix}.lora_A.weight"] = A[layer].to(torch.bfloat16).contiguous()
                tensors[f"{prefix}.lora_B.weight"] = B[layer].to(torch.bfloat16).contiguous()
        save_file(tensors, str(d / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": "mistralai/Mistral-7B-v0.1", "task_type": "CAUSAL_LM", "bias": "none",
            "lora_dropout": 0.0, "fan_in_fan_out": False,
        }
        (d / "adapter_config.json").write_text(json.dumps(config))
        dirs.append(d)
    return dirs


def _child(cmd: list[str], threads: int) -> tuple[float, float, str]:
    """Run ``cmd`` with ``threads`` torch/BLAS threads; (wall s, its own peak RSS MB, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{err.read()[-3000:]}")
        return wall, round(usage.ru_maxrss / 1024, 1), out.read()


def run_soppu(dirs: list[Path], out: Path, rank: int, threads: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "soppu_client.cli", "compress", *map(str, dirs), "-o", str(out),
           "--rank", str(rank), "--json", *extra]
    wall, rss, stdout = _child(cmd, threads)
    payload = json.loads(stdout)
    summary, fit = payload["metrics"]["summary"], payload["fit"]
    return {"wall_s": round(wall, 2), "peak_rss_mb": rss, "mean_error": summary["mean_error"],
            "mean_lower_bound": summary["mean_lower_bound"], "iterations_mean": fit["iterations_mean"],
            "iterations_max": fit["iterations_max"], "all_converged": fit["all_converged"],
            "weighting": fit["weighting"], "tol": fit["tol"],
            "param_ratio": payload["metrics"]["sizes"]["param_ratio"]}


def run_reference(dirs: list[Path], out: Path, rank: int, threads: int, src: str) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reference_jd.py"), *map(str, dirs), "--rank", str(rank),
           "--bundle", str(out), "--json"]
    wall, rss, stdout = _child(cmd, threads)
    payload = json.loads(stdout)
    return {"wall_s": round(wall, 2), "peak_rss_mb": rss, "mean_error": payload["mean_error"],
            "iterations": payload["iterations"], "fit_s": payload["fit_s"]}


def fit_only(dirs: list[Path], rank: int, config_kwargs: dict, src: str | None) -> dict:
    """Seconds inside the fits only, module by module, soppu then reference on the same factors."""
    from soppu_client.adapters import load_collection
    from soppu_client.compress import CompressConfig, fit_module

    ref = reference_jd.load_reference(src) if src else None
    collection = load_collection(dirs, check_values=False)
    config = CompressConfig(rank=rank, **config_kwargs)
    soppu_s = ref_s = 0.0
    torch.manual_seed(0)
    for module in collection.modules:
        factors = collection.module_factors(module)
        t0 = time.perf_counter()
        fit_module(factors, config)
        soppu_s += time.perf_counter() - t0
        if ref is not None:
            Bs, ATs, _ = reference_jd._raw_factors(collection, module)
            t0 = time.perf_counter()
            ref.full_lora_pca(Bs, ATs, rank, reference_jd.ITERS, display=False)
            ref_s += time.perf_counter() - t0
    out = {"soppu_fit_s": round(soppu_s, 2)}
    if ref is not None:
        out.update(reference_fit_s=round(ref_s, 2), fit_speedup=round(ref_s / soppu_s, 2))
    return out


def _ratio(a, b) -> float | None:
    return round(a / b, 2) if a and b else None


def bench_case(case: str, args, src: str | None) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"soppu-bench-{case}-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        dirs = write_adapters(root / "adapters", args.n, case=case, layers=args.layers)
        write_s = time.perf_counter() - t0
        extra = [*(["--weighting", args.weighting] if args.weighting else []),
                 *(["--tol", str(args.tol)] if args.tol else [])]
        soppu = run_soppu(dirs, root / "bundle", args.rank, args.threads, extra)
        result = {"case": case, "N": args.n, "layers": args.layers, "modules": 2 * args.layers, "k": args.rank,
                  "soppu": soppu, "write_adapters_s": round(write_s, 1)}
        if src:
            ref = run_reference(dirs, root / "reference-bundle", args.rank, args.threads, src)
            result["reference"] = ref
            result["ratios"] = {
                "wall_speedup": _ratio(ref["wall_s"], soppu["wall_s"]),
                "peak_rss": _ratio(ref["peak_rss_mb"], soppu["peak_rss_mb"]),
                "error_soppu_minus_reference": round(soppu["mean_error"] - ref["mean_error"], 6),
            }
        if not args.no_fit_timing:
            kwargs = {k: v for k, v in (("weighting", args.weighting), ("tol", args.tol)) if v}
            result["fit_only"] = fit_only(dirs, args.rank, kwargs, src)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sweep(args, src: str | None) -> dict:
    """Defaults study: weighting x tol -> fit seconds, iterations and errors, per dataset."""
    from soppu_client.adapters import load_collection
    from soppu_client.compress import CompressConfig, fit_module
    from soppu_client.metrics import module_metrics, summarize

    root = Path(tempfile.mkdtemp(prefix="soppu-sweep-", dir=args.workdir))
    try:
        datasets = {"examples": sorted(p for p in args.adapters if (p / "adapter_config.json").is_file())}
        for case in CASES:
            datasets[case] = write_adapters(root / case, args.sweep_n, case=case, layers=args.sweep_layers)
        out = {}
        for label, dirs in datasets.items():
            collection = load_collection(dirs, check_values=False)
            rank = args.sweep_rank.get(label, args.rank)
            factors = {m: collection.module_factors(m) for m in collection.modules}
            rows = []
            for weighting in ("equal", "norm"):
                for tol in args.tols:
                    config = CompressConfig(rank=rank, weighting=weighting, tol=tol, max_iter=500)
                    fits, t0 = {}, time.perf_counter()
                    for m, f in factors.items():
                        fits[m] = fit_module(f, config)
                    seconds = time.perf_counter() - t0
                    metrics = [module_metrics(m, f, *(_stored(fits[m])), fits[m].cluster_of, rank)
                               for m, f in factors.items()]
                    s = summarize(metrics, collection.names)
                    its = [i for fit in fits.values() for i in fit.iterations]
                    rows.append({"weighting": weighting, "tol": tol, "fit_s": round(seconds, 3),
                                 "iterations_mean": round(float(np.mean(its)), 2), "iterations_max": int(max(its)),
                                 "mean_error": round(s["mean_error"], 5), "max_error": round(s["max_error"], 5),
                                 "mean_module_error": round(float(np.mean([x.error.mean() for x in metrics])), 5)})
            entry = {"adapters": len(dirs), "modules": len(factors), "k": rank, "grid": rows}
            if src:
                ref = reference_jd.run_reference(dirs, rank, src=src)
                entry["reference"] = {"fit_s": round(ref.fit_s, 3), "mean_error": round(ref.summary["mean_error"], 5),
                                      "max_error": round(ref.summary["max_error"], 5),
                                      "mean_module_error": round(ref.mean_module_error, 5)}
            out[label] = entry
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stored(fit) -> tuple[list, list, list]:
    """Bases and cores as the bundle stores them (bf16), for the metrics."""
    bf = torch.bfloat16
    return ([u.to(bf).double().numpy() for u in fit.U], [v.to(bf).double().numpy() for v in fit.V],
            [c.to(bf).double().numpy() for c in fit.cores])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=CASES, action="append", help="repeatable; default: both")
    ap.add_argument("--n", type=int, default=100, help="adapters per case")
    ap.add_argument("--layers", type=int, default=32, help="layers per adapter (Mistral-7B: 32)")
    ap.add_argument("--rank", type=int, default=16, help="shared rank k")
    ap.add_argument("--weighting", choices=["equal", "norm"], default=None, help="soppu's (default: its default)")
    ap.add_argument("--tol", type=float, default=None, help="soppu's (default: its default)")
    ap.add_argument("--reference", default=os.environ.get(reference_jd.ENV),
                    help=f"LoRALoLA checkout (default ${reference_jd.ENV}); without it soppu runs alone")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every run (same for both; 1 keeps a shared machine's timings fair)")
    ap.add_argument("--no-fit-timing", action="store_true", help="skip the in-process fit-only comparison")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the synthetic adapters (temp dir)")
    ap.add_argument("--sweep", action="store_true", help="run the defaults study (weighting x tol) instead")
    ap.add_argument("--adapters", type=Path, nargs="+", default=sorted((ROOT / "examples" / "adapters").iterdir()),
                    help="real adapter dirs for --sweep (default: examples/adapters/*)")
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4, 3e-5, 1e-5], help="--sweep grid")
    ap.add_argument("--sweep-n", type=int, default=100, help="--sweep: synthetic adapters per case")
    ap.add_argument("--sweep-layers", type=int, default=2, help="--sweep: synthetic layers per case")
    args = ap.parse_args()
    args.sweep_rank = {"examples": 8}  # the k for the r=8 task adapters
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.reference:
        reference_jd.load_reference(args.reference)  # fail early with its message
        os.environ[reference_jd.ENV] = args.reference
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
               "load_avg_at_start": os.getloadavg()}
    if args.sweep:
        print(json.dumps({"benchmark": "compress-defaults", "machine": machine,
                          "error_definition": "unsquared relative Frobenius norm ||dW - U S V^T||_F / ||dW||_F; "
                                              "mean/max over adapters of the whole-adapter error",
                          "datasets": sweep(args, args.reference)}, indent=2))
        return
    results = [bench_case(case, args, args.reference) for case in args.case or CASES]
    print(json.dumps({
        "benchmark": "compress",
        "shape": {"hidden": HIDDEN, "kv": KV, "layers": args.layers, "modules": list(MODULES), "source_rank": R},
        "reference": "bruel-gabrielsson/LoRALoLA compression.full_lora_pca, 10 iterations" if args.reference else None,
        "error_definition": "unsquared relative Frobenius norm ||dW - U S V^T||_F / ||dW||_F; mean over adapters "
                            "of the whole-adapter error, on stored bf16 values",
        "ratios": "reference / soppu (above 1: soppu faster or smaller)",
        "machine": machine,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
