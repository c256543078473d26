"""Serving cost of shared-basis (compressed) adapters vs uncompressed LoRAs on one projection.

One Mistral-7B-shaped projection (4096 -> 4096), a batch of T tokens spread over N adapters
(popularity distinct or zipf), timed in one run:

    base                 y = x @ W.T
    base+1lora           + one rank-16 LoRA applied to every token (the usual single-adapter cost)
    base+N_lora_ref      + N uncompressed rank-16 LoRAs, reference gather (CPU; GPU with --gpu-reference)
    base+N_lora_bgmv     + N uncompressed LoRAs, Triton BGMV, per token (GPU only)
    base+N_lora_grouped  + N uncompressed LoRAs, grouped per adapter (SGMV-like, what LoRAX uses in
                         prefill): the project's grouped path with one "cluster" per adapter,
                         U = B, V = A.T and diagonal cores of ones (triton on GPU, reference on CPU)
    base+N_soppu_k<k>_<backend>   + N compressed adapters (shared U, V; per-adapter k x k core);
                         backend triton_gemm (route, shrink, core, expand), triton_fused (one
                         launch), triton_fused2 (two launches, h once per token), cuda, reference,
                         or torchgemm: two torch GEMMs around a vectorised torch gather of the cores
                         (cuda_ops.gemm_pipeline), any device. With one cluster no token sort runs
                         (identity routing; exact, since tokens without adapter get a zero core product).

Prints one JSON object: config, machine, per-configuration times (median of repeats after
warm-up, milliseconds) and ratios to "base+1lora", to "uncompressed" (the fastest uncompressed
N-adapter path measured in the same run) and to the grouped baseline; with ``--graphs`` (GPU)
every path except the reference ones is also captured in a CUDA graph and timed by replay
(``graphs`` block of each row, eager figures beside it). No timed path but the reference ones
syncs with the host. ``fused_choice`` compares the fused decode paths with triton_gemm per T, so
``triton_ops.FUSED_MAX_TOKENS`` is set from a measurement. Never asserts a time.

On CPU only the pure-torch paths run (reference gather, grouped reference, torchgemm);
``--graphs`` is accepted and reported as unavailable; ``--quick`` shrinks sizes so it finishes in
under a minute.

    .venv/bin/python benchmarks/serve.py --quick
    python benchmarks/serve.py --graphs          # on a GPU machine: the full grid (PYTHONPATH=kernels)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import soppu_kernels as sk
from soppu_kernels.cuda_ops import gemm_pipeline


def _torch_core(h: torch.Tensor, S: torch.Tensor, adapter_index: torch.Tensor, *, diag: bool) -> torch.Tensor:
    """Vectorised torch per-token core multiply (gather S by index, batched matvec); 0 for index -1."""
    idx = adapter_index.long()
    core = S[idx.clamp_min(0)].float()
    g = core * h if diag else torch.bmm(core, h.unsqueeze(2)).squeeze(2)
    return torch.where((idx >= 0).unsqueeze(1), g, 0.0)


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    else:
        info["device"] = "cpu"
    return info


def _sig(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (fixed decimals would erase sub-microsecond CPU times)."""
    return float(f"{value:.{digits}g}")


