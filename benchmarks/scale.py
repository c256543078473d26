"""The 1000-adapter path, measured end to end (a script, not a test; prints one JSON object).

1. compress: N synthetic Mistral-7B-shaped r=16 adapters (q_proj [4096x4096], v_proj [1024x4096],
   written by ``benchmarks/compress.py``'s ``write_adapters``) with ``soppu compress --clusters C``
   for each C, in a child process: wall time, peak RSS (that child's own, from wait4), mean error
   (unsquared relative Frobenius norm ||dW - U S V^T||_F / ||dW||_F) and the fit's iterations;
2. publish: the first C's bundle is signed and uploaded to a fresh registry per path and backend:
   ``batch`` (RegistryClient.upload_bundle: HEAD + parallel PUT of blobs, then ONE
   PUT /v1/bundles/{owner}/versions/{v}) against ``per_adapter`` (the same blobs, then one
   PUT /v1/adapters/{owner}/{name}/versions/{v} per adapter, the old path), in the same run:
   wall time, requests (counted on the client's session), and their ratios;
3. resolve: R random adapters through the serving side (``soppu_serving.materialize`` with a
   Settings pointing at the batch registry), cold (empty cache) then warm: p50/p99.

Backends (``--backends``): ``sqlite+dir``, and ``postgres+s3`` on a throwaway PostgreSQL + SeaweedFS
started by ``soppu_registry.devservices`` (recorded as skipped, with the reason, where they cannot
start). Registries are real ``soppu-registry serve`` children on 127.0.0.1 (rate limiting off), a
fresh one (data dir, or database + bucket) per path.

    .venv/bin/python benchmarks/scale.py --quick                       # N=50, 2 layers, smoke run
    nice -n 10 .venv/bin/python benchmarks/scale.py --n 1000 --clusters 25 --layers 32 --out scale.json
    .venv/bin/python benchmarks/scale.py --bundle DIR --backends postgres+s3   # publish + resolve only
"""

from __future__ import annotations

import argparse
import importlib.util
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
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OWNER = "bench"


