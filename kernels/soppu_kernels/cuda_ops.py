"""CUDA path: csrc/core_bgmv.cu for the per-token core multiply, built just in time on first use.

The build (torch.utils.cpp_extension.load, nvcc + the host compiler) happens only when a CUDA
tensor reaches ``core_gather_mv``; importing this module compiles nothing. The GEMMs of
``shared_basis_lora`` run on cuBLAS (torch.matmul) over all clusters' bases side by side, so no
host sync is needed to split tokens by cluster.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from ._validate import check_core_mv, check_same_float_dtype, check_shared_basis

__all__ = ["CSRC_DIR", "core_gather_mv", "gemm_pipeline", "load_extension", "shared_basis_lora"]

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("core_bgmv_binding.cpp", "core_bgmv.cu")


@functools.cache
def load_extension(verbose: bool = False) -> ModuleType:
    """Build (once per process; torch caches the build on disk) and import the core_bgmv extension.

    Raises RuntimeError if CUDA is not available: the extension is only ever built on a GPU machine.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "the soppu CUDA extension is built only on a machine with a CUDA GPU; "
            "use backend='triton' (TRITON_INTERPRET=1 on CPU) or backend='reference'"
        )
    from torch.utils.cpp_extension import load

    return load(
        name="soppu_core_bgmv",
        sources=[str(CSRC_DIR / s) for s in _SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        verbose=verbose,
    )


def core_gather_mv(
    h: torch.Tensor, S: torch.Tensor, adapter_index: torch.Tensor, *, diag: bool
) -> torch.Tensor:
    """Semantics: g[t] = S[a] @ h[t] (diag: S[a] * h[t]) for a = adapter_index[t] >= 0; g[t] = 0 where a == -1.

    h: [T, k] float32 CUDA (other float dtypes are converted).  S: [N, k, k] (full) or [N, k]
    (diag), float32/float16/bfloat16.  adapter_index: [T] int32/int64 in [-1, N).
    Returns a new float32 tensor g [T, k]; nothing is modified.
    """
    check_core_mv(h, S, diag=diag)
    if h.device.type != "cuda":
        raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got `h` on {h.device}")
    ext = load_extension()
    with torch.cuda.device(h.device):
        stream = torch.cuda.current_stream(h.device).cuda_stream
        return ext.core_bgmv(h.float(), S, adapter_index, diag, stream)


def shared_basis_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    adapter_index: torch.Tensor,
    cluster_of_adapter: torch.Tensor | None = None,
    *,
    diag: bool,
) -> torch.Tensor:
    """Semantics: y[t] += U[c] @ (S[a] @ (V[c].T @ x[t])) for a = adapter_index[t] >= 0, c = cluster_of_adapter[a].

    cuBLAS GEMMs + the CUDA core kernel (see ``gemm_pipeline``).
    Shapes/dtypes as ``soppu_kernels.shared_basis_lora``; y is modified in place and returned.
    """
    if x.device.type != "cuda":
        raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got `x` on {x.device}")
    return gemm_pipeline(
        y, x, U, V, S, adapter_index, cluster_of_adapter, diag=diag, core_fn=core_gather_mv
    )


CoreFn = Callable[..., torch.Tensor]


def gemm_pipeline(
    y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    adapter_index: torch.Tensor,
    cluster_of_adapter: torch.Tensor | None = None,
    *,
    diag: bool,
    core_fn: CoreFn,
) -> torch.Tensor:
    """Semantics: y[t] += U[c] @ (core_fn(V[c].T @ x[t])) for a = adapter_index[t] >= 0, c = cluster_of_adapter[a].

    torch GEMMs around a per-token core multiply ``core_fn(h, S, adapter_index, diag=diag)``
    (the CUDA kernel on a GPU; any backend's core, so this glue is tested on CPU), which must
    return g[t] = 0 for index -1 (every core here does; the tests check it). With one cluster:
    h = x @ V[0], g = core(h), ``y.addmm_(g, U[0].T)``. With C clusters, h = x @ [V_0 .. V_{C-1}]
    is one GEMM of width C*k (output in x's dtype); each token keeps its cluster's k columns, the
    core runs, and the result is placed in its cluster's k columns of a zero [T, C*k] block before
    one ``addmm_`` with [U_0 .. U_{C-1}].T (C times the flops of per-cluster GEMMs; C is small).
    The epilogue is exact for rows with index -1: their g rows are zero, so they get y + 0.
    No host sync. y is modified in place (g is rounded to y's dtype before the last GEMM).
    """
    check_shared_basis(y, x, U, V, S, adapter_index, cluster_of_adapter, diag=diag)
    check_same_float_dtype("shared_basis_lora", y=y, x=x, U=U, V=V)
    T = x.shape[0]
    C, d_out, k = U.shape
    if T == 0 or k == 0:
        return y
    if C == 1:
        h = (x @ V[0]).float()
        g = core_fn(h, S, adapter_index, diag=diag)  # 0 rows where idx == -1
        return y.addmm_(g.to(U.dtype), U[0].T)
    idx = adapter_index.long()
    if cluster_of_adapter is None:
        tc = torch.zeros_like(idx)
    else:
        tc = torch.where(idx >= 0, cluster_of_adapter.long()[idx.clamp_min(0)], 0)
    V_cat = V.permute(1, 0, 2).reshape(V.shape[1], C * k)  # [d_in, C*k]
    h_all = (x @ V_cat).float().view(T, C, k)
    h = h_all.gather(1, tc.view(T, 1, 1).expand(T, 1, k)).squeeze(1)  # [T, k]
    g = core_fn(h, S, adapter_index, diag=diag)  # 0 rows where idx == -1
    g_pad = torch.zeros(T, C, k, dtype=U.dtype, device=x.device)
    g_pad.scatter_(1, tc.view(T, 1, 1).expand(T, 1, k), g.view(T, 1, k).to(U.dtype))
    U_cat = U.permute(1, 0, 2).reshape(d_out, C * k)  # [d_out, C*k]
    return y.addmm_(g_pad.view(T, C * k), U_cat.T)
