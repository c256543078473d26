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


def _gemm_blocks(dt: str, k: int, op: str) -> tuple[int, int]:
    """triton_ops._gemm_blocks for a large batch on a GPU (kept in step with it by hand)."""
    if dt == "fp32":
        return 32, (16 if op == "shrink" and k > 32 else 32)
    return 64, 64


def _shrink(dt: str, k: int) -> TritonCase:
    prec = "ieee" if dt == "fp32" else "tf32"
    bm, bk = _gemm_blocks(dt, k, "shrink")
    return TritonCase(
        "shrink_kernel", dt,
        dict(BLOCK_M=bm, BLOCK_N=max(16, k), BLOCK_K=bk, ATOMIC=True, CAST_FP32=False, PREC=prec),
    )


def _expand(dt: str, k: int) -> TritonCase:
    prec = "ieee" if dt == "fp32" else "tf32"
    bm, bn = _gemm_blocks(dt, k, "expand")
    return TritonCase(
        "expand_kernel", dt, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=max(16, k), CAST_FP32=False, PREC=prec)
    )


def _block_d(k: int) -> int:
    return max(16, min(128, 4096 // k))


def _fused(dt: str, k: int, diag: bool, *, has_coa: bool = True, h_given: bool = False) -> TritonCase:
    return TritonCase(
        "fused_decode_kernel", dt,
        dict(DIAG=diag, HAS_COA=has_coa, H_GIVEN=h_given, BLOCK_D=_block_d(k), BLOCK_N=128, BLOCK_K=k),
    )


def _decode_shrink(dt: str, k: int, *, has_coa: bool = False) -> TritonCase:
    return TritonCase(
        "decode_shrink_kernel", dt, dict(HAS_COA=has_coa, ATOMIC=True, BLOCK_D=_block_d(k), BLOCK_K=k)
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
                _decode_shrink("bf16", 16), _bgmv(16, False), _sgmv(16, True), *_lora("bf16")]
    if level == "quick":
        return [
            _shrink("fp16", 16), _shrink("fp16", 64), _shrink("bf16", 16), _shrink("fp32", 16),
            _expand("fp16", 16), _expand("fp16", 64), _expand("bf16", 16), _expand("fp32", 16),
            _shrink("fp32", 64), _expand("fp32", 64),
            _fused("fp16", 16, False), _fused("fp16", 16, True), _fused("bf16", 64, False),
            _fused("fp16", 16, False, has_coa=False), _fused("fp16", 16, False, has_coa=False, h_given=True),
            _fused("fp32", 64, True, h_given=True),
            _decode_shrink("fp16", 16), _decode_shrink("bf16", 64, has_coa=True), _decode_shrink("fp32", 32),
            _bgmv(4, False), _bgmv(64, False), _bgmv(64, True), _sgmv(16, False), _sgmv(64, True),
            *_lora("fp16"), *_lora("bf16"),
        ]
    if level != "full":
        raise ValueError(f"`level` must be 'full', 'quick' or 'smoke', got {level!r}")
    cases: list[TritonCase] = []
    for dt in ("fp16", "bf16", "fp32"):
        for k in (16, 64):
            cases += [_shrink(dt, k), _expand(dt, k), _fused(dt, k, False), _fused(dt, k, True),
                      _fused(dt, k, False, has_coa=False, h_given=True), _decode_shrink(dt, k)]
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


#: Strides that are 1 for the contiguous tensors the launchers pass: Triton specialises an int
#: argument equal to 1 into a constant (unless the kernel lists it in do_not_specialize), which
#: changes tile layouts, so the compile check does the same.
_UNIT_STRIDES = {"stride_xd", "stride_yd", "stride_vk", "stride_uk", "stride_hk", "stride_gk",
                 "stride_mr", "stride_ad", "stride_br", "stride_sj"}


def _signature(jit_fn: Any, case: TritonCase) -> tuple[dict[str, str], dict[str, Any], dict[Any, Any]]:
    """(signature, specialised constants, attrs) as a launch on contiguous tensors of typical
    sizes would give: unit strides -> constant 1, pointers and other strides divisible by 16."""
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    attrs: dict[Any, Any] = {}
    for i, p in enumerate(jit_fn.params):
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
        elif name in _UNIT_STRIDES and not p.do_not_specialize:
            sig[name] = "constexpr"
            consts[name] = 1
            continue
        else:
            sig[name] = "i32"
            if not name.startswith("stride_") or p.do_not_specialize:
                continue
        if not p.do_not_specialize_on_alignment:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_triton(case: TritonCase, cc: int) -> Any:
    """Compile one case for ``GPUTarget("cuda", cc, 32)``; returns triton's CompiledKernel (has .asm)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _triton_kernels

    jit_fn = _jit_function(_triton_kernels.ALL_KERNELS[case.kernel])
    sig, consts, attrs = _signature(jit_fn, case)
    src = ASTSource(fn=jit_fn, signature=sig, constexprs={**consts, **case.constexprs}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32))


#: Kernels whose matrix-vector loops must carry no barrier (products accumulate in a register
#: tile, reduced once after the loop): every loop, or only the first (the d-loop of the fused
#: decode kernel when it computes h itself; its expand loop reduces once per output block).
NO_LOOP_BARRIER = ("decode_shrink_kernel", "lora_shrink_bgmv_kernel")
NO_FIRST_LOOP_BARRIER = ("fused_decode_kernel",)


def loop_barriers(ptx: str) -> list[int]:
    """Barriers (bar.sync / barrier.sync) in each outermost loop of ``ptx``, in program order.

    A loop is the lines from a label to the last later branch back to it."""
    lines = [ln.split("//", 1)[0].strip() for ln in ptx.splitlines()]
    labels: dict[str, int] = {}
    spans: list[tuple[int, int]] = []
    for i, text in enumerate(lines):
        if text.endswith(":") and " " not in text:
            labels[text[:-1]] = i
        elif text.startswith(("bra", "@")) and " bra" in f" {text}":
            target = text.rstrip(";").split()[-1]
            if target in labels:
                spans.append((labels[target], i))
    outer: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if outer and lo <= outer[-1][1]:
            outer[-1] = (outer[-1][0], max(hi, outer[-1][1]))
        else:
            outer.append((lo, hi))
    return [sum(lines[i].startswith(("bar.sync", "barrier.sync")) for i in range(lo, hi + 1)) for lo, hi in outer]


def barrier_problem(rec: dict[str, Any]) -> str | None:
    """Why a compiled case breaks the no-barrier-in-loop rule, or None."""
    bars = rec.get("loop_barriers") or []
    if rec["kernel"] in NO_LOOP_BARRIER and sum(bars):
        return f"barriers in its loops: {bars}"
    if rec["kernel"] in NO_FIRST_LOOP_BARRIER and not rec.get("h_given") and bars and bars[0]:
        return f"barriers in its d-loop: {bars}"
    return None


def spill_problem(rec: dict[str, Any]) -> str | None:
    """fp32 shrink / expand GEMM tiles must not spill (their block sizes are chosen for it); other
    cases report spill_bytes without failing."""
    if rec["kernel"] in ("shrink_kernel", "expand_kernel") and rec["dtype"] == "fp32" and rec.get("spill_bytes"):
        return f"fp32 GEMM tile spills {rec['spill_bytes']} bytes"
    return None


def ptxas_spills(ptx: str) -> int | None:
    """Bytes of register spill stores + loads ptxas reports for ``ptx`` (Triton's bundled ptxas),
    or None when no ptxas is found."""
    import re

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        arch_m = re.search(r"^\.target\s+sm_(\d+)(a?)", ptx, re.M)
        arch = int(arch_m.group(1)) if arch_m else 90
        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - an older/newer Triton without this helper
        ptxas = shutil.which("ptxas")
        arch_m = None
    if not ptxas:
        return None
    gpu = f"sm_{arch_m.group(1)}{arch_m.group(2)}" if arch_m else "sm_90a"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([ptxas, "-v", f"-arch={gpu}", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        return None
    found = re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stdout + res.stderr)
    return sum(int(n) for n in found) if found else None


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

    Returns {label: {"kernel", "dtype", "ok", "error", "target_ok", "mma", "loop_barriers",
    "spill_bytes", "triton"}}; never raises for a kernel that fails to compile (the error text is
    recorded). spill_bytes is None where ptxas could not be run.
    """
    import triton

    out: dict[str, dict[str, Any]] = {}
    for case in triton_cases(level):
        rec: dict[str, Any] = {"kernel": case.kernel, "dtype": case.dtype, "ok": False, "error": None,
                               "triton": triton.__version__, "h_given": bool(case.constexprs.get("H_GIVEN"))}
        try:
            kernel = compile_triton(case, arch)
            ptx = kernel.asm["ptx"]
            rec.update(ok=bool(kernel.asm["cubin"]), target_ok=f".target sm_{arch}" in ptx, mma="mma" in ptx,
                       loop_barriers=loop_barriers(ptx), spill_bytes=ptxas_spills(ptx))
        except Exception as e:  # noqa: BLE001 - reported to the caller
            rec["error"] = f"{type(e).__name__}: {e}"[-2000:]
        out[case.label] = rec
    return out


def compile_report_subprocess(
    level: str, arch: int, timeout: float = 600, python: str | None = None
) -> dict[str, dict[str, Any]]:
    """``compile_report`` in a fresh interpreter with TRITON_INTERPRET unset.

    The compile checks must not share a process with kernels run under TRITON_INTERPRET=1: the
    interpreter leaves triton.language patched, and code generation then fails.
    python: another interpreter (e.g. a venv with a second Triton version) to run it with; it
    imports this package through PYTHONPATH, so it needs only torch and triton installed.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pkg_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
    cmd = [python or sys.executable, "-m", "soppu_kernels._compile_check", "--json", "--level", level,
           "--arch", str(arch)]
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
            bad = not rec["ok"] or barrier_problem(rec) or spill_problem(rec)
            failed += bool(rec["ok"] and bad)
            status = "ok  " if not bad else "FAIL"
            detail = f": {rec['error']}" if rec["error"] else (
                f" loop_barriers={rec.get('loop_barriers')} spill_bytes={rec.get('spill_bytes')}")
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
