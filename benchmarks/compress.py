"""Benchmark the compressor end to end on Mistral-7B-shaped synthetic adapters (a script, not a test).

Writes N real PEFT adapter dirs (hidden 4096, kv 1024, 32 layers, q_proj + v_proj, r=16, bf16
safetensors) whose updates share part of their row/column spaces, runs `soppu compress` in a
child process (so peak RSS is the compressor's own), and prints one JSON object: N, k, method,
wall seconds, peak RSS, mean error, mean SVD lower bound, iterations — plus a baseline measured in
the same run: the per-adapter truncated SVD (the lower bound itself) timed on the same factors.

    .venv/bin/python benchmarks/compress.py --n 10 --n 100 --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HIDDEN, KV, LAYERS, R = 4096, 1024, 32, 16
MODULES = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (KV, HIDDEN)}


def write_adapters(root: Path, n: int, seed: int = 0, shared: int = 24) -> list[Path]:
    """N PEFT dirs; each dW_i = B_i A_i mixes a per-module shared subspace with its own directions."""
    g = torch.Generator().manual_seed(seed)
    bases = {}
    for layer in range(LAYERS):
        for name, (d_out, d_in) in MODULES.items():
            bases[(layer, name)] = (torch.randn(d_out, shared, generator=g), torch.randn(d_in, shared, generator=g))
    dirs = []
    for i in range(n):
        d = root / f"adapter{i:04d}"
        d.mkdir(parents=True)
        tensors = {}
        for (layer, name), (Ub, Vb) in bases.items():
            d_out, d_in = MODULES[name]
            mix_b = torch.randn(shared, R, generator=g)
            mix_a = torch.randn(R, shared, generator=g)
            B = (Ub @ mix_b + 0.5 * torch.randn(d_out, R, generator=g)) * 1e-3
            A = (mix_a @ Vb.T + 0.5 * torch.randn(R, d_in, generator=g)) / np.sqrt(d_in)
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = A.to(torch.bfloat16).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = B.to(torch.bfloat16).contiguous()
        save_file(tensors, str(d / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": "mistralai/Mistral-7B-v0.1", "task_type": "CAUSAL_LM", "bias": "none",
            "lora_dropout": 0.0, "fan_in_fan_out": False,
        }
        (d / "adapter_config.json").write_text(json.dumps(config))
        dirs.append(d)
    return dirs


def run_compress(dirs: list[Path], out: Path, rank: int, method: str) -> dict:
    cmd = [sys.executable, "-m", "soppu_client.cli", "compress", *map(str, dirs), "-o", str(out),
           "--rank", str(rank), "--method", method, "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"compress failed:\n{proc.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    payload = json.loads(proc.stdout)
    return {"wall_s": wall, "peak_rss_mb": peak_kib / 1024 if peak_kib > before else None, "payload": payload}


def svd_baseline_seconds(dirs: list[Path], rank: int) -> float:
    """Time of the per-adapter truncated SVD on factors (QR + small SVD), every module, in-process."""
    from soppu_client.adapters import load_collection
    from soppu_client.metrics import svd_tail_sq

    collection = load_collection(dirs, check_values=False)
    t0 = time.perf_counter()
    for module in collection.modules:
        for A, B in collection.module_factors(module):
            svd_tail_sq(A, B, rank)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="number of adapters (repeatable; default 10 and 100)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--method", choices=["full", "diag"], default="full")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the synthetic adapters (temp dir)")
    args = ap.parse_args()
    results = []
    for n in args.n or [10, 100]:
        root = Path(tempfile.mkdtemp(prefix=f"soppu-bench-{n}-", dir=args.workdir))
        try:
            t0 = time.perf_counter()
            dirs = write_adapters(root / "adapters", n)
            write_s = time.perf_counter() - t0
            run = run_compress(dirs, root / "bundle", args.rank, args.method)
            summary = run["payload"]["metrics"]["summary"]
            fit = run["payload"]["fit"]
            baseline = svd_baseline_seconds(dirs, args.rank)
            results.append({
                "N": n, "k": args.rank, "method": args.method,
                "wall_s": round(run["wall_s"], 2), "fit_s": fit["seconds"], "peak_rss_mb": run["peak_rss_mb"],
                "mean_error": summary["mean_error"], "mean_lower_bound": summary["mean_lower_bound"],
                "error_over_bound": summary["mean_error"] / summary["mean_lower_bound"] if summary["mean_lower_bound"] else None,
                "iterations_mean": fit["iterations_mean"], "iterations_max": fit["iterations_max"],
                "all_converged": fit["all_converged"],
                "param_ratio": run["payload"]["metrics"]["sizes"]["param_ratio"],
                "baseline_per_adapter_svd_s": round(baseline, 2),
                "ratio_wall_to_per_adapter_svd": round(run["wall_s"] / baseline, 2) if baseline else None,
                "write_adapters_s": round(write_s, 1),
            })
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({
        "benchmark": "compress",
        "shape": {"hidden": HIDDEN, "kv": KV, "layers": LAYERS, "modules": list(MODULES), "source_rank": R},
        "error_definition": "unsquared relative Frobenius norm ||dW - U S V^T||_F / ||dW||_F",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
