"""Load test for the SOPPU registry on loopback; prints one JSON object.

C concurrent clients (threads) run for a bounded time. Each owns B tiny bundles (distinct adapter
names) and alternates: upload (one adapter's core re-drawn, so new blobs; re-signed with the next
version; `RegistryClient.upload_bundle`: HEAD all, PUT missing, publish each adapter) and fetch
(latest version of one of its adapters, every blob downloaded and digest-checked). Afterwards an
audit re-reads every acknowledged version: signature document identical, signature valid for the
owner's registered key, every blob's sha256 equal to the acknowledged statement's.

    python benchmarks/registry_load.py --concurrency 8 --duration 10
    python benchmarks/registry_load.py --backend postgres+s3 --replicas 2 ...
    python benchmarks/registry_load.py --url http://127.0.0.1:8080 --data DIR ...   (existing server)

Without --url it starts `soppu-registry serve --rate 0` itself: on a temporary data dir
(``--backend sqlite+dir``), or, for ``--backend postgres+s3``, ``--replicas`` N processes sharing one
throwaway PostgreSQL database and one SeaweedFS bucket (soppu_registry.devservices, started and
stopped by the benchmark). Each client sends its operations to the replicas in turn (round-robin),
so a version uploaded through one replica is fetched and audited through others.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from safetensors.numpy import save_file

from soppu_registry.auth import issue_token
from soppu_registry.devservices import Services
from soppu_registry.storage import Storage
from soppu_client.format import signing
from soppu_client.format.errors import SoppuError
from soppu_client.format.fsutil import atomic_write, file_digest
from soppu_client.registry_client import RegistryClient

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class TimedSession(requests.Session):
    """A session that records the wall time of every request (body included)."""

    def __init__(self, sink: list[float]):
        super().__init__()
        self.sink = sink

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        t = time.perf_counter()
        try:
            return super().request(*args, **kwargs)
        finally:
            self.sink.append(time.perf_counter() - t)


def write_bundle(root: Path, adapters: list[str], modules: dict[str, tuple[int, int]], rank: int,
                 rng: np.random.Generator, redraw: str | None = None) -> None:
    """Write (or, with ``redraw``, update one core of) a bundle in the v1 layout."""
    (root / "cores").mkdir(parents=True, exist_ok=True)
    if redraw is None:
        save_file({f"{m}.{x}": rng.standard_normal((d if x == "U" else i, rank)).astype(np.float32)
                   for m, (d, i) in modules.items() for x in ("U", "V")}, str(root / "basis.safetensors"))
    for a in adapters if redraw is None else [redraw]:
        save_file({f"{m}.S": rng.standard_normal((rank, rank)).astype(np.float32) for m in modules},
                  str(root / "cores" / f"{a}.safetensors"))
    files = {}
    for rel in ["basis.safetensors", *(f"cores/{a}.safetensors" for a in adapters)]:
        digest, size = file_digest(root / rel)
        files[rel] = {"sha256": digest, "size": size}
    manifest = {"format": "soppu-bundle/1", "base_model": BASE_MODEL, "method": "full", "rank": rank,
                "dtype": "float32", "clusters": 1, "peft": {"target_modules": ["q_proj"], "fan_in_fan_out": False,
                                                              "task_type": "CAUSAL_LM"},
                "modules": {m: {"shape": list(s)} for m, s in modules.items()},
                "adapters": {a: {"core": f"cores/{a}.safetensors", "cluster": 0, "source_rank": 8, "alpha": 16.0}
                             for a in adapters},
                "files": files, "fit": {}, "metrics": {}}
    atomic_write(root / "manifest.json", json.dumps(manifest, sort_keys=True).encode())


@dataclass
class Worker:
    owner: str
    token: str
    key: Any
    bundles: list[tuple[Path, list[str]]]
    latencies: list[float] = field(default_factory=list)
    acked: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    uploads: int = 0
    fetches: int = 0
    errors: list[str] = field(default_factory=list)
    version: int = 0


def run_worker(w: Worker, urls: list[str], deadline: float, modules: dict[str, tuple[int, int]], rank: int,
               seed: int) -> None:
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    clients = [RegistryClient(url, w.token, retries=3, session=TimedSession(w.latencies)) for url in urls]
    op = seed
    while time.monotonic() < deadline:
        op += 1
        client = clients[op % len(clients)]  # round-robin over the replicas
        try:
            if not w.acked or rnd.random() < 0.5:
                root, adapters = w.bundles[rnd.randrange(len(w.bundles))]
                write_bundle(root, adapters, modules, rank, rng, redraw=rnd.choice(adapters))
                w.version += 1
                signing.sign_bundle(root, w.key, w.owner, w.version, "2099-01-01T00:00:00Z")
                doc = signing.read_signature(root)
                res = client.upload_bundle(root, verify_local=False)
                w.acked += [(name, w.version, doc) for name in res.adapters]
                w.uploads += 1
            else:
                name, _, _ = rnd.choice(w.acked)
                v = client.get_version(w.owner, name)
                for f in v["files"]:
                    client.get_blob(f["sha256"])  # raises on digest mismatch
                w.fetches += 1
        except (SoppuError, requests.RequestException) as e:
            w.errors.append(f"{type(e).__name__}: {e}"[:300])


def audit(urls: list[str], workers: list[Worker], serving_token: str) -> dict[str, Any]:
    """Every acknowledged version, re-read (through the replicas in turn): same signature doc,
    valid signature, every blob's digest."""
    clients = [RegistryClient(url, serving_token) for url in urls]
    client = clients[0]
    ok = failed = blobs = 0
    problems: list[str] = []
    seen_blobs: set[str] = set()
    for w in workers:
        keys = [k["public_key"] for k in client.get_keys(w.owner) if k["status"] == "active"]
        for i, (name, version, doc) in enumerate(w.acked):
            client = clients[i % len(clients)]
            try:
                got = client.get_version(w.owner, name, version)
                assert got["signature"] == doc, "signature document differs"
                signing.verify_statement(got["signature"], keys[0].encode(), owner=w.owner, adapter=name, version=version)
                assert got["files"] == doc["statement"]["files"], "file list differs"
                for f in got["files"]:
                    if f["sha256"] not in seen_blobs:
                        data = client.get_blob(f["sha256"])
                        assert len(data) == f["size"], f"{f['path']} size"
                        seen_blobs.add(f["sha256"])
                        blobs += 1
                ok += 1
            except (AssertionError, SoppuError) as e:
                failed += 1
                problems.append(f"{w.owner}/{name}@{version}: {e}"[:300])
    return {"versions": ok + failed, "ok": ok, "failed": failed, "distinct_blobs_checked": blobs, "problems": problems[:5]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q) * 1000) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", "-c", type=int, default=8)
    ap.add_argument("--duration", "-d", type=float, default=10.0, help="seconds of load")
    ap.add_argument("--bundles", "-b", type=int, default=2, help="bundles per client")
    ap.add_argument("--adapters", type=int, default=2, help="adapters per bundle")
    ap.add_argument("--modules", type=int, default=4, help="modules per bundle (576x576, like q_proj)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--backend", choices=["sqlite+dir", "postgres+s3"], default="sqlite+dir",
                    help="storage of the registry the benchmark starts")
    ap.add_argument("--replicas", type=int, default=1, help="registry processes (postgres+s3 only for more than 1)")
    ap.add_argument("--url", default=None, help="existing registry (needs --data for admin)")
    ap.add_argument("--data", default=None, help="data dir of the registry (admin: owners, keys, tokens)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.replicas < 1 or (args.replicas > 1 and args.backend != "postgres+s3") or (args.url and args.replicas > 1):
        ap.error("--replicas N > 1 needs --backend postgres+s3 (sqlite+dir is one process per data dir) and no --url")

    tmp = Path(tempfile.mkdtemp(prefix="soppu-regload-"))
    data = Path(args.data) if args.data else tmp / "data"
    procs: list[subprocess.Popen[bytes]] = []
    services = None
    try:
        urls = [args.url] if args.url else []
        storage_args: list[list[str]] = [["--data", str(data)]]
        if args.url is None and args.backend == "postgres+s3":
            services = Services(tmp / "services").start()  # also exports the S3 credentials
            loc = services.fresh("regload")
            storage_args = [["--data", str(tmp / f"replica{i}"), *loc.args()] for i in range(args.replicas)]
            store = Storage(tmp / "admin", database=loc.database, blobs=loc.blobs)
        else:
            store = None
        if args.url is None:
            exe = Path(sys.executable).with_name("soppu-registry")
            for sargs in storage_args:
                port = free_port()
                urls.append(f"http://127.0.0.1:{port}")
                procs.append(subprocess.Popen([str(exe), "serve", *sargs, "--port", str(port), "--rate", "0"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for url in urls:
                for _ in range(300):
                    try:
                        requests.get(url + "/healthz", timeout=1)
                        break
                    except requests.ConnectionError:
                        time.sleep(0.1)
        store = store or Storage(data)
        _, serving = issue_token(store, None, ["serving-read"], "registry_load")
        modules = {f"model.layers.{i}.self_attn.q_proj": (576, 576) for i in range(args.modules)}
        rng = np.random.default_rng(args.seed)
        workers = []
        run_id = f"{os.getpid()}x{int(time.time()) % 100000}"
        (tmp / "keys").mkdir(parents=True, exist_ok=True)
        for c in range(args.concurrency):
            owner = f"load{c}-{run_id}"
            store.create_owner(owner)
            priv, pub = signing.generate_keypair(tmp / "keys" / owner)
            pk = signing.load_public_key(pub)
            raw = pk.public_bytes(*_raw_format())
            store.add_key(owner, signing.public_key_id(pk), base64.b64encode(raw).decode())
            _, token = issue_token(store, owner, ["owner-write"])
            bundles = []
            for j in range(args.bundles):
                adapters = [f"b{j}-a{i}" for i in range(args.adapters)]
                root = tmp / "bundles" / owner / f"b{j}"
                write_bundle(root, adapters, modules, args.rank, rng)
                bundles.append((root, adapters))
            workers.append(Worker(owner, token, signing.load_private_key(priv), bundles))
        deadline = time.monotonic() + args.duration
        t0 = time.perf_counter()
        threads = [threading.Thread(target=run_worker, args=(w, urls, deadline, modules, args.rank, args.seed + i))
                   for i, w in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        lat = [x for w in workers for x in w.latencies]
        bundle_bytes = sum(f.stat().st_size for f in workers[0].bundles[0][0].rglob("*") if f.is_file())
        result = {
            "benchmark": "registry_load",
            "config": {"concurrency": args.concurrency, "duration_s": args.duration, "bundles_per_client": args.bundles,
                       "adapters_per_bundle": args.adapters, "modules": args.modules, "rank": args.rank,
                       "bundle_bytes": bundle_bytes, "server": "external" if args.url else "soppu-registry serve --rate 0",
                       "backend": store.backend, "replicas": len(urls)},
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "elapsed_s": round(elapsed, 3),
            "requests": len(lat),
            "requests_per_s": round(len(lat) / elapsed, 1),
            "latency_ms": {"p50": round(pct(lat, 50), 2), "p99": round(pct(lat, 99), 2), "max": round(pct(lat, 100), 2)},
            "uploads": sum(w.uploads for w in workers),
            "fetches": sum(w.fetches for w in workers),
            "versions_acknowledged": sum(len(w.acked) for w in workers),
            "errors": sum(len(w.errors) for w in workers),
            "error_samples": [e for w in workers for e in w.errors][:3],
            "audit": audit(urls, workers, serving),
        }
        print(json.dumps(result))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        if services is not None:
            services.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _raw_format() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives import serialization
    return serialization.Encoding.Raw, serialization.PublicFormat.Raw


if __name__ == "__main__":
    main()
