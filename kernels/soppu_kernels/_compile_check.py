"""Ahead-of-time compile checks that need no GPU: Triton to cubin for sm_80/sm_90, nvcc -c for the CUDA source.

Run all of them with ``python -m soppu_kernels._compile_check``; tests/kernels/test_kernels_compile.py
runs the same functions (the Triton ones in a subprocess: see ``compile_report_subprocess``).
The Triton configurations mirror what ``triton_ops`` launches on a GPU
(CAST_FP32=False, GPU block sizes), for fp16/bf16/fp32 and small/large ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
ARCHS: tuple[int, ...] = (80, 90)

_FLOAT_PTRS = {"x_ptr", "y_ptr", "u_ptr", "v_ptr", "a_ptr", "b_ptr"}
_FP32_PTRS = {"h_ptr", "g_ptr", "mid_ptr", "s_ptr"}
_INDEX_PTRS = {"idx_ptr", "order_ptr", "cstart_ptr", "seg_start_ptr", "seg_adapter_ptr", "coa_ptr"}
_TL_DTYPE = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


@dataclass(frozen=True)
class TritonCase:
    """One kernel specialisation to compile: kernel name, operand dtype, constexpr values."""

    kernel: str
    dtype: str  # "fp16" | "bf16" | "fp32": x, y, U, V, A, B
    constexprs: dict[str, Any] = field(hash=False)

    @property
    def label(self) -> str:
        ce = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()))
        return f"{self.kernel}[{self.dtype};{ce}]"


def _shrink(dt: str, k: int) -> TritonCase:
    prec = "ieee" if dt == "fp32" else "tf32"
    return TritonCase(
        "shrink_kernel", dt,
        dict(BLOCK_M=64, BLOCK_N=max(16, k), BLOCK_K=64, ATOMIC=True, CAST_FP32=False, PREC=prec),
    )


def _expand(dt: str, k: int) -> TritonCase:
    prec = "ieee" if dt == "fp32" else "tf32"
    return TritonCase(
        "expand_kernel", dt, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=max(16, k), CAST_FP32=False, PREC=prec)
    )


def _fused(dt: str, k: int, diag: bool) -> TritonCase:
    return TritonCase(
        "fused_decode_kernel", dt,
        dict(DIAG=diag, BLOCK_D=max(16, min(128, 4096 // k)), BLOCK_N=128, BLOCK_K=k),
    )


def _bgmv(k: int, diag: bool) -> TritonCase:
    return TritonCase("core_bgmv_kernel", "fp32", dict(DIAG=diag, BLOCK_K=k))


def _sgmv(k: int, diag: bool) -> TritonCase:
    return TritonCase("core_sgmv_kernel", "fp32", dict(DIAG=diag, BLOCK_M=16, BLOCK_K=max(16, k), SPLIT=4))


def _lora(dt: str) -> list[TritonCase]:
    return [
        TritonCase("lora_shrink_bgmv_kernel", dt, dict(BLOCK_D=256, BLOCK_R=16)),
        TritonCase("lora_expand_bgmv_kernel", dt, dict(BLOCK_N=128, BLOCK_R=16)),
    ]


def triton_cases(level: str = "full") -> list[TritonCase]:
    """The specialisations the compile check covers (GPU launch settings of ``triton_ops``).

    level "full": every kernel x fp16/bf16/fp32 x ranks 4/16/64 x diag/full.
    "quick" (the test suite, sm_90): every kernel, every dtype for the tensor-core GEMMs, ranks 4-64.
    "smoke" (the test suite, sm_80): each kernel once, bf16 where it has a float operand.
    """
    if level == "smoke":
        return [_shrink("bf16", 16), _expand("bf16", 16), _fused("bf16", 16, False),
                _bgmv(16, False), _sgmv(16, True), *_lora("bf16")]
    if level == "quick":
        return [
            _shrink("fp16", 16), _shrink("fp16", 64), _shrink("bf16", 16), _shrink("fp32", 16),
            _expand("fp16", 16), _expand("fp16", 64), _expand("bf16", 16), _expand("fp32", 16),
            _fused("fp16", 16, False), _fused("fp16", 16, True), _fused("bf16", 64, False),
            _bgmv(4, False), _bgmv(64, False), _bgmv(64, True), _sgmv(16, False), _sgmv(64, True),
            *_lora("fp16"), *_lora("bf16"),
        ]
    if level != "full":
        raise ValueError(f"`level` must be 'full', 'quick' or 'smoke', got {level!r}")
    cases: list[TritonCase] = []
    for dt in ("fp16", "bf16", "fp32"):
        for k in (16, 64):
            cases += [_shrink(dt, k), _expand(dt, k), _fused(dt, k, False), _fused(dt, k, True)]
        cases += _lora(dt)
    for k in (4, 16, 64):
        for diag in (False, True):
            cases += [_bgmv(k, diag), _sgmv(k, diag)]
    return cases


def _jit_function(kernel: Any) -> Any:
    """The JITFunction behind a kernel, also under TRITON_INTERPRET=1 (which wraps it)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn)  # triton.runtime.interpreter.InterpretedFunction


