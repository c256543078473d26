"""Limits before and around authentication (issue 10, items 2, 3 and 4), against real
`soppu-registry serve` processes: memory, body sizes, header and body timeouts, the connection
cap, and safetensors headers bounded by the manifest before parsing."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from safetensors.numpy import load_file

from soppu_client.format import signing
from soppu_client.registry_client import RegistryClient
from soppu_registry.server import open_files_needed
from tests.registry.regkit import (
    FUTURE,
    Owner,
    Registry,
    Server,
    auth,
    error_code,
    new_owner,
    publish,
    upload_blobs,
)
from tests.registry.services import Backend

MiB = 1 << 20
BIG_BLOB = 32 * MiB
IDLE = 1.5
HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 24


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Registry]:
    """A server with short timeouts, a small connection cap and room for a 32 MiB blob."""
    tmp = tmp_path_factory.mktemp("limits")
    server = Server(tmp / "data", "--rate", "0", "--max-blob-bytes", str(BIG_BLOB), "--body-idle-timeout", str(IDLE),
                    "--header-timeout", str(HEADER_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS),
                    backend=backend).start()
    try:
        yield Registry(server, tmp)
    finally:
        server.stop()
    log = (tmp / f"server-{server.port}.log").read_text()
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture
def writer(reg: Registry) -> Owner:
    return new_owner(reg.store, f"lim{time.monotonic_ns()}", reg.tmp / "keys")


def _rss(reg: Registry) -> int:
    assert reg.server.proc is not None
    return psutil.Process(reg.server.proc.pid).memory_info().rss


def _raw_request(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(head.encode("latin-1") + body)
    return s


def _read_response(s: socket.socket) -> tuple[int, dict]:
    """(status, JSON body) of one response on a raw socket, read until the server closes."""
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and b"content-length:" in head.lower():
            n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(body) >= n:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# --------------------------------------------------------------------------- item 2: memory before auth


def test_large_bodies_are_refused_before_reading_and_rss_stays_flat(reg: Registry, writer: Owner) -> None:
    # control: a legitimate publish goes through, with its body under the cap
    client = RegistryClient(reg.url, writer.write_token)
    bundle = writer.bundle(reg.tmpdir("b"), 1)
    assert client.upload_bundle(bundle).adapters["alpha"] == "created"
    path = f"/v1/adapters/{writer.name}/alpha/versions/2"
    declared = 16 * MiB
    # a declared Content-Length over --max-publish-bytes is 413 at once, from the headers alone
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", reg.server.port, timeout=10)
    conn.putrequest("PUT", path)
    for k, v in {**auth(writer.write_token), "Content-Type": "application/json", "Content-Length": str(declared)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())["error"]) == (413, {
        "code": "too_large", "message": f"publish body of {declared} bytes exceeds the limit of {MiB} bytes"})
    assert time.monotonic() - t0 < 2
    conn.close()
    # a chunked body (no Content-Length) is cut at the cap while it is read
    chunks = (b"x" * 65536 for _ in range(64))
    r = requests.put(reg.url + path, data=chunks, headers=auth(writer.write_token), timeout=30)
    assert (r.status_code, r.json()["error"]) == (413, {"code": "too_large",
                                                        "message": f"publish body exceeds the limit of {MiB} bytes"})

    # attack: many connections, without a token or with a valid one, each pushing 16 MiB at publish
    before = _rss(reg)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss(reg))
            time.sleep(0.02)

    results: list[tuple[int, str, float]] = []
    lock = threading.Lock()
    payload = b"[" + b"0," * (declared // 2 - 1) + b"0]"

    def attack(token: str | None) -> None:
        t = time.monotonic()
        head = (f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n" + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n")
        s = socket.create_connection(("127.0.0.1", reg.server.port), timeout=20)
        s.sendall(head.encode())
        try:
            s.sendall(payload)  # the server answers and closes without reading: this may fail part way
        except OSError:
            pass
        status, body = _read_response(s)
        s.close()
        with lock:
            results.append((status, body["error"]["code"], time.monotonic() - t))

    sampler = threading.Thread(target=sample)
    sampler.start()
    n = MAX_CONNECTIONS - 4  # all at once, under the cap (past it the oldest waiting one is displaced)
    threads = [threading.Thread(target=attack, args=(tok,)) for tok in [None, writer.write_token] * (n // 2)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    stop.set()
    sampler.join()
    assert sorted({(s, c) for s, c, _ in results}) == [(401, "unauthorized"), (413, "too_large")]
    assert len(results) == n
    growth = (peak[0] - before) / MiB
    print(f"\n{n} x 16 MiB publish bodies: RSS {before / MiB:.0f} MiB -> peak {peak[0] / MiB:.0f} MiB "
          f"(+{growth:.1f} MiB); all answered in {elapsed:.2f} s, slowest {max(d for *_, d in results):.2f} s")
    assert growth < 32, f"RSS grew by {growth:.1f} MiB"  # the old code held >= 16 MiB per authenticated body
    assert max(d for *_, d in results) < 5
    # the server still serves
    assert client.get_version(writer.name, "alpha")["version"] == 1


# --------------------------------------------------------------------------- item 3: time limits


def test_stalled_upload_is_dropped_with_its_temp_file(reg: Registry, writer: Owner) -> None:
    tmp_dir = reg.store.tmp_dir
    data = b"y" * 1000
    digest = hashlib.sha256(data).hexdigest()
    head = (f"PUT /v1/blobs/sha256:{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {writer.write_token}\r\n"
            f"Content-Length: 1000\r\nX-Soppu-Size: 1000\r\n\r\n")
    # control: the same upload sent whole is stored
    s = _raw_request(reg.server.port, head, data)
    assert _read_response(s)[0] == 201
    s.close()
    # attack: declare 1000 bytes, send 100, then idle
    other = hashlib.sha256(b"z" * 1000).hexdigest()
    t0 = time.monotonic()
    s = _raw_request(reg.server.port, head.replace(digest, other), b"z" * 100)
    time.sleep(IDLE / 3)
    assert len(list(tmp_dir.iterdir())) == 1  # the partial upload is in progress
    status, body = _read_response(s)
    waited = time.monotonic() - t0
    assert (status, body["error"]["code"]) == (408, "body_timeout")
    assert body["error"]["message"] == (f"upload of sha256:{other}: no data for {IDLE:g} s after 100 bytes; "
                                        "the upload was dropped, send it again")
    assert IDLE <= waited < IDLE + 2
    assert s.recv(10) == b""  # and the connection is closed
    s.close()
    assert list(tmp_dir.iterdir()) == []
    assert requests.head(f"{reg.url}/v1/blobs/sha256:{other}", headers=auth(writer.write_token), timeout=10).status_code == 404


def test_slow_header_connections_do_not_starve_a_legit_request(reg: Registry, writer: Owner) -> None:
    assert reg.server.proc is not None
    proc = psutil.Process(reg.server.proc.pid)
    fd_limit = open_files_needed(MAX_CONNECTIONS)  # what `serve` requires for this cap (136)
    proc.rlimit(psutil.RLIMIT_NOFILE, (fd_limit, proc.rlimit(psutil.RLIMIT_NOFILE)[1]))
    url = f"{reg.url}/v1/keys/{writer.name}"
    assert requests.get(url, headers=auth(writer.read_token), timeout=5).status_code == 200  # control
    # attack: more never-finished requests than the server has file descriptors
    n = fd_limit + 40
    slow = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", reg.server.port), timeout=10)
        s.sendall(b"GET /v1/keys/x HTTP/1.1\r\nHost: x\r\n")  # headers never end
        slow.append(s)
    time.sleep(0.3)
    assert proc.num_fds() < MAX_CONNECTIONS + 40  # the cap holds, far below the descriptor limit
    t0 = time.monotonic()
    r = requests.get(url, headers=auth(writer.read_token), timeout=5)
    took = time.monotonic() - t0
    assert r.status_code == 200 and took < 1, took
    print(f"\n{n} slow-header connections (fd limit {fd_limit}, cap {MAX_CONNECTIONS}): "
          f"legit request answered in {took * 1000:.0f} ms; server fds {proc.num_fds()}")
    # every slow connection is closed by the server: displaced, or at the header timeout
    time.sleep(HEADER_TIMEOUT + 0.5)
    closed = 0
    for s in slow:
        s.settimeout(2)
        try:
            closed += s.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        s.close()
    assert closed == n


# --------------------------------------------------------------------------- item 4: parsing cost


def _stuffed_core(path: Path, n_extra: int) -> None:
    """Rewrite a core file with its real tensors plus ``n_extra`` zero-size ones (a valid file)."""
    tensors = load_file(str(path))
    header: dict = {}
    data = b""
    for name, arr in tensors.items():
        raw = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    end = len(data)
    for i in range(n_extra):
        header[f"pad.{i:07d}"] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_stuffed_safetensors_header_is_refused_before_parsing(reg: Registry, writer: Owner) -> None:
    control = writer.bundle(reg.tmpdir("ok"), 1)
    assert RegistryClient(reg.url, writer.write_token).upload_bundle(control).adapters["alpha"] == "created"
    root = writer.bundle(reg.tmpdir("stuffed"), 2)
    core = root / "cores" / "alpha.safetensors"
    _stuffed_core(core, 200_000)
    header_len = struct.unpack("<Q", core.read_bytes()[:8])[0]
    assert len(load_file(str(core))) == 200_002  # the safetensors library reads it: a well-formed file
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["cores/alpha.safetensors"] = {"sha256": hashlib.sha256(core.read_bytes()).hexdigest(),
                                                    "size": core.stat().st_size}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    signing.sign_bundle(root, writer.key, writer.name, 2, FUTURE)
    upload_blobs(reg.url, writer.write_token, root)
    before = _rss(reg)
    t0 = time.monotonic()
    r = publish(reg.url, writer.write_token, writer.name, "alpha", 2, signing.read_signature(root))
    took = time.monotonic() - t0
    cap = 64 * 1024 + 2 * 256 + 6 * len("model.layers.0.self_attn.q_proj.S") + 6 * len("model.layers.0.self_attn.v_proj.S")
    assert (r.status_code, error_code(r)) == (400, "bad_safetensors")
    assert r.json()["error"]["message"] == (f"cores/alpha.safetensors: header length {header_len} exceeds the cap of "
                                            f"{cap} bytes; the file is corrupt or not a safetensors file")
    growth = (_rss(reg) - before) / MiB
    print(f"\n{header_len / MiB:.1f} MiB safetensors header (200,002 tensors): refused in {took * 1000:.0f} ms, "
          f"RSS +{growth:.1f} MiB")
    assert took < 1 and growth < 16


def test_malformed_http_gets_the_json_error_shape(reg: Registry) -> None:
    """A request h11 cannot parse (here a non-numeric Content-Length, as the schemathesis fuzzer
    sends) is 400 in the API's JSON error shape (it was uvicorn's text/plain), and the server serves on."""
    s = _raw_request(reg.server.port, "GET /v1/adapters/x/y/versions HTTP/1.1\r\nHost: x\r\nContent-Length: JGPa)NJg\r\n\r\n")
    status, body = _read_response(s)
    s.close()
    assert (status, body["error"]["code"]) == (400, "bad_request") and set(body) == {"error"}
    assert body["error"]["message"].startswith("malformed HTTP request: ")
    assert requests.get(f"{reg.url}/healthz", timeout=10).status_code == 200
