"""Helpers for the registry tests: tiny hand-written bundles and real `soppu-registry serve` processes.

Bundles come from tests/conftest_bundles.py (written with the safetensors library, not with
soppu_client.format.bundle). Servers are subprocesses on 127.0.0.1 with a free port over a real
backend (tests/registry/services.py: SQLite + files, or PostgreSQL + SeaweedFS S3); owners, keys and
tokens are created directly on the same storage, as the admin CLI does.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from soppu_client.format import signing
from soppu_registry.auth import issue_token
from soppu_registry.storage import Storage
from tests import conftest_bundles
from tests.conftest_bundles import BASE_MODEL, RANK  # noqa: F401  (BASE_MODEL re-exported for the registry tests)
from tests.registry.services import DEFAULT, Backend

MAX_BLOB = 1 << 20
FUTURE = "2099-01-01T00:00:00Z"
REGISTRY_BIN = Path(sys.executable).with_name("soppu-registry")
_names = itertools.count()


def make_bundle(root: Path, adapters: tuple[str, ...] = ("alpha", "beta"), *, seed: int | None = None,
                method: str = "full", rank: int = RANK) -> Path:
    """Write a tiny valid bundle (unsigned) and return its directory; no seed: unique bytes."""
    return conftest_bundles.make_bundle(root, adapters, seed=seed if seed is not None else 1_000_000 + next(_names),
                                        method=method, rank=rank)


@dataclass
class Owner:
    """An owner registered on a test registry, with its key and one token per scope."""

    name: str
    key_path: Path
    write_token: str
    read_token: str

    @property
    def key(self) -> Any:
        return signing.load_private_key(self.key_path)

    def bundle(self, root: Path, version: int = 1, *, adapters: tuple[str, ...] = ("alpha", "beta"),
               seed: int | None = None, expires: str = FUTURE, key: Any = None) -> Path:
        """A bundle signed for this owner (by ``key``, default its registered key)."""
        make_bundle(root, adapters, seed=seed)
        signing.sign_bundle(root, key or self.key, self.name, version, expires)
        return root


class Server:
    """A `soppu-registry serve` subprocess on a free loopback port over ``backend`` (default sqlite+dir)."""

    def __init__(self, data: Path, *args: str, backend: Backend | None = None):
        self.data, self.args = data, args
        self.backend = backend or DEFAULT
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Server:
        log = open(self.data.parent / f"server-{self.port}.log", "ab")  # noqa: SIM115  (the server process writes it)
        self.proc = subprocess.Popen([str(REGISTRY_BIN), "serve", *self.storage_args(), "--port", str(self.port),
                                      *self.args], stdout=log, stderr=log, env={**os.environ, **self.backend.env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited with {self.proc.returncode}; see {log.name}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or slow to answer on a busy machine
                time.sleep(0.1)
        raise RuntimeError("registry did not start in time")

    def storage_args(self) -> list[str]:
        """``--data`` (and ``--database``/``--blobs``) for admin commands on this server's state."""
        return self.backend.args(self.data)

    def storage(self) -> Storage:
        """Direct access to this server's state (as the admin CLI has)."""
        return self.backend.storage(self.data)

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no flushing."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Registry:
    """A running server plus direct admin access to its data dir."""

    def __init__(self, server: Server, tmp: Path):
        self.server, self.url, self.tmp = server, server.url, tmp
        self.store = server.storage()
        _, self.serving_token = issue_token(self.store, None, ["serving-read"], "tests")

    def new_owner(self, prefix: str = "o") -> Owner:
        return new_owner(self.store, f"{prefix}{next(_names)}-{os.getpid()}", self.tmp / "keys")

    def tmpdir(self, label: str) -> Path:
        return self.tmp / f"{label}-{next(_names)}"


def new_owner(store: Storage, name: str, key_dir: Path) -> Owner:
    """Create an owner with a fresh registered key and an owner-write and an owner-read token."""
    store.create_owner(name)
    key_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = signing.generate_keypair(key_dir / name)
    pub = signing.load_public_key(pub_path)
    store.add_key(name, signing.public_key_id(pub), _b64(pub))
    _, write = issue_token(store, name, ["owner-write"])
    _, read = issue_token(store, name, ["owner-read"])
    return Owner(name, key_path, write, read)


def _b64(pub: Any) -> str:
    import base64

    from cryptography.hazmat.primitives import serialization
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def put_blob(url: str, token: str | None, data: bytes, digest: str | None = None, **headers: str) -> requests.Response:
    digest = digest or hashlib.sha256(data).hexdigest()
    return requests.put(f"{url}/v1/blobs/sha256:{digest}", data=data, headers={**auth(token), **headers}, timeout=30)


def upload_blobs(url: str, token: str, bundle: Path) -> None:
    """PUT every file of the bundle's statement (as the client would)."""
    for f in signing.read_signature(bundle)["statement"]["files"]:
        r = put_blob(url, token, (bundle / f["path"]).read_bytes(), f["sha256"])
        assert r.status_code in (200, 201), r.text


def publish(url: str, token: str | None, owner: str, name: str, version: int, doc: dict[str, Any]) -> requests.Response:
    return requests.put(f"{url}/v1/adapters/{owner}/{name}/versions/{version}", json={"signature": doc},
                        headers=auth(token), timeout=30)


def error_code(r: requests.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]["code"]


def retry_uploads(client: Any, bundles: list[Path]) -> None:
    """Re-send interrupted work after a crash: upload every bundle again through ``client`` (a
    RegistryClient); a version below one already acknowledged may only be refused as ``rollback``."""
    from soppu_client.format.errors import RegistryError

    for b in bundles:
        try:
            client.upload_bundle(b)
        except RegistryError as e:  # a later version was acknowledged before this one
            assert e.code == "rollback", e
