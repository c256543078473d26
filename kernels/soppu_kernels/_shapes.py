"""Rank padding for bundles with per-module k (stacking layers of one type needs one k)."""

from __future__ import annotations

import torch


def pad_rank(t: torch.Tensor, k: int, *, axes: int = 1) -> torch.Tensor:
    """Semantics: ``t`` with its last ``axes`` dimensions (each of size k_m <= k) zero-padded to k.

    Bases U [..., d_out, k_m] / V [..., d_in, k_m] and diag cores [..., k_m]: ``axes=1``; full cores
    [..., k_m, k_m]: ``axes=2``. Padded U, V and S give the same U @ S @ V.T (the added columns and
    rows are zero), so layers of different k can be stacked and run by one kernel launch. Returns a
    new tensor (``t`` itself when nothing is padded); nothing is modified in place.
    """
    sizes = [int(s) for s in t.shape[t.ndim - axes:]]
    if len(sizes) != axes or any(s > k for s in sizes):
        raise ValueError(f"cannot pad the last {axes} dim(s) of a tensor of shape {tuple(t.shape)} to rank {k}")
    pad: list[int] = []
    for s in reversed(sizes):
        pad += [0, k - s]
    return torch.nn.functional.pad(t, pad) if any(pad) else t
