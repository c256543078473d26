"""Helpers for the LoRAX-source tests: real tools end to end, nothing stubbed.

* synthetic PEFT LoRA adapters on SmolLM2-135M's shapes, written with the safetensors library;
* a bundle made by the real ``soppu compress`` / ``soppu keygen`` / ``soppu sign`` commands;
* a real ``soppu-registry serve`` subprocess on 127.0.0.1, administered with its own CLI;
* the upload done by ``soppu upload``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from safetensors.numpy import save_file

BIN = Path(sys.executable).parent
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
N_LAYERS, HIDDEN, KV_OUT = 30, 576, 192
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (KV_OUT, HIDDEN)}  # (d_out, d_in)


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    exe = args[0] if os.path.isabs(args[0]) else str(BIN / args[0])
    proc = subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc.stdout


def write_adapter(path: Path, seed: int, *, rank: int = 4, alpha: float = 8.0, layers: range = range(2),
                  scale: float = 0.05) -> Path:
    """A PEFT LoRA adapter dir (q_proj, v_proj) with random A and non-zero B."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in layers:
        for mod, (d_out, d_in) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, d_in)) / np.sqrt(d_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (scale * rng.standard_normal((d_out, rank))).astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "base_model_name_or_path": BASE_MODEL, "r": rank, "lora_alpha": alpha,
        "lora_dropout": 0.0, "bias": "none", "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False,
        "task_type": "CAUSAL_LM", "inference_mode": True, "layers_to_transform": list(layers),
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def shared_basis_adapters(root: Path, n: int, *, rank: int = 4, seed: int = 0, n_layers: int = 2) -> list[Path]:
    """``n`` adapters whose updates share one pair of rank-``rank`` subspaces per module
    (dW_i = B0 C_i A0), so a bundle of rank ``rank`` holds them exactly."""
    rng = np.random.default_rng(seed)
    out = []
    base = {}
    for mod, (d_out, d_in) in SHAPES.items():
        base[mod] = [(np.linalg.qr(rng.standard_normal((d_out, rank)))[0].astype(np.float32),
                      np.linalg.qr(rng.standard_normal((d_in, rank)))[0].T.astype(np.float32)) for _ in range(n_layers)]
    for j in range(n):
        path = root / f"user{j:03d}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for mod in SHAPES:
            for i in range(n_layers):
                B0, A0 = base[mod][i]
                C = (0.3 * rng.standard_normal((rank, rank))).astype(np.float32)
                prefix = f"base_model.model.model.layers.{i}.self_attn.{mod}"
                tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(A0)
                tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(B0 @ C)
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "base_model_name_or_path": BASE_MODEL, "r": rank, "lora_alpha": rank,
                  "lora_dropout": 0.0, "bias": "none", "target_modules": ["q_proj", "v_proj"],
                  "fan_in_fan_out": False, "task_type": "CAUSAL_LM", "inference_mode": True,
                  "layers_to_transform": list(range(n_layers))}
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
        out.append(path)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    """A ``soppu-registry serve`` subprocess with one owner, its key and tokens."""

    data: Path
    url: str
    proc: subprocess.Popen
    owner: str
    key: Path
    write_token: str
    read_token: str
    serving_token: str
    other_owner_token: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def publish(self, bundle: Path, version: int = 1) -> dict:
        run("soppu", "sign", str(bundle), "--key", str(self.key), "--owner", self.owner,
            "--version", str(version), "--expires", "30d")
        return json.loads(run("soppu", "upload", str(bundle), "--registry", self.url, "--token", self.write_token,
                              "--retries", "0", "--no-progress", "--json"))


