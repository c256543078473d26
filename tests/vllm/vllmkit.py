"""Helpers for the vLLM tests: the `.venv-vllm` environment, a real vLLM API server on 127.0.0.1
with the `soppu` resolver plugin, and OpenAI-API calls to it.

`.venv-vllm` is made by `scripts/setup_vllm.sh` (`scripts/test.sh` runs it); where it could not be
made, the tests skip with the reason the script recorded.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("SOPPU_VLLM_VENV") or REPO / ".venv-vllm")
if not VENV.is_absolute():
    VENV = REPO / VENV
SERVED_NAME = "smollm2"  # --served-model-name: the base model's name in requests
START_TIMEOUT = 240.0


def vllm_python() -> Path:
    """The vLLM environment's python, or skip the test with the reason it is missing."""
    python = VENV / "bin" / "python"
    failed = VENV / ".soppu-failed"
    if (VENV / ".soppu-installed").is_file() and python.is_file():
        return python
    if failed.is_file():
        reason = " ".join(failed.read_text(encoding="utf-8").splitlines()[1:]).strip()
        pytest.skip(f"vLLM environment could not be set up on this machine: {reason}")
    pytest.skip(f"no vLLM environment at {VENV}: run `bash scripts/setup_vllm.sh` (scripts/test.sh does)")


@dataclass
class VllmServer:
    """A `python -m vllm.entrypoints.openai.api_server` process with the soppu resolver."""

    url: str
    proc: subprocess.Popen
    log: Path
    started_in: float  # seconds from spawn to /health answering

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            return requests.get(self.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def chat(self, model: str, prompt: str, *, max_tokens: int = 16, timeout: float = 300) -> requests.Response:
        """A greedy chat completion (the model's chat template), with token ids returned."""
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "return_token_ids": True}
        return requests.post(self.url + "/v1/chat/completions", json=body, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_vllm(python: Path, model: Path, *, port: int, log: Path, env: dict[str, str],
               extra_args: tuple[str, ...] = ()) -> VllmServer:
    """Start stock vLLM's OpenAI server on ``model`` with ``--enable-lora`` and the soppu plugin;
    returns once /health answers (RuntimeError with the log's tail if it exits or times out)."""
    full_env = {**os.environ, "VLLM_PLUGINS": "soppu", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
                "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                "TOKENIZERS_PARALLELISM": "false", **env}
    full_env.pop("TRITON_INTERPRET", None)
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
           "--max-lora-rank", "16", "--max-loras", "4", "--max-model-len", "1024", "--max-num-seqs", "8",
           "--dtype", "float32", *extra_args]
    handle = open(log, "ab")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=full_env, cwd=str(log.parent))
    server = VllmServer(f"http://127.0.0.1:{port}", proc, log, 0.0)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode} before serving; log {log}:\n{tail(log)}")
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                server.started_in = time.monotonic() - start
                return server
        except requests.RequestException:
            pass
        if time.monotonic() - start > START_TIMEOUT:
            server.stop()
            raise RuntimeError(f"vLLM did not answer /health in {START_TIMEOUT:.0f} s; log {log}:\n{tail(log)}")
        time.sleep(1.0)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_MATERIALIZED = re.compile(r"soppu resolver: materialized soppu adapter (\S+) in \S+: downloaded (.*?) \((\d+) bytes\), "
                           r"reused (.*)$", re.M)


def materializations(log_text: str) -> list[tuple[str, list[str], list[str]]]:
    """(owner/name@version, downloaded paths, reused paths) per materialization the resolver logged."""
    def paths(text: str) -> list[str]:
        return [] if text.strip() == "nothing" else [p.strip() for p in text.split(",")]

    return [(m.group(1), paths(m.group(2)), paths(m.group(4))) for m in _MATERIALIZED.finditer(log_text)]


_RESIDENCY = re.compile(r"soppu compressed: (.*?); residency ((?:\w+=\d+ ?)+)$", re.M)


def residency_log(log_text: str) -> list[tuple[str, dict[str, int]]]:
    """(event, figures) per residency line the compressed path logged (``hooks._log_residency``), in order."""
    return [(m.group(1), {k: int(v) for k, v in (kv.split("=") for kv in m.group(2).split())})
            for m in _RESIDENCY.finditer(log_text)]
