"""Ahead-of-time compile checks, no GPU needed: Triton -> cubin for sm_80/sm_90, nvcc -c for csrc/*.cu.

The full matrix runs with ``python -m soppu_kernels._compile_check``; here a subset keeps the
module near half a minute. Triton compiles run in one subprocess per arch (never in a process
that ran kernels under TRITON_INTERPRET=1, which leaves triton.language patched).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from soppu_kernels import _compile_check as cc
from soppu_kernels._triton_kernels import ALL_KERNELS

pytest.importorskip("triton")

LEVEL = {90: "quick", 80: "smoke"}
CASES = [(arch, case.label) for arch, level in LEVEL.items() for case in cc.triton_cases(level)]


@pytest.fixture(scope="module")
def reports() -> dict[int, dict[str, dict[str, Any]]]:
    return {arch: cc.compile_report_subprocess(level, arch) for arch, level in LEVEL.items()}


def test_every_kernel_is_covered_on_both_archs() -> None:
    assert set(LEVEL) == set(cc.ARCHS)
    for arch, level in LEVEL.items():
        covered = {c.kernel for c in cc.triton_cases(level)}
        assert covered == set(ALL_KERNELS), f"sm_{arch} misses {set(ALL_KERNELS) - covered}"


@pytest.mark.parametrize("arch,label", CASES, ids=[f"sm_{a}-{lbl}" for a, lbl in CASES])
def test_triton_compiles(reports: dict[int, dict[str, dict[str, Any]]], arch: int, label: str) -> None:
    rec = reports[arch][label]
    assert rec["ok"], rec["error"]
    assert rec["target_ok"], f"ptx does not target sm_{arch}"
    if rec["kernel"] in ("shrink_kernel", "expand_kernel") and rec["dtype"] in ("fp16", "bf16"):
        assert rec["mma"], "fp16/bf16 GEMM tiles should use tensor cores (mma / wgmma)"


@pytest.mark.parametrize("arch", cc.ARCHS)
def test_cuda_source_compiles_with_nvcc(arch: int, tmp_path: Path) -> None:
    if cc.nvcc_path() is None:
        pytest.skip("nvcc not on PATH: cannot compile csrc/core_bgmv.cu")
    obj = cc.nvcc_compile(arch, tmp_path)
    assert obj.stat().st_size > 0


@pytest.mark.slow
def test_torch_binding_compiles() -> None:
    """g++ -fsyntax-only of csrc/core_bgmv_binding.cpp against torch's headers (~30-60 s)."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on PATH")
    cc.binding_syntax_check()