def _signature(jit_fn: Any, case: TritonCase) -> dict[str, str]:
    sig: dict[str, str] = {}
    for p in jit_fn.params:
        if p.is_constexpr:
            continue
        name = p.name
        if name in _FLOAT_PTRS:
            sig[name] = "*" + _TL_DTYPE[case.dtype]
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name in _INDEX_PTRS:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            raise KeyError(f"compile check: no dtype rule for pointer `{name}` of {case.kernel}")
        else:
            sig[name] = "i32"
    return sig


def compile_triton(case: TritonCase, cc: int) -> Any:
    """Compile one case for ``GPUTarget("cuda", cc, 32)``; returns triton's CompiledKernel (has .asm)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _triton_kernels

    jit_fn = _jit_function(_triton_kernels.ALL_KERNELS[case.kernel])
    src = ASTSource(fn=jit_fn, signature=_signature(jit_fn, case), constexprs=dict(case.constexprs))
    return triton.compile(src, target=GPUTarget("cuda", cc, 32))


def nvcc_path() -> str | None:
    """Path of nvcc, or None."""
    return shutil.which("nvcc")


def nvcc_compile(arch: int, out_dir: Path) -> Path:
    """``nvcc -c -arch=sm_<arch> csrc/core_bgmv.cu``; returns the object path, raises on failure."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH")
    obj = Path(out_dir) / f"core_bgmv_sm{arch}.o"
    cmd = [nvcc, "-c", f"-arch=sm_{arch}", "-O3", "-Werror", "all-warnings",
           str(CSRC_DIR / "core_bgmv.cu"), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{res.stdout}\n{res.stderr}")
    return obj


def binding_syntax_check() -> None:
    """``g++ -fsyntax-only`` of csrc/core_bgmv_binding.cpp against the installed torch headers."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++/c++) on PATH")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=soppu_core_bgmv"]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [f"-I{sysconfig.get_paths()['include']}", str(CSRC_DIR / "core_bgmv_binding.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"binding does not compile ({' '.join(cmd)}):\n{res.stderr[-4000:]}")


def compile_report(level: str, arch: int) -> dict[str, dict[str, Any]]:
    """Compile every case of ``level`` for sm_<arch> in this process.

    Returns {label: {"kernel", "dtype", "ok", "error", "target_ok", "mma"}}; never raises for a
    kernel that fails to compile (the error text is recorded).
    """
    out: dict[str, dict[str, Any]] = {}
    for case in triton_cases(level):
        rec: dict[str, Any] = {"kernel": case.kernel, "dtype": case.dtype, "ok": False, "error": None}
        try:
            kernel = compile_triton(case, arch)
            ptx = kernel.asm["ptx"]
            rec.update(ok=bool(kernel.asm["cubin"]), target_ok=f".target sm_{arch}" in ptx, mma="mma" in ptx)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            rec["error"] = f"{type(e).__name__}: {e}"[-2000:]
        out[case.label] = rec
    return out


def compile_report_subprocess(level: str, arch: int, timeout: float = 600) -> dict[str, dict[str, Any]]:
    """``compile_report`` in a fresh interpreter with TRITON_INTERPRET unset.

    The compile checks must not share a process with kernels run under TRITON_INTERPRET=1: the
    interpreter leaves triton.language patched, and code generation then fails.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "soppu_kernels._compile_check", "--json", "--level", level, "--arch", str(arch)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"compile check subprocess failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout)


def main(argv: list[str] | None = None) -> int:
    """Run the checks; print one line per check (or, with --json, the Triton report as JSON).

    Exit status 1 if any check failed.
    """
    ap = argparse.ArgumentParser(description="SOPPU kernel compile checks (no GPU needed)")
    ap.add_argument("--level", choices=["full", "quick", "smoke"], default="full")
    ap.add_argument("--arch", type=int, action="append", help="sm version, repeatable (default 80 and 90)")
    ap.add_argument("--json", action="store_true", help="Triton only; print {label: result} for one --arch")
    args = ap.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    if args.json:
        if len(archs) != 1:
            ap.error("--json takes exactly one --arch")
        print(json.dumps(compile_report(args.level, archs[0])))
        return 0
    failed = 0
    for arch in archs:
        for label, rec in compile_report(args.level, arch).items():
            failed += not rec["ok"]
            status = "ok  " if rec["ok"] else "FAIL"
            detail = f": {rec['error']}" if rec["error"] else ""
            print(f"{status} triton sm_{arch} {label}{detail}")
    with tempfile.TemporaryDirectory() as d:
        for arch in archs:
            try:
                nvcc_compile(arch, Path(d))
                print(f"ok   nvcc sm_{arch} core_bgmv.cu")
            except Exception as e:  # noqa: BLE001
                failed += 1
                print(f"FAIL nvcc sm_{arch}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
