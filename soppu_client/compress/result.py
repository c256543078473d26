"""The result of fitting one module: shared bases per cluster and one core per adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModuleFit:
    """dW_i ~ U[c_i] @ S_i @ V[c_i].T  (S_i [k, k] for method full, diag(S_i) with S_i [k] for diag)."""

    U: list[torch.Tensor]  # per cluster, [d_out, k]
    V: list[torch.Tensor]  # per cluster, [d_in, k]
    cores: torch.Tensor  # [N, k, k] or [N, k], adapter order of the collection
    cluster_of: list[int]  # adapter -> cluster
    diag: bool
    iterations: list[int] = field(default_factory=list)  # per cluster
    converged: list[bool] = field(default_factory=list)
    history: list[list[float]] = field(default_factory=list)  # per cluster, objective per iteration
    stored: Any = None  # quantize.QuantizedFit: what the bundle stores (set for --bits / --budget)
    stack: Any = None  # the FactorStack the fit ran on (unweighted fits), reused by the metrics, then dropped
