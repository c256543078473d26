"""Ahead-of-time compile checks, no GPU needed: Triton -> cubin for sm_80/sm_90, nvcc -c for csrc/*.cu.

The full matrix runs with ``python -m soppu_kernels._compile_check``; here a subset keeps the
module near half a minute per Triton version. Triton compiles run in one subprocess per arch
(never in a process that ran kernels under TRITON_INTERPRET=1, which leaves triton.language
patched). Besides the project's Triton, a second interpreter with another Triton version (the
GPU machines run Triton 3.6.0) is checked when SOPPU_TRITON36_PYTHON names it, e.g. a venv made
with ``pip install torch==2.13.0 triton==3.6.0``; without it those cases skip, saying so.
Every case must compile, target its arch, keep its matrix-vector loops free of barriers and,
for the fp32 GEMM tiles, not spill (ptxas -v).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from soppu_kernels import _compile_check as cc
from soppu_kernels._triton_kernels import ALL_KERNELS

pytest.importorskip("triton")

LEVEL = {90: "quick", 80: "smoke"}
TRITON36_ENV = "SOPPU_TRITON36_PYTHON"
INTERPRETERS = ("project", "triton36")
CASES = [
    (interp, arch, case.label)
    for interp in INTERPRETERS
    for arch, level in LEVEL.items()
    for case in cc.triton_cases(level)
]


def _python(interp: str) -> str | None:
    if interp == "project":
        return None  # this interpreter
    path = os.environ.get(TRITON36_ENV)
    if not path:
        pytest.skip(f"{TRITON36_ENV} is not set: no second Triton version to compile with")
    return path


_REPORTS: dict[str, dict[int, dict[str, dict[str, Any]]]] = {}


def _reports(interp: str) -> dict[int, dict[str, dict[str, Any]]]:
    if interp not in _REPORTS:
        python = _python(interp)
        _REPORTS[interp] = {
            arch: cc.compile_report_subprocess(level, arch, python=python) for arch, level in LEVEL.items()
        }
    return _REPORTS[interp]


def test_every_kernel_is_covered_on_both_archs() -> None:
    assert set(LEVEL) == set(cc.ARCHS)
    for arch, level in LEVEL.items():
        covered = {c.kernel for c in cc.triton_cases(level)}
        assert covered == set(ALL_KERNELS), f"sm_{arch} misses {set(ALL_KERNELS) - covered}"


@pytest.mark.parametrize("interp,arch,label", CASES, ids=[f"{i}-sm_{a}-{lbl}" for i, a, lbl in CASES])
def test_triton_compiles(interp: str, arch: int, label: str) -> None:
    rec = _reports(interp)[arch][label]
    assert rec["ok"], rec["error"]
    assert rec["target_ok"], f"ptx does not target sm_{arch}"
    if rec["kernel"] in ("shrink_kernel", "expand_kernel") and rec["dtype"] in ("fp16", "bf16"):
        assert rec["mma"], "fp16/bf16 GEMM tiles should use tensor cores (mma / wgmma)"
    assert cc.barrier_problem(rec) is None, cc.barrier_problem(rec)
    assert cc.spill_problem(rec) is None, cc.spill_problem(rec)


def test_second_triton_is_the_gpu_machines_version() -> None:
    """The second interpreter really carries another Triton (3.6.x, as on the GPU machines)."""
    rec = next(iter(_reports("triton36")[90].values()))
    assert rec["triton"].startswith("3.6"), rec["triton"]


def test_loop_barrier_counter_on_a_handwritten_ptx() -> None:
    ptx = "\n".join([
        "bar.sync 0;", "$L__BB0_1:", "ld.global.b32 %r1, [%rd1];", "bar.sync 0;", "@%p1 bra $L__BB0_1;",
        "$L__BB0_2:", "add.s32 %r2, %r2, 1;", "@%p2 bra $L__BB0_2;", "bar.sync 0;",
    ])
    assert cc.loop_barriers(ptx) == [1, 0]


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
