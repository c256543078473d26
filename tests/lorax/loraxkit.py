"""Helpers for tests against a real LoRAX checkout (imported by name; conftest holds the fixtures).

    LORAX_SRC     a predibase/lorax checkout at the pinned commit (read only: tests copy it)
    LORAX_PYTHON  an interpreter in which LoRAX's server requirements import (CPU build of torch);
                  see server_patches/README.md for how to set one up by hand
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def lorax_src() -> Path:
    value = os.environ.get("LORAX_SRC")
    if not value:
        pytest.skip("LORAX_SRC is not set (a predibase/lorax checkout at the pinned commit; see server_patches/README.md)")
    path = Path(value)
    if not (path / "server" / "lorax_server").is_dir():
        pytest.fail(f"LORAX_SRC={path} is not a LoRAX checkout (no server/lorax_server)")
    return path


def lorax_python() -> str:
    value = os.environ.get("LORAX_PYTHON")
    if not value:
        pytest.skip("LORAX_PYTHON is not set (an interpreter with LoRAX's server requirements; "
                    "see server_patches/README.md)")
    return value


def lorax_env(patched: Path, **extra: str) -> dict[str, str]:
    """Environment for a script run under LORAX_PYTHON on ``patched``: LoRAX's server, this repo and
    kernels/ on PYTHONPATH, CPU settings, offline hub. TRITON_INTERPRET is dropped: scripts/test.sh
    sets it for this repo's kernels, but LoRAX decorates its own Triton kernels at import time in a
    way the interpreter breaks; on CPU LoRAX takes its pure-PyTorch paths anyway."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"PYTHONPATH": os.pathsep.join([str(patched / "server"), str(REPO), str(REPO / "kernels")]),
                "DISABLE_SGMV": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra})
    return env


def copy_lorax(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".git", "pb", "__pycache__", "*.pyc"), symlinks=True)
    return dest


def apply_series(lorax_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server_patches", "apply", str(lorax_dir)], cwd=REPO,
                          capture_output=True, text=True)


def generate_stubs(python: str, lorax_dir: Path) -> None:
    """What LoRAX's `make gen-server` does, without its pip install: protoc + relative imports."""
    server = lorax_dir / "server"
    pb = server / "lorax_server" / "pb"
    pb.mkdir(exist_ok=True)
    subprocess.run([python, "-m", "grpc_tools.protoc", "-I../proto", "--python_out=lorax_server/pb",
                    "--grpc_python_out=lorax_server/pb", "../proto/generate.proto"],
                   cwd=server, check=True, capture_output=True)
    for f in pb.glob("*.py"):
        f.write_text(re.sub(r"^(import.*pb2)", r"from . \1", f.read_text(), flags=re.M))
    (pb / "__init__.py").touch()
