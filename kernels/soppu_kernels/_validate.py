"""Argument checks shared by the reference, Triton and CUDA paths.

Shape, dtype and device checks read only tensor metadata (no device sync), so every backend runs
them. ``check_routing_indices`` reads index values (a device sync on GPU); only the references run it.
Every problem found is collected and raised once, naming the argument and echoing the bad value.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _raise(problems: list[str], op: str) -> None:
    if problems:
        raise ValueError(f"{op}: " + "; ".join(problems))


def check_shared_basis(
    y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    adapter_index: torch.Tensor,
    cluster_of_adapter: torch.Tensor | None,
    *,
    diag: bool,
) -> None:
    """Raise ValueError listing every shape/dtype/device mismatch of a shared_basis_lora call."""
    p: list[str] = []
    if x.dim() != 2:
        p.append(f"`x` must be [T, d_in], got shape {tuple(x.shape)}")
    if y.dim() != 2:
        p.append(f"`y` must be [T, d_out], got shape {tuple(y.shape)}")
    if U.dim() != 3:
        p.append(f"`U` must be [C, d_out, k], got shape {tuple(U.shape)}")
    if V.dim() != 3:
        p.append(f"`V` must be [C, d_in, k], got shape {tuple(V.shape)}")
    want_s = 2 if diag else 3
    if S.dim() != want_s:
        form = "[N, k]" if diag else "[N, k, k]"
        p.append(f"`S` must be {form} with diag={diag}, got shape {tuple(S.shape)}")
    if adapter_index.dim() != 1:
        p.append(f"`adapter_index` must be [T], got shape {tuple(adapter_index.shape)}")
    _raise(p, "shared_basis_lora")
    T, d_in = x.shape
    C, d_out, k = U.shape
    if y.shape[0] != T:
        p.append(f"`y` has {y.shape[0]} rows but `x` has {T}")
    if adapter_index.shape[0] != T:
        p.append(f"`adapter_index` has {adapter_index.shape[0]} entries but `x` has {T} rows")
    if y.shape[1] != d_out:
        p.append(f"`y` has {y.shape[1]} columns but `U` has d_out={d_out}")
    if tuple(V.shape) != (C, d_in, k):
        p.append(f"`V` must be {(C, d_in, k)} (C, d_in, k), got {tuple(V.shape)}")
    want = (S.shape[0], k) if diag else (S.shape[0], k, k)
    if tuple(S.shape) != want:
        p.append(f"`S` must be {want} for k={k}, got {tuple(S.shape)}")
    if cluster_of_adapter is not None:
        if cluster_of_adapter.dim() != 1 or cluster_of_adapter.shape[0] != S.shape[0]:
            p.append(
                f"`cluster_of_adapter` must be [N={S.shape[0]}], got {tuple(cluster_of_adapter.shape)}"
            )
        if cluster_of_adapter.dtype not in INDEX_DTYPES:
            p.append(f"`cluster_of_adapter` must be int32/int64, got {cluster_of_adapter.dtype}")
    elif C != 1:
        p.append(f"`cluster_of_adapter` is None but there are C={C} clusters")
    for name, t in (("y", y), ("x", x), ("U", U), ("V", V), ("S", S)):
        if t.dtype not in FLOAT_DTYPES:
            p.append(f"`{name}` must be float16/bfloat16/float32, got {t.dtype}")
    if adapter_index.dtype not in INDEX_DTYPES:
        p.append(f"`adapter_index` must be int32/int64, got {adapter_index.dtype}")
    tensors = [("y", y), ("x", x), ("U", U), ("V", V), ("S", S), ("adapter_index", adapter_index)]
    if cluster_of_adapter is not None:
        tensors.append(("cluster_of_adapter", cluster_of_adapter))
    devices = {name: t.device for name, t in tensors}
    if len(set(devices.values())) > 1:
        p.append(f"all tensors must be on one device, got {devices}")
    _raise(p, "shared_basis_lora")


def check_same_float_dtype(op: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError unless every named tensor has the same float dtype (kernels need one)."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"{op}: these tensors must share one dtype, got {dtypes}")


def check_core_mv(h: torch.Tensor, S: torch.Tensor, *, diag: bool) -> None:
    """Raise ValueError unless h is [T, k] and S is [N, k] (diag) or [N, k, k] (full)."""
    p: list[str] = []
    if h.dim() != 2:
        p.append(f"`h` must be [T, k], got shape {tuple(h.shape)}")
    else:
        k = h.shape[1]
        want = (k,) if diag else (k, k)
        if S.dim() != 1 + len(want) or tuple(S.shape[1:]) != want:
            p.append(f"`S` must be [N, {', '.join(map(str, want))}] with diag={diag}, got {tuple(S.shape)}")
    _raise(p, "core_mv")


def check_dense_lora(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, adapter_index: torch.Tensor
) -> None:
    """Raise ValueError listing every shape mismatch of a dense_lora call."""
    p: list[str] = []
    if x.dim() != 2 or y.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        p.append(
            "want x [T, d_in], y [T, d_out], A [N, r, d_in], B [N, d_out, r]; got "
            f"x {tuple(x.shape)}, y {tuple(y.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
        _raise(p, "dense_lora")
    N, r, d_in = A.shape
    if x.shape[1] != d_in:
        p.append(f"`x` has d_in={x.shape[1]} but `A` has {d_in}")
    if tuple(B.shape) != (N, y.shape[1], r):
        p.append(f"`B` must be {(N, y.shape[1], r)} (N, d_out, r), got {tuple(B.shape)}")
    if adapter_index.shape != (x.shape[0],) or y.shape[0] != x.shape[0]:
        p.append(
            f"`x`, `y`, `adapter_index` must have T rows, got {x.shape[0]}, {y.shape[0]}, "
            f"{tuple(adapter_index.shape)}"
        )
    _raise(p, "dense_lora")


def check_routing_indices(
    adapter_index: torch.Tensor,
    cluster_of_adapter: torch.Tensor | None,
    num_adapters: int,
    num_clusters: int,
) -> None:
    """Raise ValueError if an adapter index is outside [-1, N) or a cluster outside [0, C).

    Reads values (device sync): references only.
    """
    p: list[str] = []
    if adapter_index.numel():
        lo, hi = int(adapter_index.min()), int(adapter_index.max())
        if lo < -1 or hi >= num_adapters:
            bad = adapter_index[(adapter_index < -1) | (adapter_index >= num_adapters)]
            p.append(
                f"`adapter_index` values must be in [-1, {num_adapters}) (-1 = no adapter), "
                f"got {bad[:8].tolist()}"
            )
    if cluster_of_adapter is not None and cluster_of_adapter.numel():
        bad = cluster_of_adapter[(cluster_of_adapter < 0) | (cluster_of_adapter >= num_clusters)]
        if bad.numel():
            p.append(f"`cluster_of_adapter` values must be in [0, {num_clusters}), got {bad[:8].tolist()}")
    _raise(p, "index check")