def _load_compress_bench() -> Any:
    """benchmarks/compress.py as a module (its ``write_adapters`` is reused, not copied)."""
    spec = importlib.util.spec_from_file_location("soppu_bench_compress", ROOT / "benchmarks" / "compress.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _cli(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:3])} ... failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc.stdout


def _ms_summary(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "mean_ms": round(float(ms.mean()), 3),
            "max_ms": round(float(ms.max()), 3)}


def machine() -> dict[str, Any]:
    mem = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
           if line.split(":")[0] in ("MemTotal", "MemAvailable")}
    return {"cpus": os.cpu_count(), "ram_gb": round(mem["MemTotal"] / 2**20, 1),
            "ram_available_gb_at_start": round(mem["MemAvailable"] / 2**20, 1),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "disk_free_gb_at_start": round(shutil.disk_usage(tempfile.gettempdir()).free / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version()}


# --------------------------------------------------------------------------- 1. compress


def compress(dirs: list[Path], out: Path, *, rank: int, clusters: int, max_iter: int, threads: int) -> dict[str, Any]:
    """`soppu compress` in a child; its own peak RSS from wait4 (not the max over all children).
    ``threads`` > 0 sets OMP_NUM_THREADS / MKL_NUM_THREADS for it (0: torch's default)."""
    env = dict(os.environ)
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "soppu_client.cli", "compress", *map(str, dirs), "-o", str(out), "--rank", str(rank),
           "--clusters", str(clusters), "--max-iter", str(max_iter), "--json"]
    log_out, log_err = out.with_suffix(".stdout"), out.with_suffix(".stderr")
    t0 = time.perf_counter()
    with open(log_out, "wb") as so, open(log_err, "wb") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"soppu compress --clusters {clusters} failed:\n{log_err.read_text()[-3000:]}")
    payload = json.loads(log_out.read_text())
    summary, fit = payload["metrics"]["summary"], payload["fit"]
    return {"clusters": clusters, "wall_s": round(wall, 1), "fit_s": fit["seconds"],
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "mean_error": summary["mean_error"],
            "max_error": summary.get("max_error"), "mean_lower_bound": summary["mean_lower_bound"],
            "iterations_mean": fit["iterations_mean"], "iterations_max": fit["iterations_max"],
            "all_converged": fit["all_converged"], "param_ratio": payload["metrics"]["sizes"]["param_ratio"],
            "bundle_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}


# --------------------------------------------------------------------------- 2. registries


class CountingSession(requests.Session):
    """A requests session that counts requests per (method, route kind) and notes when the first
    publish request started (thread-safe: the client uploads blobs from several threads)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.first_publish: float | None = None
        self._lock = threading.Lock()

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kind = "blob" if "/v1/blobs/" in url else "bundle" if "/v1/bundles/" in url else "adapter" \
            if "/v1/adapters/" in url else "other"
        with self._lock:
            self.counts[f"{method} {kind}"] += 1
            if method == "PUT" and kind in ("bundle", "adapter") and self.first_publish is None:
                self.first_publish = time.perf_counter()
        return super().request(method, url, *args, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """A fresh `soppu-registry serve` with owner ``bench``, its key and tokens: ``sqlite+dir`` (a data
    dir) or, given a ``location`` (a fresh PostgreSQL database + S3 bucket), ``postgres+s3``."""

    def __init__(self, root: Path, pub_key: Path, location: Any = None):
        self.root, self.backend = root, "postgres+s3" if location is not None else "sqlite+dir"
        self.storage = ["--data", str(root / "data"), *(location.args() if location is not None else [])]
        _cli("soppu-registry", "create-owner", *self.storage, OWNER)
        _cli("soppu-registry", "register-key", *self.storage, "--owner", OWNER, "--public-key", str(pub_key))
        self.write_token = json.loads(_cli("soppu-registry", "issue-token", *self.storage, "--owner", OWNER,
                                           "--scope", "owner-write", "--json"))["token"]
        self.serving_token = json.loads(_cli("soppu-registry", "issue-token", *self.storage,
                                             "--scope", "serving-read", "--json"))["token"]
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Registry:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115  (the server writes it)
        self.proc = subprocess.Popen(
            [str(BIN / "soppu-registry"), "serve", *self.storage, "--port", self.url.rsplit(":", 1)[1],
             "--rate", "0", "--max-publish-bytes", str(64 << 20), "--max-unpublished-bytes", "0",
             "--max-blob-bytes", str(8 << 30)], stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"registry exited with {self.proc.returncode}; see {log.name}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise SystemExit("registry did not start within 60 s")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_postgres_s3(root: Path) -> tuple[Any, str | None]:
    """(services, None) with a throwaway PostgreSQL + SeaweedFS running (soppu_registry.devservices;
    the S3 credentials exported to this process and its children), or (None, why not)."""
    help_text = subprocess.run([str(BIN / "soppu-registry"), "serve", "--help"], capture_output=True, text=True).stdout
    if "--database" not in help_text:
        return None, "backend not available: `soppu-registry serve` has no --database option in this tree"
    try:
        from soppu_registry.devservices import Services, ServiceError
    except ImportError as e:
        return None, f"backend not available: soppu_registry.devservices cannot be imported ({e})"
    try:
        return Services(root).start(), None
    except (ServiceError, OSError, subprocess.SubprocessError) as e:
        return None, f"backend not available: PostgreSQL/SeaweedFS did not start: {str(e)[:500]}"


def _upload_blobs(client: Any, bundle: Path, files: list[dict[str, Any]], jobs: int) -> None:
    """The blob half of the upload, as upload_bundle does it: HEAD each, PUT the missing (``jobs`` at once)."""
    missing = [f for f in files if not client.has_blob(f["sha256"])]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda f: client.put_blob(bundle / f["path"], f["sha256"], f["size"]), missing))


def publish_paths(bundle: Path, pub_key: Path, root: Path, *, jobs: int, per_adapter_limit: int | None,
                  resolve: int, seed: int, services: Any = None) -> dict[str, Any]:
    """Batch vs per-adapter publish on two fresh registries (``services``: postgres+s3, each with a
    fresh database and bucket; None: sqlite+dir); then resolve through the batch one."""
    from soppu_client.format import signing
    from soppu_client.registry_client import RegistryClient

    doc = signing.read_signature(bundle)
    st = doc["statement"]
    names, files = list(st["adapters"]), st["files"]
    def location(label: str) -> Any:
        return services.fresh(label) if services is not None else None

    out: dict[str, Any] = {"backend": "postgres+s3" if services else "sqlite+dir", "adapters": len(names), "files": len(files),
                           "bytes": sum(f["size"] for f in files), "signature_doc_bytes": len(json.dumps(doc))}

    with Registry(root / "reg-per-adapter", pub_key, location("per-adapter")) as reg:
        session = CountingSession()
        client = RegistryClient(reg.url, reg.write_token, session=session, retries=0)
        t0 = time.perf_counter()
        _upload_blobs(client, bundle, files, jobs)
        t_blobs = time.perf_counter()
        todo = names if per_adapter_limit is None else names[:per_adapter_limit]
        for name in todo:
            status, _ = client.publish(OWNER, name, st["version"], doc)
            assert status == 201, (name, status)
        end = time.perf_counter()
        publish_s = end - t_blobs
        per = {"requests": sum(session.counts.values()), "requests_by_kind": dict(session.counts),
               "blobs_s": round(t_blobs - t0, 2), "publish_s": round(publish_s, 2), "wall_s": round(end - t0, 2),
               "publishes_measured": len(todo)}
        if len(todo) < len(names):  # each request carries and checks the whole statement: cost per publish is flat
            scale = len(names) / len(todo)
            per.update(extrapolated=True, publish_s_extrapolated=round(publish_s * scale, 2),
                       wall_s_extrapolated=round(t_blobs - t0 + publish_s * scale, 2),
                       requests_extrapolated=per["requests"] + len(names) - len(todo))
        out["per_adapter"] = per

    with Registry(root / "reg-batch", pub_key, location("batch")) as reg:
        session = CountingSession()
        client = RegistryClient(reg.url, reg.write_token, session=session, retries=0)
        t0 = time.perf_counter()
        result = client.upload_bundle(bundle, jobs=jobs)
        end = time.perf_counter()
        assert sorted(result.adapters) == sorted(names) and set(result.adapters.values()) == {"created"}
        assert session.first_publish is not None
        out["batch"] = {"requests": sum(session.counts.values()), "requests_by_kind": dict(session.counts),
                        "blobs_s": round(session.first_publish - t0, 2), "publish_s": round(end - session.first_publish, 2),
                        "wall_s": round(end - t0, 2), "jobs": jobs}
        per, batch = out["per_adapter"], out["batch"]
        per_wall = per.get("wall_s_extrapolated", per["wall_s"])
        per_pub = per.get("publish_s_extrapolated", per["publish_s"])
        per_req = per.get("requests_extrapolated", per["requests"])
        out["ratios"] = {"wall_per_adapter_over_batch": round(per_wall / batch["wall_s"], 2),
                         "publish_per_adapter_over_batch": round(per_pub / max(batch["publish_s"], 1e-6), 1),
                         "requests_per_adapter_over_batch": round(per_req / batch["requests"], 2)}
        out["resolve"] = resolve_latency(reg.url, reg.serving_token, names, root / "serving-cache", resolve, seed)
    return out


# --------------------------------------------------------------------------- 3. resolve


def resolve_latency(url: str, token: str, names: list[str], cache_dir: Path, count: int, seed: int) -> dict[str, Any]:
    """``materialize`` R random adapters cold (empty cache: lookup, verify, download, PEFT export),
    then warm (cached dir; lookup and signature still checked), each as a new request."""
    from soppu_client.format.refs import AdapterRef
    from soppu_serving.session import Session
    from soppu_serving.settings import Settings

    settings = Settings(registry_url=url, cache_dir=cache_dir, registry_retries=0)
    session = Session(settings)  # one per process, as an engine holds it
    picked = random.Random(seed).sample(names, min(count, len(names)))
    timings: dict[str, list[float]] = {"cold": [], "warm": []}
    bytes_down = 0
    for phase in ("cold", "warm"):
        for name in picked:
            session.forget()  # every resolve pays the registry round trip, as a new request does
            t0 = time.perf_counter()
            stats = session.serve(AdapterRef(OWNER, name), token).stats
            timings[phase].append(time.perf_counter() - t0)
            assert (phase == "cold") == stats.materialized, (phase, name)
            bytes_down += stats.bytes_downloaded
    return {"adapters": len(picked), "form": settings.serve_format, "cold": _ms_summary(timings["cold"]),
            "cold_first_ms": round(timings["cold"][0] * 1e3, 1),
            "cold_without_first": _ms_summary(timings["cold"][1:]) if len(picked) > 1 else None,
            "warm": _ms_summary(timings["warm"]), "bytes_downloaded": bytes_down,
            "cold_over_warm_p50": round(statistics.median(timings["cold"]) / statistics.median(timings["warm"]), 2)}


# --------------------------------------------------------------------------- main


def publish_all(args: argparse.Namespace, bundle: Path, pub_key: Path, tmp: Path, resolve: int) -> dict[str, Any]:
    """publish_paths on every backend of ``--backends`` (postgres+s3: recorded as skipped if it cannot start)."""
    common = dict(jobs=args.jobs, per_adapter_limit=args.per_adapter_limit, resolve=resolve, seed=args.seed)
    publish: dict[str, Any] = {}
    if "sqlite+dir" in args.backends:
        publish["sqlite+dir"] = publish_paths(bundle, pub_key, tmp / "sqlite+dir", **common)
    if "postgres+s3" in args.backends:
        services, why = start_postgres_s3(tmp / "services")
        if services is None:
            publish["postgres+s3"] = {"skipped": why}
        else:
            try:
                publish["postgres+s3"] = publish_paths(bundle, pub_key, tmp / "postgres+s3", services=services, **common)
            finally:
                services.stop()
    return publish


def publish_only(args: argparse.Namespace, tmp: Path, resolve: int) -> None:
    """``--bundle``: the publish and resolve half on an existing signed bundle; prints its JSON."""
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    n = len(manifest["adapters"])
    result = {"benchmark": "scale", "part": "publish+resolve of an existing bundle (--bundle)", "machine": machine(),
              "config": {"N": n, "bundle": str(args.bundle), "clusters": manifest["clusters"],
                         "modules": len(manifest["modules"]), "jobs": args.jobs,
                         "per_adapter_limit": args.per_adapter_limit, "backends": args.backends},
              "publish": publish_all(args, args.bundle, args.bundle.parent / "bench.key.pub", tmp, min(resolve, n))}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="adapters (default 1000; --quick: 50)")
    ap.add_argument("--clusters", type=int, action="append",
                    help="cluster counts to compress with, repeatable; the first one's bundle is uploaded "
                         "(default 25, 10, 1; --quick: 4, 1)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers with q_proj/v_proj (default 32; --quick: 2)")
    ap.add_argument("--rank", type=int, default=16, help="shared rank k (the adapters have r=16)")
    ap.add_argument("--max-iter", type=int, default=200, help="JD-Full iteration cap per module")
    ap.add_argument("--resolve", type=int, default=100, help="random adapters resolved cold and warm (--quick: 10)")
    ap.add_argument("--jobs", type=int, default=4, help="parallel blob uploads")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP/MKL threads of the compress child (0: torch's default). On a machine whose cores are "
                         "busy with other work, 1 avoids OpenMP oversubscription, which slows small QR/SVD calls "
                         "~100x there")
    ap.add_argument("--per-adapter-limit", type=int, default=None,
                    help="publish only this many adapters one by one and extrapolate (each request carries the whole "
                         "statement, so the cost per publish does not depend on how many were measured)")
    ap.add_argument("--backends", default="sqlite+dir,postgres+s3",
                    help="registry backends to publish to and resolve from, comma-separated (postgres+s3 needs "
                         "PostgreSQL 15 binaries and SeaweedFS; recorded as skipped, with the reason, if absent)")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=50, 2 layers, clusters 4 and 1, 10 resolves")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="publish and resolve this already signed bundle (owner `bench`, its key at "
                         "DIR/../bench.key.pub) instead of writing and compressing adapters")
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir (adapters, bundles, registries)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.n or (50 if args.quick else 1000)
    layers = args.layers or (2 if args.quick else 32)
    clusters = args.clusters or ([4, 1] if args.quick else [25, 10, 1])
    resolve = min(args.resolve if not args.quick or args.resolve != 100 else 10, n)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not set(args.backends) <= {"sqlite+dir", "postgres+s3"}:
        ap.error(f"--backends: unknown backend in {args.backends}; use sqlite+dir and/or postgres+s3")
    if args.bundle is not None:
        missing = [str(f) for f in (args.bundle / "manifest.json", args.bundle / "signature.json",
                                    args.bundle.parent / "bench.key.pub") if not f.is_file()]
        if missing:
            ap.error(f"--bundle {args.bundle}: missing {', '.join(missing)}; pass a bundle signed for owner `bench` "
                     "whose public key is bench.key.pub next to it (a run with --keep leaves one)")
    if n < 2 or layers < 1 or any(c < 1 for c in clusters) or resolve < 1:
        ap.error("--n must be >= 2, --layers, --clusters and --resolve >= 1")

    info = machine()
    bench = _load_compress_bench()
    bench.LAYERS = layers  # write_adapters reads the module's LAYERS when called
    tmp = Path(tempfile.mkdtemp(prefix="soppu-scale-", dir=args.workdir))
    started = time.perf_counter()
    try:
        if args.bundle is not None:
            publish_only(args, tmp, resolve)
            return
        t0 = time.perf_counter()
        dirs = bench.write_adapters(tmp / "adapters", n, seed=args.seed)
        write_s = time.perf_counter() - t0
        adapter_bytes = sum(d.joinpath("adapter_model.safetensors").stat().st_size for d in dirs)
        print(f"wrote {n} adapters x {layers} layers ({adapter_bytes / 2**30:.2f} GiB) in {write_s:.0f} s",
              file=sys.stderr)

        runs, uploaded = [], None
        for c in clusters:
            out = tmp / f"bundle-c{c}"
            row = compress(dirs, out, rank=args.rank, clusters=c, max_iter=args.max_iter, threads=args.threads)
            runs.append(row)
            print(f"compress C={c}: {json.dumps(row)}", file=sys.stderr)
            if uploaded is None:
                uploaded = out
            else:
                shutil.rmtree(out)
        assert uploaded is not None

        key = tmp / "bench.key"
        _cli("soppu", "keygen", "-o", str(key))
        t0 = time.perf_counter()
        _cli("soppu", "sign", str(uploaded), "--key", str(key), "--owner", OWNER, "--version", "1")
        sign_s = time.perf_counter() - t0
        shutil.rmtree(tmp / "adapters")  # disk: the registries hold copies of the bundle from here on

        publish = publish_all(args, uploaded, Path(f"{key}.pub"), tmp, resolve)

        result = {
            "benchmark": "scale",
            "machine": info,
            "config": {"N": n, "layers": layers, "layers_full_model": 32, "fewer_layers_than_model": layers < 32,
                       "modules": ["q_proj", "v_proj"], "shapes": {"q_proj": [4096, 4096], "v_proj": [1024, 4096]},
                       "source_rank": 16, "k": args.rank, "method": "full", "clusters": clusters,
                       "max_iter": args.max_iter, "quick": args.quick, "jobs": args.jobs,
                       "compress_threads": args.threads or "torch default"},
            "error_definition": "unsquared relative Frobenius norm ||dW - U S V^T||_F / ||dW||_F, mean over adapters "
                                "and modules",
            "target": {"clusters": 25, "wall_s_under": 600, "peak_rss_mb_under": 4096},
            "write_adapters_s": round(write_s, 1),
            "adapter_bytes": adapter_bytes,
            "compress": runs,
            "uploaded_bundle_clusters": clusters[0],
            "sign_s": round(sign_s, 2),
            "publish": publish,
            "total_s": round(time.perf_counter() - started, 1),
        }
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
