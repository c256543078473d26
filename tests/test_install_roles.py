"""The registry role installs and runs without the client's heavy stack (issue 22).

A fresh venv gets ``pip install -e .[registry]`` (base dependencies + the registry extra, nothing
else), then ``soppu-registry init`` and ``serve`` run from it and answer ``/healthz`` on 127.0.0.1,
while ``import torch`` (and peft, transformers) fails in that venv. pip may fetch from its index and
reuses its wheel cache; the project itself is built without isolation when the venv's setuptools can.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # a venv and a pip install: ~20 s with a warm pip cache, longer cold


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def registry_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("registry-role") / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    # A venv's own setuptools builds the editable install without fetching one, if it is new enough
    # (bdist_wheel is built into setuptools since 70.1).
    new_enough = "import setuptools as s, sys; sys.exit(int(s.__version__.split('.')[0]) < 71)"
    has_setuptools = _run([str(py), "-c", new_enough]).returncode == 0
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if has_setuptools:
        pip.append("--no-build-isolation")
    done = _run([*pip, "-e", f"{ROOT}[registry]"], cwd=ROOT, timeout=900)
    assert done.returncode == 0, f"pip install -e .[registry] failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return venv


def test_registry_role_has_no_torch(registry_venv: Path) -> None:
    py = str(registry_venv / "bin" / "python")
    # Non-vacuous: the venv's own python works and has the registry installed.
    ok = _run([py, "-c", "import soppu_registry.app, soppu_registry.cli, soppu_client.format.signing"])
    assert ok.returncode == 0, ok.stderr
    for heavy in ("torch", "peft", "transformers"):
        r = _run([py, "-c", f"import {heavy}"])
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, f"{heavy} is importable in the registry venv"


def test_registry_role_serves(registry_venv: Path, tmp_path: Path) -> None:
    exe = str(registry_venv / "bin" / "soppu-registry")
    data = tmp_path / "data"
    data.mkdir()
    init = _run([exe, "init", "--data", str(data)], timeout=120)
    assert init.returncode == 0, init.stderr
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (the server process writes it)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([exe, "serve", "--data", str(data), "--port", str(port)], stdout=log, stderr=log,
                            env=env, cwd=tmp_path)
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and status is None:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    status = resp.status
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        assert status == 200, f"no answer on 127.0.0.1:{port}: {(tmp_path / 'server.log').read_text()}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
