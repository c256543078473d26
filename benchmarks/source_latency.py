"""Cold and warm resolve latency of the serving session against a loopback registry, by bundle size.

"Resolve": one request's ``Session.serve(owner/name)`` (what the vLLM resolver and the LoRAX
source call), from the call until the adapter dir is ready for the engine to load: registry
lookup, key and signature check, rollback check, download, export to the serving form, atomic
rename. Per (bundle size, form):

* ``cold``: the first request of each of ``--samples`` random adapters of the bundle, one after
  another in one process (one session, as an engine holds it), after one warm-up request of
  another adapter of the same bundle: so the manifest, the basis and (compressed form) the
  cluster's served basis are already cached, as they are for every adapter but the first of a
  bundle on a serving host; the warm-up's own time is reported as ``cold_first_ms``. Settings are
  the defaults (``SOPPU_RESOLVE_TTL`` 5 s: the owner's keys are looked up once per 5 s);
* ``warm``: the same adapters again, each a new request, after ``SOPPU_RESOLVE_TTL`` (default 5 s)
  has passed, so each asks the registry again (record and owner keys);
* ``peft_write_ms`` (PEFT rows): writing the expanded adapter file's bytes to a new file and
  fsyncing it, the floor any PEFT materialization pays.

Bundles: ``--bundle-adapters`` sizes, Mistral-7B shapes (``--layers`` 32, q_proj 4096x4096 and
v_proj 1024x4096, k ``--rank`` 16), made by ``soppu compress`` from synthetic rank-``--adapter-rank``
adapters sharing one subspace per module (up to ``--compress-max`` adapters; larger bundles keep
that basis and get random cores, :func:`widen_bundle`), signed, uploaded with ``soppu upload``
(batch publish) to a real ``soppu-registry serve`` on 127.0.0.1. ``--work DIR`` keeps the bundles.

    python benchmarks/source_latency.py --bundle-adapters 10,1000 --json [--samples 30]

Prints one JSON object with ``results`` (one row per bundle size and form: ``adapters``, ``form``,
``cold_p50_ms``, ``cold_p99_ms``, ``warm_p50_ms``, ...) and the issue-20 ratios; never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from safetensors.numpy import save_file

BIN = Path(sys.executable).parent
BASE_MODEL = "mistralai/Mistral-7B-v0.1"
SHAPES = {"q_proj": (4096, 4096), "v_proj": (1024, 4096)}  # (d_out, d_in)
OWNER = "bench"


def run(*args: str, timeout: float | None = None) -> str:
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def make_adapters(root: Path, n: int, layers: int, rank: int, shared: int, seed: int = 0) -> list[Path]:
    """``n`` LoRA adapters of rank ``rank`` whose updates lie in one rank-``shared`` subspace pair per module."""
    rng = np.random.default_rng(seed)
    bases = {(i, m): (np.linalg.qr(rng.standard_normal((d_out, shared)))[0].astype(np.float32),
                      np.linalg.qr(rng.standard_normal((d_in, shared)))[0].T.astype(np.float32).copy())
             for i in range(layers) for m, (d_out, d_in) in SHAPES.items()}
    out = []
    for j in range(n):
        path = root / f"user{j:04d}"
        out.append(path)
        if (path / "adapter_config.json").is_file():
            continue
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for (i, m), (B0, A0) in bases.items():
            prefix = f"base_model.model.model.layers.{i}.self_attn.{m}"
            mix_a = rng.standard_normal((rank, shared)).astype(np.float32) / np.sqrt(shared)
            mix_b = (0.3 * rng.standard_normal((shared, rank))).astype(np.float32)
            tensors[f"{prefix}.lora_A.weight"] = mix_a @ A0
            tensors[f"{prefix}.lora_B.weight"] = B0 @ mix_b
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "base_model_name_or_path": BASE_MODEL, "r": rank, "lora_alpha": rank,
            "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False, "task_type": "CAUSAL_LM",
            "lora_dropout": 0.0, "bias": "none", "layers_to_transform": list(range(layers))}))
    return out


def bundle_for(work: Path, n: int, args: argparse.Namespace) -> tuple[Path, float]:
    """The compressed bundle of ``n`` adapters (made once per ``--work`` dir); (path, seconds to make it).
    Above ``--compress-max`` adapters: the ``--compress-max`` bundle widened (:func:`widen_bundle`)."""
    bundle = work / f"bundle-{n}-L{args.layers}-k{args.rank}"
    if (bundle / "manifest.json").is_file():
        return bundle, 0.0
    t0 = time.perf_counter()
    if n > args.compress_max:
        small, _ = bundle_for(work, args.compress_max, args)
        widen_bundle(small, n, bundle, seed=args.seed)
        return bundle, time.perf_counter() - t0
    adapters = make_adapters(work / f"adapters-{n}-L{args.layers}", n, args.layers, args.adapter_rank, args.rank)
    tmp = bundle.with_name(bundle.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run("soppu", "compress", *map(str, adapters), "-o", str(tmp), "--rank", str(args.rank), "--max-iter",
        str(args.max_iter))
    tmp.rename(bundle)
    if not args.keep_adapters:
        shutil.rmtree(work / f"adapters-{n}-L{args.layers}", ignore_errors=True)
    return bundle, time.perf_counter() - t0


def widen_bundle(small: Path, n: int, out: Path, seed: int = 0) -> Path:
    """A bundle of ``n`` adapters on ``small``'s basis: ``small``'s basis file, manifest fields and
    metrics layout, and ``n`` random cores of its shapes (what is measured is the serving side, not
    the fit; a 1000-adapter ``soppu compress`` at 32 layers takes an hour on a busy 2-core host).
    Checked with ``Bundle.open(verify_digests=True)`` here and by the registry's publish checks."""
    from safetensors import safe_open

    from soppu_client.format.bundle import Bundle
    from soppu_client.format.fsutil import file_digest

    rng = np.random.default_rng(seed)
    manifest = json.loads((small / "manifest.json").read_text())
    metrics = json.loads((small / "metrics.json").read_text())
    template = sorted(manifest["adapters"])[0]
    with safe_open(str(small / manifest["adapters"][template]["core"]), "np") as f:
        shapes = {k: f.get_tensor(k).shape for k in f.keys()}
        meta = f.metadata()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "cores").mkdir(parents=True)
    shutil.copyfile(small / "basis.safetensors", tmp / "basis.safetensors")
    names = [f"user{j:04d}" for j in range(n)]
    files = {k: v for k, v in manifest["files"].items() if not k.startswith("cores/")}
    adapters, summary = {}, {}
    for name in names:
        core = f"cores/{name}.safetensors"
        save_file({k: (0.3 * rng.standard_normal(shape)).astype(np.float32) for k, shape in shapes.items()},
                  str(tmp / core), metadata=meta)
        digest, size = file_digest(tmp / core)
        files[core] = {"sha256": digest, "size": size}
        adapters[name] = {**manifest["adapters"][template], "core": core}
        summary[name] = manifest["metrics"]["summary"]["adapters"][template]
    for module in metrics["modules"]:
        for field in ("error", "lower_bound"):
            if isinstance(module.get(field), dict):
                module[field] = {name: next(iter(module[field].values())) for name in names}
    (tmp / "metrics.json").write_text(json.dumps(metrics, sort_keys=True, separators=(",", ":")))
    digest, size = file_digest(tmp / "metrics.json")
    files["metrics.json"] = {"sha256": digest, "size": size}
    manifest["adapters"], manifest["files"] = adapters, dict(sorted(files.items()))
    manifest["metrics"]["summary"]["adapters"] = summary
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    Bundle.open(tmp, verify_digests=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def start_registry(tmp: Path) -> tuple[subprocess.Popen, str, str, Path, str]:
    data = tmp / "registry"
    run("soppu-registry", "create-owner", "--data", str(data), OWNER)
    key = tmp / "bench.key"
    run("soppu", "keygen", "-o", str(key))
    run("soppu-registry", "register-key", "--data", str(data), "--owner", OWNER, "--public-key", f"{key}.pub")
    write = json.loads(run("soppu-registry", "issue-token", "--data", str(data), "--owner", OWNER,
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


def ms(seconds: list[float], q: float) -> float:
    return round(pct([s * 1e3 for s in seconds], q), 2)


def write_floor(path: Path, scratch: Path) -> float:
    """Seconds to write ``path``'s bytes to a new file and fsync it (the bytes already in memory)."""
    data = path.read_bytes()
    out = scratch / f"floor-{os.getpid()}"
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    out.unlink()
    return dt


def measure(url: str, token: str, names: list[str], cache: Path, form: str, samples: int, seed: int,
            scratch: Path) -> dict[str, Any]:
    from soppu_serving import AdapterRef, Session, Settings

    session = Session(Settings(registry_url=url, cache_dir=cache, serve_format=form, registry_retries=0))
    rng = random.Random(seed)
    first, *rest = rng.sample(names, min(len(names), samples + 1))
    t0 = time.perf_counter()
    session.serve(AdapterRef(OWNER, first), token)
    cold_first = time.perf_counter() - t0
    time.sleep(2.5)  # a serving host's steady state: the bundle's manifest and basis stored a while ago
    cold, warm, floor, requests_, verifications, downloaded = [], [], [], [], [], []
    for name in rest:
        t0 = time.perf_counter()
        served = session.serve(AdapterRef(OWNER, name), token)
        cold.append(time.perf_counter() - t0)
        assert served.stats.materialized and served.stats.blobs_downloaded == [f"cores/{name}.safetensors"], \
            served.stats
        requests_.append(served.stats.registry_requests)
        verifications.append(served.stats.verifications)
        downloaded.append(served.stats.bytes_downloaded)
        if form == "peft":
            floor.append(write_floor(served.path / "adapter_model.safetensors", scratch))
    time.sleep(session.settings.resolve_ttl + 0.5)  # every warm request asks the registry again
    for name in rest:
        t0 = time.perf_counter()
        served = session.serve(AdapterRef(OWNER, name), token)
        warm.append(time.perf_counter() - t0)
        assert served.stats.warm and not served.stats.materialized
    session.close()
    row = {"form": form, "samples": len(rest), "cold_p50_ms": ms(cold, 50), "cold_p99_ms": ms(cold, 99),
           "warm_p50_ms": ms(warm, 50), "warm_p99_ms": ms(warm, 99), "cold_first_ms": round(cold_first * 1e3, 2),
           "registry_requests_per_cold": statistics.median(requests_),
           "verifications_per_request": max(verifications), "core_bytes": int(statistics.median(downloaded))}
    if floor:
        row["peft_write_ms"] = ms(floor, 50)
        row["cold_over_write"] = round(row["cold_p50_ms"] / row["peft_write_ms"], 2)
    return row


def machine() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle-adapters", default="10,1000", help="bundle sizes, comma-separated")
    ap.add_argument("--forms", default="peft,compressed")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16, help="basis rank k")
    ap.add_argument("--adapter-rank", type=int, default=2, help="rank of the synthetic source adapters")
    ap.add_argument("--max-iter", type=int, default=3, help="compress iterations (the fit's quality is not measured)")
    ap.add_argument("--samples", type=int, default=30, help="adapters requested per bundle size and form")
    ap.add_argument("--compress-max", type=int, default=10,
                    help="bundles above this many adapters: that bundle's basis with random cores (widen_bundle)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="dir that keeps the bundles between runs")
    ap.add_argument("--keep-adapters", action="store_true", help="keep the synthetic adapter dirs in --work")
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    args = ap.parse_args()
    sizes = [int(x) for x in args.bundle_adapters.split(",") if x]
    forms = [f for f in args.forms.split(",") if f]
    work = args.work or Path(tempfile.mkdtemp(prefix="soppu-latency-work-"))
    work.mkdir(parents=True, exist_ok=True)
    results, made = [], {}
    with tempfile.TemporaryDirectory(prefix="soppu-latency-") as scratch_dir:
        scratch = Path(scratch_dir)
        for n in sizes:
            bundle, made[n] = bundle_for(work, n, args)
            names = sorted(json.loads((bundle / "manifest.json").read_text())["adapters"])
            tmp = scratch / f"n{n}"
            tmp.mkdir()
            proc, url, serving, key, write = start_registry(tmp)
            try:
                signed = tmp / "bundle"
                shutil.copytree(bundle, signed)
                run("soppu", "sign", str(signed), "--key", str(key), "--owner", OWNER, "--version", "1")
                sig_bytes = (signed / "signature.json").stat().st_size
                t0 = time.perf_counter()
                run("soppu", "upload", str(signed), "--registry", url, "--token", write, "--no-progress",
                    "--retries", "0")
                upload_s = time.perf_counter() - t0
                for form in forms:
                    row = measure(url, serving, names, tmp / f"cache-{form}", form, args.samples, args.seed, scratch)
                    results.append({"adapters": n, **row, "signature_json_bytes": sig_bytes,
                                    "manifest_bytes": (bundle / "manifest.json").stat().st_size,
                                    "upload_s": round(upload_s, 2)})
                    if not args.json:
                        print(json.dumps(results[-1]), file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(10)
    ratios = {}
    for form in forms:
        by = {r["adapters"]: r for r in results if r["form"] == form}
        if len(sizes) > 1 and min(sizes) in by and max(sizes) in by:
            ratios[f"{form}_cold_p50_{max(sizes)}_over_{min(sizes)}"] = round(
                by[max(sizes)]["cold_p50_ms"] / by[min(sizes)]["cold_p50_ms"], 2)
    out = {"benchmark": "source_latency", "config": {k: (str(v) if isinstance(v, Path) else v)
                                                     for k, v in vars(args).items()},
           "shapes": {m: list(s) for m, s in SHAPES.items()}, "bundle_seconds": made, "machine": machine(),
           "results": results, "ratios": ratios}
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
