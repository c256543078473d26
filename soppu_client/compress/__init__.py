"""Joint diagonalization of LoRA collections: one shared basis per module, one core per adapter.

Public entry points: :class:`CompressConfig`, :func:`fit_module`, :func:`compress_collection`.
Methods: ``full`` (orthonormal bases, k x k cores; ``jd_full.py``) and ``diag`` (free bases,
diagonal cores; ``jd_diag.py``). Work streams module by module: peak memory is one module's
stacked factors across all adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from soppu_client.format.errors import InputError
from soppu_client.compress.cluster import assign_clusters
from soppu_client.compress.jd_diag import fit_jd_diag
from soppu_client.compress.jd_full import fit_jd_full
from soppu_client.compress.project import project_cores
from soppu_client.compress.result import ModuleFit
from soppu_client.compress.stack import WEIGHTINGS, FactorStack, stack_factors

METHODS = ("full", "diag")
STORAGE_DTYPES = ("auto", "float32", "bfloat16", "float16")

__all__ = [
    "METHODS",
    "WEIGHTINGS",
    "STORAGE_DTYPES",
    "CompressConfig",
    "ModuleFit",
    "FactorStack",
    "stack_factors",
    "fit_module",
    "assign_clusters",
    "project_cores",
    "iter_compressed_modules",
]


@dataclass(frozen=True)
class CompressConfig:
    """Options of one compression run (validated on construction)."""

    rank: int = 16
    method: str = "full"
    weighting: str = "equal"  # measured: README "Why these defaults"
    float64: bool = False
    seed: int = 0
    tol: float = 3e-5  # stop when an iteration lowers the (unsquared) error by less than tol x itself
    max_iter: int = 200
    dtype: str = "auto"  # storage dtype of basis and cores; auto: the adapters' own (bf16 in, bf16 out)
    clusters: int = 1  # adapter groups, each with its own bases (see cluster.py)
    # low-bit storage (quantize.py) and byte budget (budget.py); None: float at `dtype`, fixed `rank`
    bits: int | None = None
    group_size: int = 64
    budget: str | None = None  # "9x" (of the sources' bytes at bf16) or "2MB"; `rank` is then the largest k
    rounding: str = "gptq"  # gptq (error-aware) or absmax (naive baseline)
    # data-aware fit (calibration.py): auto uses the adapters' calibration.jsonl when present
    calibration: str = "none"
    calibration_output_power: float = 0.5  # a in Gamma^(a/2)
    calibration_input_power: float = 0.5  # b in Sigma^(b/2)
    calibration_damping: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise InputError(f"`rank` should be a positive integer, but the value passed is {self.rank!r}")
        if self.method not in METHODS:
            raise InputError(f"`method` should be one of {', '.join(METHODS)}, but the value passed is {self.method!r}")
        if self.weighting not in WEIGHTINGS:
            raise InputError(
                f"`weighting` should be one of {', '.join(WEIGHTINGS)}, but the value passed is {self.weighting!r}"
            )
        if not (self.tol > 0):
            raise InputError(f"`tol` should be a positive number, but the value passed is {self.tol!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise InputError(f"`max_iter` should be a positive integer, but the value passed is {self.max_iter!r}")
        if not isinstance(self.clusters, int) or self.clusters < 1:
            raise InputError(f"`clusters` should be a positive integer, but the value passed is {self.clusters!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise InputError(
                f"`dtype` should be one of {', '.join(STORAGE_DTYPES)}, but the value passed is {self.dtype!r}"
            )
        if self.bits is not None and self.bits not in (2, 3, 4, 8):
            raise InputError(f"`bits` should be one of 2, 3, 4, 8, but the value passed is {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise InputError(f"`group_size` should be a positive integer, but the value passed is {self.group_size!r}")
        if self.rounding not in ("gptq", "absmax"):
            raise InputError(f"`rounding` should be gptq or absmax, but the value passed is {self.rounding!r}")
        if self.budget is not None and self.diag:
            raise InputError("`budget` needs method full (orthonormal bases); drop --budget or use --method full")
        if self.calibration not in ("auto", "none"):
            raise InputError(f"`calibration` should be auto or none, but the value passed is {self.calibration!r}")
        for field_name in ("calibration_output_power", "calibration_input_power", "calibration_damping"):
            if not (getattr(self, field_name) >= 0):
                raise InputError(f"`{field_name}` should be >= 0, but the value passed is "
                                 f"{getattr(self, field_name)!r}")

    @property
    def quantized(self) -> bool:
        """Stored through quantize.py / budget.py (--bits or --budget)."""
        return self.bits is not None or self.budget is not None

    @property
    def diag(self) -> bool:
        return self.method == "diag"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.float64 else torch.float32

    def to_json(self) -> dict:
        return {
            "rank": self.rank,
            "method": self.method,
            "weighting": self.weighting,
            "float64": self.float64,
            "seed": self.seed,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "dtype": self.dtype,
            "clusters": self.clusters,
            **({"bits": self.bits, "group_size": self.group_size, "budget": self.budget, "rounding": self.rounding}
               if self.quantized else {}),
            "calibration": self.calibration,
            **({"calibration_output_power": self.calibration_output_power,
                "calibration_input_power": self.calibration_input_power,
                "calibration_damping": self.calibration_damping} if self.calibration != "none" else {}),
        }


def fit_module(
    factors: list[tuple[np.ndarray, np.ndarray]],
    config: CompressConfig,
    cluster_of: list[int] | None = None,
) -> ModuleFit:
    """Fit one module's shared bases (one per cluster) and every adapter's core."""
    n = len(factors)
    cluster_of = list(cluster_of) if cluster_of is not None else [0] * n
    n_clusters = max(cluster_of) + 1
    stack = stack_factors(factors, config.weighting, config.torch_dtype)
    fit = fit_jd_diag if config.diag else fit_jd_full
    k = config.rank
    cores = torch.zeros((n, k) if config.diag else (n, k, k), dtype=config.torch_dtype)
    result = ModuleFit(U=[], V=[], cores=cores, cluster_of=cluster_of, diag=config.diag, stack=stack)
    for c in range(n_clusters):
        members = [i for i, ci in enumerate(cluster_of) if ci == c]
        sub = stack if n_clusters == 1 else stack.subset(members)
        U, V, S, it, conv, hist = fit(sub, k, tol=config.tol, max_iter=config.max_iter, seed=config.seed + c)
        result.U.append(U)
        result.V.append(V)
        cores[members] = S
        result.iterations.append(it)
        result.converged.append(conv)
        result.history.append(hist)
    return result


def iter_compressed_modules(
    collection, config: CompressConfig, cluster_of: list[int] | None = None, progress: Callable | None = None,
    stats: dict | None = None,
) -> Iterator[tuple[str, list[tuple[np.ndarray, np.ndarray]], ModuleFit]]:
    """Stream ``(module, factors, fit)`` over the collection's modules, one module in memory at a time.

    ``stats`` (module -> calibration.ModuleStats): fit under the data-aware weighted objective.
    """
    too_small = [
        f"`{m}` ({d_out} x {d_in})" for m, (d_out, d_in) in collection.shapes.items() if config.rank > min(d_out, d_in)
    ]
    if too_small:
        raise InputError(
            f"`rank` {config.rank} exceeds the smaller dimension of module {too_small[0]}"
            + (f" and {len(too_small) - 1} more" if len(too_small) > 1 else "")
            + "; choose a smaller --rank"
        )
    modules = collection.modules
    iterator = progress(modules) if progress else modules
    np_dtype = np.float64 if config.float64 else np.float32
    for module in iterator:
        factors = collection.module_factors(module, dtype=np_dtype)
        if stats is not None:
            from soppu_client.compress.calibration import weighted_module_fit

            yield module, factors, weighted_module_fit(factors, stats[module], config, cluster_of)
        else:
            yield module, factors, fit_module(factors, config, cluster_of)
