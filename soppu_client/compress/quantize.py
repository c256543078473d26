"""Low-bit storage of a module's fit: error-aware rounding of U, V and the cores.

Grid, packing and the [rows, cols] views are ``soppu_client.format.quant``'s. With weights w_i,
the error that matters is the fit's, E = sum_i w_i ||dW_i - U S_i V.T||_F^2, which is quadratic in
each factor:

* U (V, S fixed): E = tr((U - U*) H_U (U - U*).T) + const, H_U = sum_i w_i S_i V.T V S_i.T,
  U* = (sum_i w_i dW_i V S_i.T) H_U^-1 -- the least-squares U, not the fitted one;
* V likewise with H_V = sum_i w_i S_i.T U.T U S_i (U already quantized), V* = (sum_i w_i dW_i.T U S_i) H_V^-1;
* then the cores are refitted by least squares on the stored bases and rounded themselves.

``gptq`` rounds U* (and V*) column by column, each column's group scales chosen by a clip search
(the scale, among absmax/(2^(b-1)-1) times 1, 0.95, ..., 0.5 and absmax/2^(b-1), with the least
squared error per group), and spreads each column's rounding error over the columns not yet
rounded through the Cholesky factor of H^-1 (GPTQ, Frantar et al. 2022). ``absmax`` is the
baseline: scale = absmax / (2^(b-1) - 1) per group, round to nearest, no refit.
All of it works on factors (dW_i is never formed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from soppu_client.compress.result import ModuleFit
from soppu_client.compress.stack import FactorStack
from soppu_client.format.quant import QTensor, QuantSpec, matrix_view, pack_codes

ROUNDINGS = ("gptq", "absmax")
_CLIP = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
_TINY = 2.0 ** -24  # smallest positive fp16: scale of an all-zero group
_FP16_MAX = 65504.0

__all__ = ["ROUNDINGS", "QuantizedFit", "quantize_matrix", "quantize_module", "weighted_sq_residual"]


def _fp16(s: np.ndarray) -> np.ndarray:
    if np.any(s > _FP16_MAX):
        raise ValueError(f"a quantization scale ({float(s.max()):.3g}) overflows float16; store without --bits")
    return np.maximum(s, _TINY).astype(np.float16).astype(np.float64)


def _grouped(x: np.ndarray, g: int) -> np.ndarray:
    """[rows, cols] -> [groups, g, cols], rows zero-padded (zero is a level: padding costs no error)."""
    rows, cols = x.shape
    n = -(-rows // g)
    out = np.zeros((n * g, cols))
    out[:rows] = x
    return out.reshape(n, g, cols)


def _round(x: np.ndarray, scale_full: np.ndarray, spec: QuantSpec) -> np.ndarray:
    return np.clip(np.rint(x / scale_full) + spec.zero, 0, (1 << spec.bits) - 1)


def _scales(x: np.ndarray, spec: QuantSpec, search: bool) -> np.ndarray:
    """Group scales [groups, cols] of x [rows, cols]: absmax, or the clip search's best per group."""
    xg = _grouped(x, spec.group_size)
    amax = np.abs(xg).max(1)  # [groups, cols]
    base = amax / (spec.zero - 1 if spec.zero > 1 else 1)
    if not search:
        return _fp16(base)
    cands = [_fp16(base * f) for f in _CLIP] + [_fp16(amax / spec.zero)]
    best, best_err = cands[0], None
    for s in cands:
        q = (_round(xg, s[:, None, :], spec) - spec.zero) * s[:, None, :]
        err = ((xg - q) ** 2).sum(1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = np.where(better, s, best)
        best_err = np.where(better, err, best_err)
    return best


def _expand(scale: np.ndarray, rows: int, g: int) -> np.ndarray:
    return np.repeat(scale, g, axis=0)[:rows]


def quantize_matrix(x: np.ndarray, spec: QuantSpec, H: np.ndarray | None = None, *,
                    rounding: str = "gptq") -> tuple[np.ndarray, np.ndarray]:
    """(codes [rows, cols] uint8, scales [groups, cols] float16) of x [rows, cols], groups down columns.

    ``H`` [cols, cols]: the error metric tr(dX H dX.T); with ``gptq`` each rounded column's error is
    compensated on later columns (H None or one column: clip-searched rounding only). ``absmax``:
    naive absmax scales, round to nearest.
    """
    x = np.asarray(x, dtype=np.float64)
    rows, cols = x.shape
    g = spec.group_size
    if rounding == "absmax" or H is None or cols == 1:
        s = _scales(x, spec, search=rounding != "absmax")
        return _round(x, _expand(s, rows, g), spec).astype(np.uint8), s.astype(np.float16)
    H = np.asarray(H, dtype=np.float64)
    damp = 0.01 * max(float(np.mean(np.diag(H))), 1e-30)
    Hinv = np.linalg.inv(H + damp * np.eye(cols))
    Uc = np.linalg.cholesky(Hinv).T  # upper: Hinv = Uc.T Uc
    W = x.copy()
    codes = np.zeros((rows, cols), dtype=np.uint8)
    scales = np.zeros((-(-rows // g), cols))
    for j in range(cols):
        w = W[:, j:j + 1]
        s = _scales(w, spec, search=True)
        c = _round(w, _expand(s, rows, g), spec)
        q = (c - spec.zero) * _expand(s, rows, g)
        codes[:, j], scales[:, j] = c[:, 0], s[:, 0]
        err = (w - q)[:, 0] / Uc[j, j]
        W[:, j + 1:] -= np.outer(err, Uc[j, j + 1:])
    return codes, scales.astype(np.float16)


def _qtensor(x: np.ndarray, spec: QuantSpec, role: str, H: np.ndarray | None, rounding: str) -> QTensor:
    shape = tuple(x.shape)
    view = np.asarray(x, dtype=np.float64).reshape(matrix_view(shape, role))
    codes, scales = quantize_matrix(view, spec, H, rounding=rounding)
    return QTensor(packed=pack_codes(codes, spec.bits), scale=scales, spec=spec, shape=shape, role=role)


@dataclass
class QuantizedFit:
    """What is stored for one module (QTensor or float tensors) and its dequantized float64 values."""

    U: list  # per cluster: QTensor or torch.Tensor
    V: list
    cores: list | torch.Tensor  # list of QTensor per adapter, or the float cores [N, ...]
    U_values: list[np.ndarray]
    V_values: list[np.ndarray]
    core_values: list[np.ndarray]


def _pinv(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(M, hermitian=True)


def _refit_cores(stack: FactorStack, idx: list[int], U: torch.Tensor, V: torch.Tensor, diag: bool) -> torch.Tensor:
    """Least-squares cores on fixed (not necessarily orthonormal) bases: argmin ||dW_i - U S V.T||."""
    C = stack.Bt[idx] @ U  # [n, r, k] = (U.T B_i).T
    AV = stack.A[idx] @ V  # [n, r, k]
    if diag:
        M = (U.T @ U) * (V.T @ V)
        return ((C * AV).sum(1) @ _pinv(M)).to(U.dtype)
    return _pinv(U.T @ U) @ (C.transpose(1, 2) @ AV) @ _pinv(V.T @ V)


def _full(S: torch.Tensor, diag: bool) -> torch.Tensor:
    return torch.diag_embed(S) if diag else S


def quantize_module(stack: FactorStack, fit: ModuleFit, basis: QuantSpec | None, cores: QuantSpec | None, *,
                    rounding: str = "gptq") -> QuantizedFit:
    """Quantize one module's fit (bases per cluster, then refitted cores) as the module doc says.

    ``basis`` / ``cores``: the spec of each role, None to keep it float (values returned unrounded).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r} is not one of {ROUNDINGS}")
    f64 = torch.float64
    stack = FactorStack(stack.A.to(f64), stack.Bt.to(f64), stack.weights.to(f64), stack.sq_norms.to(f64))
    w = stack.weights
    n = stack.n
    out_U, out_V, U_vals, V_vals = [], [], [], []
    S_all = [None] * n
    for c in range(len(fit.U)):
        idx = [i for i, ci in enumerate(fit.cluster_of) if ci == c]
        U, V = fit.U[c].to(f64), fit.V[c].to(f64)
        S = fit.cores[idx].to(f64)
        if basis is not None:
            if rounding == "gptq":
                wi = w[idx].view(-1, 1, 1)
                Sf = _full(S, fit.diag)
                AV = stack.A[idx] @ V  # [n, r, k]
                H_U = (wi * Sf @ (V.T @ V) @ Sf.transpose(1, 2)).sum(0)
                G_U = (wi * stack.Bt[idx].transpose(1, 2) @ AV @ Sf.transpose(1, 2)).sum(0)  # sum w dW V S.T
                U_t = G_U @ _pinv(H_U)
                qU = _qtensor(U_t.numpy(), basis, "basis", H_U.numpy(), rounding)
                Uq = torch.from_numpy(qU.dequantize()).to(f64)
                BU = stack.Bt[idx] @ Uq  # [n, r, k] = (B_i.T U)
                H_V = (wi * Sf.transpose(1, 2) @ (Uq.T @ Uq) @ Sf).sum(0)
                G_V = (wi * stack.A[idx].transpose(1, 2) @ BU @ Sf).sum(0)  # sum w dW.T U S
                V_t = G_V @ _pinv(H_V)
                qV = _qtensor(V_t.numpy(), basis, "basis", H_V.numpy(), rounding)
                Vq = torch.from_numpy(qV.dequantize()).to(f64)
                S = _refit_cores(stack, idx, Uq, Vq, fit.diag)
            else:
                qU = _qtensor(U.numpy(), basis, "basis", None, rounding)
                qV = _qtensor(V.numpy(), basis, "basis", None, rounding)
                Uq = torch.from_numpy(qU.dequantize()).to(f64)
                Vq = torch.from_numpy(qV.dequantize()).to(f64)
            out_U.append(qU)
            out_V.append(qV)
            U, V = Uq, Vq
        else:
            out_U.append(fit.U[c])
            out_V.append(fit.V[c])
        U_vals.append(U.numpy())
        V_vals.append(V.numpy())
        for j, i in enumerate(idx):
            S_all[i] = S[j]
    if cores is not None:
        q_cores = [_qtensor(s.numpy(), cores, "cores", None, rounding) for s in S_all]
        core_vals = [q.dequantize().astype(np.float64) for q in q_cores]
        stored: list | torch.Tensor = q_cores
    else:
        stored = torch.stack(S_all).to(fit.cores.dtype)
        core_vals = [s.numpy() for s in S_all]
    return QuantizedFit(U=out_U, V=out_V, cores=stored, U_values=U_vals, V_values=V_vals, core_values=core_vals)


def weighted_sq_residual(stack: FactorStack, U: list[np.ndarray], V: list[np.ndarray], cores: list[np.ndarray],
                         cluster_of: list[int]) -> np.ndarray:
    """w_i ||dW_i - U S_i V.T||_F^2 per adapter, from factors (Gram identity, float64)."""
    f64 = torch.float64
    A, Bt = stack.A.to(f64), stack.Bt.to(f64)
    out = np.zeros(stack.n)
    for i in range(stack.n):
        c = cluster_of[i]
        Uc, Vc = torch.as_tensor(U[c], dtype=f64), torch.as_tensor(V[c], dtype=f64)
        S = torch.as_tensor(cores[i], dtype=f64)
        S = torch.diag(S) if S.ndim == 1 else S
        US = Uc @ S
        AV = A[i] @ Vc
        val = (stack.sq_norms[i].to(f64) - 2.0 * ((Bt[i] @ US) * AV).sum()
               + ((US.T @ US) * (Vc.T @ Vc)).sum())
        out[i] = float(stack.weights[i]) * max(float(val), 0.0)
    return out


def stored_values(stored: QuantizedFit, storage: torch.dtype) -> tuple[list[np.ndarray], list[np.ndarray],
                                                                       list[np.ndarray]]:
    """(U, V, cores) as float64 arrays of exactly what the bundle holds: dequantized codes, or the
    float tensors rounded to the storage dtype."""
    def value(x) -> np.ndarray:
        if isinstance(x, QTensor):
            return x.dequantize().astype(np.float64)
        return torch.as_tensor(x).to(storage).double().numpy()

    cores = stored.cores if isinstance(stored.cores, list) else list(stored.cores)
    return [value(u) for u in stored.U], [value(v) for v in stored.V], [value(c) for c in cores]