def _timer(
    device: torch.device, warmup: int, repeats: int, inner: int = 1
) -> Callable[[dict[str, Callable[[], Any]]], dict[str, tuple[float, float]]]:
    """Returns measure(fns) -> {name: (median_ms, min_ms)} per call.

    Each sample runs a function ``inner`` times back to back and syncs once, so on a GPU the
    sample measures queued kernel time rather than one launch plus one host sync. Repeats are
    interleaved round-robin across the functions, so a burst of load from other processes spreads
    over all of them instead of skewing one.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(fns: dict[str, Callable[[], Any]]) -> dict[str, tuple[float, float]]:
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        sync()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3 / inner)
        return {name: (statistics.median(v), min(v)) for name, v in times.items()}

    return measure


def _indices(T: int, N: int, popularity: str, gen: torch.Generator) -> torch.Tensor:
    if popularity == "distinct":
        return torch.arange(T) % N
    if popularity == "zipf":
        p = 1.0 / torch.arange(1, N + 1, dtype=torch.float64) ** 1.1
        return torch.multinomial(p, T, replacement=True, generator=gen)
    raise ValueError(f"`popularity` must be 'distinct' or 'zipf', got {popularity!r}")


def _capture(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(device)
    return graph.replay


def _figures(timed: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """times, min times and the three ratios of one row, for one timing mode."""
    times = {key: med for key, (med, _) in timed.items()}
    t_one = times["base+1lora"]
    unc = [v for key, v in times.items() if key.startswith("base+N_lora")]
    out: dict[str, Any] = {
        "times_ms": {key: _sig(v) for key, v in times.items()},
        "min_ms": {key: _sig(mn) for key, (_, mn) in timed.items()},
        "ratio_to_one_lora": {key: round(v / t_one, 3) for key, v in times.items()},
    }
    if unc:
        out["ratio_to_uncompressed"] = {
            key: round(v / min(unc), 3) for key, v in times.items() if key.startswith("base+N_")
        }
    if "base+N_lora_grouped" in times:
        t_grp = times["base+N_lora_grouped"]
        out["ratio_to_grouped"] = {
            key: round(v / t_grp, 3) for key, v in times.items() if key.startswith("base+N_")
        }
    return out


#: Timed only for T up to this (the fused paths are for decode batches; above, they only lose).
FUSED_TIMED_MAX_TOKENS = 256


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    graphs = bool(args.graphs and on_gpu)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if on_gpu else "fp32")
    ]
    d = args.hidden
    measure = _timer(device, args.warmup, args.repeats, args.inner)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    W = rnd(d, d, scale=d**-0.5)
    N_max = max(args.adapters)
    A_all = rnd(N_max, args.lora_rank, d, scale=d**-0.5)  # lora_A
    B_all = rnd(N_max, d, args.lora_rank, scale=args.lora_rank**-0.5)  # lora_B (scaling folded in)
    # The grouped (SGMV-like) baseline through the project's grouped path: one basis per adapter.
    grouped_V = A_all.transpose(1, 2).contiguous()  # [N, d, r] = A.T
    grouped_S = torch.ones(N_max, args.lora_rank, device=device)  # diagonal cores of ones
    bases = {
        k: (
            rnd(args.clusters, d, k, scale=k**-0.5),  # U
            rnd(args.clusters, d, k, scale=d**-0.5),  # V
            (torch.randn(N_max, k, k, generator=gen) * k**-0.5).to(device),  # S, float32 as in bundles
        )
        for k in args.ranks
    }
    if on_gpu:
        compressed_backends = ["triton_gemm", "triton_fused", "triton_fused2", "cuda", "torchgemm"]
        if args.gpu_reference:
            compressed_backends.insert(0, "reference")
    else:
        compressed_backends = ["reference", "torchgemm"]
    setup_errors: dict[str, str] = {}
    if "cuda" in compressed_backends:  # build the extension once: one failure, not one per row
        from soppu_kernels import cuda_ops

        t0 = time.perf_counter()
        try:
            cuda_ops.load_extension()
            ext_build_s = round(time.perf_counter() - t0, 1)
        except Exception as e:  # noqa: BLE001 - reported, the other paths still run
            setup_errors["cuda_extension"] = f"{type(e).__name__}: {e}"[-1000:]
            compressed_backends.remove("cuda")
            ext_build_s = None
    else:
        ext_build_s = None
    grouped_backend = "triton" if on_gpu else "reference"

    results = []
    for T in args.tokens:
        x = rnd(T, d)
        y = torch.empty(T, d, device=device, dtype=dtype)

        def base() -> None:
            torch.matmul(x, W.T, out=y)

        def base_one_lora() -> None:
            torch.matmul(x, W.T, out=y)
            y.add_((x @ A_all[0].T) @ B_all[0].T)

        for N in args.adapters:
            for pop in args.popularity:
                idx = _indices(T, N, pop, gen).to(device=device, dtype=torch.int32)
                coa = None if args.clusters == 1 else (torch.arange(N) % args.clusters).to(
                    device=device, dtype=torch.int32)
                A, B = A_all[:N], B_all[:N]
                fns: dict[str, Callable[[], Any]] = {"base": base, "base+1lora": base_one_lora}
                no_graph = set()  # reference paths: they sync with the host

                def dense(backend: str, A: torch.Tensor = A, B: torch.Tensor = B,
                          idx: torch.Tensor = idx) -> Callable[[], None]:
                    def fn() -> None:
                        torch.matmul(x, W.T, out=y)
                        sk.dense_lora(y, x, A, B, idx, backend=backend)

                    return fn

                if not on_gpu or args.gpu_reference:
                    fns["base+N_lora_ref"] = dense("reference")
                    no_graph.add("base+N_lora_ref")
                if on_gpu:
                    fns["base+N_lora_bgmv"] = dense("triton")
                grp_ids = torch.arange(N, device=device, dtype=torch.int32)

                def grouped(U: torch.Tensor = B, V: torch.Tensor = grouped_V[:N],
                            S: torch.Tensor = grouped_S[:N], idx: torch.Tensor = idx,
                            coa: torch.Tensor = grp_ids) -> None:
                    torch.matmul(x, W.T, out=y)
                    sk.shared_basis_lora(y, x, U, V, S, idx, coa, diag=True, backend=grouped_backend,
                                         path="gemm" if grouped_backend == "triton" else "auto")

                fns["base+N_lora_grouped"] = grouped
                if grouped_backend == "reference":
                    no_graph.add("base+N_lora_grouped")
                errors: dict[str, str] = {}
                for k, (U, V, S_all) in bases.items():
                    for backend in compressed_backends:
                        if backend.startswith("triton_fused") and T > FUSED_TIMED_MAX_TOKENS:
                            continue

                        def ours(backend: str = backend, U: torch.Tensor = U, V: torch.Tensor = V,
                                 S: torch.Tensor = S_all[:N], idx: torch.Tensor = idx,
                                 coa: torch.Tensor | None = coa) -> None:
                            torch.matmul(x, W.T, out=y)
                            if backend == "torchgemm":
                                gemm_pipeline(y, x, U, V, S, idx, coa, diag=False, core_fn=_torch_core)
                            elif backend == "triton_fused2":
                                from soppu_kernels.triton_ops import shared_basis_lora_fused as triton_fused

                                triton_fused(y, x, U, V, S, idx, coa, diag=False, shared_h=True)
                            elif backend.startswith("triton_"):
                                sk.shared_basis_lora(y, x, U, V, S, idx, coa, diag=False, backend="triton",
                                                     path=backend.removeprefix("triton_"))
                            else:
                                sk.shared_basis_lora(y, x, U, V, S, idx, coa, diag=False, backend=backend)

                        key = f"base+N_soppu_k{k}_{backend}"
                        try:  # a path that fails here is reported, the others still run
                            ours()
                            fns[key] = ours
                            if backend == "reference":
                                no_graph.add(key)
                        except Exception as e:  # noqa: BLE001
                            errors[key] = f"{type(e).__name__}: {e}"[:300]
                row: dict[str, Any] = {
                    "tokens": T,
                    "adapters": N,
                    "popularity": pop,
                    "distinct_adapters_in_batch": int(torch.unique(idx).numel()),
                    **_figures(measure(fns)),
                }
                if graphs:
                    replays: dict[str, Callable[[], Any]] = {}
                    for key, fn in fns.items():
                        if key in no_graph:
                            continue
                        try:
                            replays[key] = _capture(fn, device)
                        except Exception as e:  # noqa: BLE001
                            errors[f"graph:{key}"] = f"{type(e).__name__}: {e}"[:300]
                    if "base+1lora" in replays:
                        row["graphs"] = _figures(measure(replays))
                    del replays
                if errors:
                    row["errors"] = errors
                results.append(row)
                print(f"done T={T} N={N} {pop}", file=sys.stderr)

    targets = _targets(results, max(args.adapters), on_gpu)
    esize = torch.finfo(dtype).bits // 8
    storage = {
        f"uncompressed_N{N}_bytes": N * 2 * args.lora_rank * d * esize for N in args.adapters
    } | {
        f"soppu_k{k}_N{N}_bytes": args.clusters * 2 * d * k * esize + N * k * k * 4
        for k in args.ranks
        for N in args.adapters
    }
    return {
        "benchmark": "serve",
        "config": {
            "projection": f"{d}x{d} (Mistral-7B q_proj/o_proj shape)" if d == 4096 else f"{d}x{d}",
            "hidden": d,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "tokens": args.tokens,
            "adapters": args.adapters,
            "popularity": args.popularity,
            "lora_rank": args.lora_rank,
            "ranks_k": args.ranks,
            "cores": "full (k x k, float32)",
            "clusters": args.clusters,
            "routing": "identity (no sort)" if args.clusters == 1 else "sorted by cluster",
            "warmup": args.warmup,
            "repeats": args.repeats,
            "timing": "times_ms: median wall time per call (ms; each repeat runs `inner` calls, then one "
            "device sync), repeats interleaved across the row's paths; min_ms: the fastest repeat; "
            "graphs: the same for CUDA-graph replays of each path (reference paths excluded)",
            "inner": args.inner,
            "torch_threads": torch.get_num_threads(),
            "quick": args.quick,
            "graphs": graphs if on_gpu else ("unavailable on cpu" if args.graphs else False),
            "compressed_backends": compressed_backends,
            "grouped_backend": grouped_backend,
            "fused_timed_max_tokens": FUSED_TIMED_MAX_TOKENS,
            "cuda_extension_build_s": ext_build_s,
        },
        "machine": _machine(device),
        "storage": storage,
        **({"setup_errors": setup_errors} if setup_errors else {}),
        "targets": targets,
        "fused_choice": _fused_choice(results, max(args.adapters), graphs),
        "results": results,
        "notes": [
            "ratio_to_uncompressed divides by the fastest uncompressed N-adapter path of the same row; "
            "ratio_to_grouped by the grouped (SGMV-like) per-adapter LoRA",
            "CPU runs time only pure-torch paths (reference, torchgemm): they show the algorithmic "
            "cost, not kernel speed; real timings need a GPU. On a shared machine compare min_ms too",
        ],
    }


TARGET_THROUGHPUT_VS_ONE_LORA = 0.95  # issue #5, on an H100 at N=1000
TARGET_SPEEDUP_VS_UNCOMPRESSED = 2.0


def _target_row(fig: dict[str, Any]) -> dict[str, Any] | None:
    t = fig["times_ms"]
    ours = {k: v for k, v in t.items() if k.startswith("base+N_soppu")}
    unc = [v for k, v in t.items() if k.startswith("base+N_lora")]
    if not ours or not unc:
        return None
    best = min(ours, key=ours.get)
    thr = t["base+1lora"] / ours[best]
    spd = min(unc) / ours[best]
    out = {"fastest_compressed": best, "throughput_vs_one_lora": round(thr, 3),
           "speedup_vs_uncompressed": round(spd, 3),
           "meets": thr >= TARGET_THROUGHPUT_VS_ONE_LORA and spd >= TARGET_SPEEDUP_VS_UNCOMPRESSED}
    if "base+N_lora_grouped" in t:
        out["speedup_vs_grouped"] = round(t["base+N_lora_grouped"] / ours[best], 3)
    return out


def _targets(results: list[dict[str, Any]], n_max: int, on_gpu: bool) -> dict[str, Any]:
    """The issue's H100 targets at N = ``n_max``, per row and timing mode (eager; graphs when
    measured), for the fastest compressed path: throughput vs base + one LoRA (t_one / t_ours,
    target >= 0.95), speedup over the fastest uncompressed N-adapter path (t_uncompressed /
    t_ours, target >= 2) and over the grouped baseline (t_grouped / t_ours)."""
    rows = []
    for r in results:
        if r["adapters"] != n_max:
            continue
        for mode, fig in (("eager", r), ("graphs", r.get("graphs"))):
            if fig is None:
                continue
            tr = _target_row(fig)
            if tr is not None:
                rows.append({"tokens": r["tokens"], "popularity": r["popularity"], "timing": mode, **tr})
    return {
        "adapters": n_max,
        "throughput_vs_one_lora_min": TARGET_THROUGHPUT_VS_ONE_LORA,
        "speedup_vs_uncompressed_min": TARGET_SPEEDUP_VS_UNCOMPRESSED,
        "applies": on_gpu,
        "note": "targets are for an H100; on CPU these rows compare pure-torch paths only" if not on_gpu else
                "device named in machine.device",
        "rows": rows,
    }


def _fused_choice(results: list[dict[str, Any]], n_max: int, graphs: bool) -> dict[str, Any]:
    """Per T at N = n_max: the fastest fused decode path vs triton_gemm (graph times when measured),
    and the largest T where fused wins: the measured value for ``FUSED_MAX_TOKENS``."""
    mode = "graphs" if graphs else "eager"
    per_t: dict[int, list[float]] = {}
    for r in results:
        fig = r.get("graphs") if graphs else r
        if r["adapters"] != n_max or fig is None:
            continue
        t = fig["times_ms"]
        for gemm_key in (k for k in t if k.endswith("_triton_gemm")):
            stem = gemm_key.removesuffix("_triton_gemm")
            fused = [t[f"{stem}_{p}"] for p in ("triton_fused", "triton_fused2") if f"{stem}_{p}" in t]
            if fused:
                per_t.setdefault(r["tokens"], []).append(min(fused) / t[gemm_key])
    ratios = {T: round(statistics.median(v), 3) for T, v in sorted(per_t.items())}
    wins = [T for T, v in ratios.items() if v < 1.0]
    return {
        "timing": mode,
        "fused_over_gemm_median_ratio": ratios,
        "suggested_fused_max_tokens": max(wins) if wins else (0 if ratios else None),
        "current_fused_max_tokens": _current_fused_max_tokens(),
    }


def _current_fused_max_tokens() -> int | None:
    try:  # imports Triton: only where it is installed
        from soppu_kernels.triton_ops import FUSED_MAX_TOKENS
    except ImportError:
        return None
    return FUSED_MAX_TOKENS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: < 1 min on CPU")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--hidden", type=int, default=None, help="projection size (default 4096)")
    p.add_argument("--tokens", type=int, nargs="+", default=None)
    p.add_argument("--adapters", type=int, nargs="+", default=None)
    p.add_argument("--popularity", nargs="+", default=["distinct", "zipf"])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32], help="compressed ranks k")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--clusters", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--inner", type=int, default=None,
                   help="calls per timed sample before one device sync (default 20 on GPU, 1 on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on CPU, for steadier timings on shared machines)")
    p.add_argument("--gpu-reference", action="store_true",
                   help="on GPU also time the reference paths (dense and compressed; slow, not in the grid)")
    p.add_argument("--graphs", action="store_true",
                   help="GPU: also time every non-reference path as a CUDA-graph replay (eager beside it)")
    a = p.parse_args(argv)
    quick = a.quick
    a.hidden = a.hidden or (1024 if quick else 4096)
    a.tokens = a.tokens or ([1, 16, 64] if quick else [1, 16, 64, 256, 1024])
    a.adapters = a.adapters or ([1, 10, 100] if quick else [1, 10, 100, 1000])
    a.warmup = a.warmup if a.warmup is not None else (2 if quick else 3)
    a.repeats = a.repeats if a.repeats is not None else (15 if quick else 10)
    on_cpu = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    a.threads = a.threads if a.threads is not None else (1 if on_cpu else None)
    a.inner = a.inner if a.inner is not None else (1 if on_cpu else 20)
    return a


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
