"""Resolve-to-loadable latency of the LoRAX ``soppu`` source against a loopback registry.

"Resolve-to-loadable": from constructing ``SoppuModelSource("owner/name")`` until
``weight_files()`` returns the PEFT safetensors file LoRAX loads (registry lookup, signature and
digest checks, download, export, atomic rename). Measured for

* one adapter, cold (empty cache) and warm (materialized; a fresh source still asks the registry),
* 100 adapters of one bundle sharing one basis, cold and warm, one after another in one process;
  the basis must be fetched once (asserted from the source's own stats, and reported). Done for
  each serving form (``SOPPU_SERVE_FORMAT``): ``peft`` (a LoRA dir per adapter, what stock LoRAX
  loads) and ``compressed`` (basis + cores, one basis copy on disk, hard-linked), with the bytes
  each form leaves in the cache (hard links counted once) and the bytes LoRAX reads to load all
  adapters (compressed: the basis once + every core).

Everything runs on this machine: a real ``soppu-registry serve`` on 127.0.0.1, a bundle made by
``soppu compress`` from synthetic adapters on SmolLM2-135M shapes, signed and uploaded with the
``soppu`` CLI. Prints one JSON object; never asserts a time.

    python benchmarks/source_latency.py [--adapters 100] [--layers 30] [--rank 8] [--repeats 20]
                                        [--forms peft,compressed]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from safetensors.numpy import save_file

BIN = Path(sys.executable).parent
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHAPES = {"q_proj": (576, 576), "v_proj": (192, 576)}


def run(*args: str) -> str:
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def make_adapters(root: Path, n: int, layers: int, rank: int, seed: int = 0) -> list[Path]:
    """n LoRA adapters whose updates share one rank-`rank` subspace pair per module."""
    rng = np.random.default_rng(seed)
    shared = {(i, m): (np.linalg.qr(rng.standard_normal((d_out, rank)))[0].astype(np.float32),
                       np.linalg.qr(rng.standard_normal((d_in, rank)))[0].T.astype(np.float32).copy())
              for i in range(layers) for m, (d_out, d_in) in SHAPES.items()}
    out = []
    for j in range(n):
        path = root / f"user{j:03d}"
        path.mkdir(parents=True)
        tensors = {}
        for (i, m), (B0, A0) in shared.items():
            prefix = f"base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{prefix}.lora_A.weight"] = A0
            tensors[f"{prefix}.lora_B.weight"] = B0 @ (0.3 * rng.standard_normal((rank, rank))).astype(np.float32)
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "base_model_name_or_path": BASE_MODEL, "r": rank, "lora_alpha": rank,
            "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False, "task_type": "CAUSAL_LM",
            "lora_dropout": 0.0, "bias": "none", "layers_to_transform": list(range(layers))}))
        out.append(path)
    return out


def start_registry(tmp: Path) -> tuple[subprocess.Popen, str, str, Path]:
    data = tmp / "registry"
    run("soppu-registry", "create-owner", "--data", str(data), "bench")
    key = tmp / "bench.key"
    run("soppu", "keygen", "-o", str(key))
    run("soppu-registry", "register-key", "--data", str(data), "--owner", "bench", "--public-key", f"{key}.pub")
    write = json.loads(run("soppu-registry", "issue-token", "--data", str(data), "--owner", "bench",
                           "--scope", "owner-write", "--json"))["token"]
    serving = json.loads(run("soppu-registry", "issue-token", "--data", str(data), "--scope", "serving-read",
                             "--json"))["token"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "registry.log", "ab")
    proc = subprocess.Popen([str(BIN / "soppu-registry"), "serve", "--data", str(data), "--port", str(port),
                             "--rate", "0"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.1)
    else:
        proc.kill()
        sys.exit("registry did not start")
    return proc, url, serving, key, write


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summary(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 3), "p99_ms": round(pct(ms, 99), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "max_ms": round(max(ms), 3)}


def disk_bytes(root: Path, *, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the files under ``root`` with each inode counted once (hard links share one copy)."""
    seen, total = set(), 0
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and not any(part in skip for part in p.relative_to(root).parts):
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--layers", type=int, default=30, help="decoder layers carrying q_proj/v_proj LoRA (SmolLM2: 30)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20, help="cold/warm trials of the single adapter")
    ap.add_argument("--forms", default="peft,compressed", help="serving forms for the shared-basis run")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="soppu-source-bench-"))
    proc = None
    try:
        t0 = time.perf_counter()
        adapters = make_adapters(tmp / "adapters", args.adapters, args.layers, args.rank)
        bundle = tmp / "bundle"
        run("soppu", "compress", *map(str, adapters), "-o", str(bundle), "--rank", str(args.rank), "--max-iter", "30")
        proc, url, serving, key, write = start_registry(tmp)
        run("soppu", "sign", str(bundle), "--key", str(key), "--owner", "bench", "--version", "1")
        run("soppu", "upload", str(bundle), "--registry", url, "--token", write, "--no-progress", "--retries", "0")
        setup_s = time.perf_counter() - t0
        manifest = json.loads((bundle / "manifest.json").read_text())
        basis_bytes = manifest["files"]["basis.safetensors"]["size"]
        core_bytes = manifest["files"][f"cores/{adapters[0].name}.safetensors"]["size"]

        os.environ["SOPPU_REGISTRY_URL"] = url
        from soppu_serving.session import forget_sessions
        from lorax_adapter_source.source import SoppuModelSource

        def load(adapter_id: str, cache: Path, form: str = "peft") -> tuple[float, SoppuModelSource]:
            forget_sessions()  # every trial pays the registry round trip, as a new request does
            start = time.perf_counter()
            src = SoppuModelSource(adapter_id, api_token=serving, cache_dir=cache, form=form)
            try:
                src.weight_files()
            except FileNotFoundError:
                src.download_model_assets()
                src.weight_files()
            return time.perf_counter() - start, src

        one = f"bench/{adapters[0].name}"
        cold1, warm1 = [], []
        for r in range(args.repeats):
            cache = tmp / f"cache-one-{r}"
            dt, _ = load(one, cache)
            cold1.append(dt)
            dt, _ = load(one, cache)
            warm1.append(dt)
            shutil.rmtree(cache)

        naive = args.adapters * (basis_bytes + core_bytes)
        shared = {}
        for form in args.forms.split(","):
            cache = tmp / f"cache-many-{form}"
            cold_many, warm_many = [], []
            downloads: dict[str, int] = {}
            bytes_down = 0
            t_cold = time.perf_counter()
            for a in adapters:
                dt, src = load(f"bench/{a.name}", cache, form)
                cold_many.append(dt)
                for rel in src.last_stats.blobs_downloaded:
                    key_ = "core" if rel.startswith("cores/") else rel
                    downloads[key_] = downloads.get(key_, 0) + 1
                bytes_down += src.last_stats.bytes_downloaded
            cold_total = time.perf_counter() - t_cold
            t_warm = time.perf_counter()
            load_files = set()
            for a in adapters:
                dt, src = load(f"bench/{a.name}", cache, form)
                warm_many.append(dt)
                for f in src.weight_files():
                    st = f.stat()
                    load_files.add((st.st_dev, st.st_ino, st.st_size))
            warm_total = time.perf_counter() - t_warm
            if downloads.get("basis.safetensors") != 1:
                sys.exit(f"{form}: basis was downloaded {downloads.get('basis.safetensors')} times, expected once")
            shared[form] = {
                "cold": {**summary(cold_many), "total_s": round(cold_total, 3)},
                "warm": {**summary(warm_many), "total_s": round(warm_total, 3)},
                "first_adapter_cold_ms": round(cold_many[0] * 1e3, 3),
                "downloads": downloads,
                "bytes_downloaded": bytes_down,
                "bytes_if_basis_per_adapter": naive,
                "download_ratio": round(naive / bytes_down, 2),
                "cache_disk_bytes": disk_bytes(cache, skip=(".locks", ".tmp")),
                "served_dirs_disk_bytes": disk_bytes(cache, skip=(".locks", ".tmp", ".blobs")),
                "weight_bytes_loaded_for_all": sum(size for _, _, size in load_files),
            }
        if {"peft", "compressed"} <= set(shared):
            shared["compressed_vs_peft"] = {
                key: round(shared["peft"][key] / shared["compressed"][key], 2)
                for key in ("served_dirs_disk_bytes", "weight_bytes_loaded_for_all")}

        print(json.dumps({
            "benchmark": "source_latency",
            "what": "SoppuModelSource resolve-to-loadable (registry lookup + verify + download + write the served form)",
            "config": {"adapters": args.adapters, "layers": args.layers, "rank": args.rank, "modules": 2 * args.layers,
                       "repeats": args.repeats, "registry": "soppu-registry serve on 127.0.0.1"},
            "sizes": {"basis_bytes": basis_bytes, "core_bytes": core_bytes},
            "one_adapter": {"cold": summary(cold1), "warm": summary(warm1),
                            "cold_over_warm_p50": round(pct(cold1, 50) / pct(warm1, 50), 2)},
            "shared_basis": shared,
            "setup_s": round(setup_s, 1),
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count()},
        }, indent=2))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