def start_registry(tmp: Path, owner: str = "alice") -> Registry:
    data = tmp / "registry-data"
    reg = "soppu-registry"
    run(reg, "create-owner", "--data", str(data), owner)
    run(reg, "create-owner", "--data", str(data), "mallory")
    key = tmp / "keys" / f"{owner}.key"
    key.parent.mkdir(parents=True, exist_ok=True)
    run("soppu", "keygen", "-o", str(key))
    run(reg, "register-key", "--data", str(data), "--owner", owner, "--public-key", f"{key}.pub")

    def token(*args: str) -> str:
        return json.loads(run(reg, "issue-token", "--data", str(data), *args, "--json"))["token"]

    write = token("--owner", owner, "--scope", "owner-write")
    read = token("--owner", owner, "--scope", "owner-read")
    serving = token("--scope", "serving-read")
    other = token("--owner", "mallory", "--scope", "owner-read")
    port = free_port()
    log = open(tmp / "registry.log", "ab")
    proc = subprocess.Popen([str(BIN / reg), "serve", "--data", str(data), "--port", str(port), "--rate", "0"],
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"registry exited with {proc.returncode}; see {log.name}")
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("registry did not start in 30 s")
        time.sleep(0.1)
    return Registry(data, url, proc, owner, key, write, read, serving, other)


def compress(adapters: list[Path], out: Path, rank: int) -> Path:
    run("soppu", "compress", *map(str, adapters), "-o", str(out), "--rank", str(rank), "--max-iter", "50")
    return out


def cache_files(root: Path) -> list[str]:
    """Every file under a cache root except lock files (which carry no data). Rollback marks and
    known keys (``.trust``) count: a refused version leaves none."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts)


def publish_fresh(published, names: tuple[str, ...], seed: int) -> Path:
    """Compress new adapters ``names`` into their own bundle and publish it as version 1."""
    tmp = published.tmp / f"extra-{seed}"
    ads = [write_adapter(tmp / n, seed=seed + i) for i, n in enumerate(names)]
    bundle = compress(ads, tmp / "bundle", rank=4)
    published.registry.publish(bundle, version=1)
    return bundle


def version_record(reg: Registry, name: str) -> dict:
    """The registry's latest version record of ``<owner>/<name>`` (read with the serving token)."""
    r = requests.get(f"{reg.url}/v1/adapters/{reg.owner}/{name}",
                     headers={"Authorization": f"Bearer {reg.serving_token}"}, timeout=10)
    r.raise_for_status()
    return r.json()


def signature_text(reg: Registry, name: str) -> str:
    """The stored text of the signature document of ``<owner>/<name>``'s latest version (its sha256
    is the digest the registry names it by)."""
    import sqlite3

    db = sqlite3.connect(reg.data / "registry.sqlite3")
    try:
        (text,) = db.execute("SELECT s.doc FROM versions v JOIN signatures s ON s.sig_digest = v.sig_digest "
                             "WHERE v.owner=? AND v.name=? ORDER BY v.version DESC LIMIT 1", (reg.owner, name)).fetchone()
    finally:
        db.close()
    return text


def edit_signature(reg: Registry, name: str, change) -> None:
    """Rewrite the stored signature document of ``<owner>/<name>`` in the registry's SQLite file
    (what a compromised registry could serve); ``change`` edits the parsed document in place."""
    import sqlite3

    import hashlib

    db = sqlite3.connect(reg.data / "registry.sqlite3")
    try:
        (text,) = db.execute("SELECT s.doc FROM versions v JOIN signatures s ON s.sig_digest = v.sig_digest "
                             "WHERE v.owner=? AND v.name=?", (reg.owner, name)).fetchone()
        doc = json.loads(text)
        change(doc)
        new = json.dumps(doc, sort_keys=True)
        digest = hashlib.sha256(new.encode()).hexdigest()  # signatures are stored once, by digest
        with db:
            db.execute("INSERT OR IGNORE INTO signatures(sig_digest, doc) VALUES (?, ?)", (digest, new))
            db.execute("UPDATE versions SET sig_digest=? WHERE owner=? AND name=?", (digest, reg.owner, name))
    finally:
        db.close()
