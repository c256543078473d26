"""Case generation, inputs and tolerances shared by the kernel tests (fixed seeds, small sizes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

POPULARITY = ("distinct", "zipf", "identical", "one_hot")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (rtol, atol) for outputs of O(1) magnitude. Under the interpreter kernels compute in fp32 like the
# reference, so the only difference is the final rounding of y (<= 1 ulp); on a GPU fp16/bf16
# intermediates also go through tensor cores: GPU_TOL.
TOL = {"fp32": (1e-4, 1e-4), "fp16": (1e-2, 1e-2), "bf16": (2e-2, 5e-2)}
GPU_TOL = {"fp32": (2e-4, 2e-4), "fp16": (2e-2, 2e-2), "bf16": (4e-2, 1e-1)}


def adapter_indices(
    T: int, N: int, popularity: str, neg_frac: float, gen: torch.Generator
) -> torch.Tensor:
    """adapter_index [T] int64 in [-1, N).

    distinct: consecutive tokens take consecutive adapters (all distinct when N >= T);
    zipf: p(a) ~ 1 / (a + 1)^1.1; identical: every token the same adapter;
    one_hot: exactly one token has an adapter, all others -1.
    neg_frac: fraction of tokens then set to -1 (no adapter), at random positions.
    """
    if popularity == "distinct":
        start = int(torch.randint(0, N, (1,), generator=gen))
        idx = (torch.arange(T) + start) % N
    elif popularity == "zipf":
        p = 1.0 / torch.arange(1, N + 1, dtype=torch.float64) ** 1.1
        idx = torch.multinomial(p, T, replacement=True, generator=gen)
        idx = torch.randperm(N, generator=gen)[idx]  # popular adapter is not always 0
    elif popularity == "identical":
        idx = torch.full((T,), int(torch.randint(0, N, (1,), generator=gen)))
    elif popularity == "one_hot":
        idx = torch.full((T,), -1)
        if T:
            idx[int(torch.randint(0, T, (1,), generator=gen))] = int(torch.randint(0, N, (1,), generator=gen))
        return idx.long()
    else:
        raise ValueError(f"unknown popularity {popularity!r}")
    if neg_frac > 0 and T:
        drop = torch.rand(T, generator=gen) < neg_frac
        idx = torch.where(drop, -1, idx)
    return idx.long()


@dataclass(frozen=True)
class Case:
    """One shared_basis_lora configuration."""

    T: int
    d_in: int
    d_out: int
    k: int
    N: int
    C: int
    popularity: str
    neg_frac: float
    dtype: str
    diag: bool
    idx_dtype: torch.dtype = torch.int64

    @property
    def id(self) -> str:
        return (
            f"T{self.T}-in{self.d_in}-out{self.d_out}-k{self.k}-N{self.N}-C{self.C}-{self.popularity}"
            f"-neg{self.neg_frac}-{self.dtype}-{'diag' if self.diag else 'full'}"
            f"-{str(self.idx_dtype).removeprefix('torch.')}"
        )


def case_grid(n: int, *, max_hidden: int = 300) -> list[Case]:
    """n cases cycling every axis at co-prime periods, so pairs of axes mix (k x dtype all covered)."""
    ks = (4, 8, 16, 32, 64)
    hidden = ((64, 64), (129, 77), (200, 33), (257, 300), (31, 17), (96, 255))
    Ns = (1, 3, 17, 64, 128)
    Ts = (1, 7, 16, 33, 64)
    dts = ("fp32", "fp16", "bf16")
    out = []
    for i in range(n):
        d_in, d_out = hidden[(i + i // 6) % len(hidden)]
        out.append(
            Case(
                T=Ts[(i // 4) % len(Ts)],
                d_in=min(d_in, max_hidden),
                d_out=min(d_out, max_hidden),
                k=ks[i % len(ks)],
                N=Ns[(3 * i + i // 5) % len(Ns)],
                C=(1, 2, 3)[(i // 2) % 3],
                popularity=POPULARITY[i % 4],
                neg_frac=(0.0, 0.25)[(i // 3) % 2],
                dtype=dts[i % 3],
                diag=bool(i % 2),
                idx_dtype=(torch.int64, torch.int32)[(i // 2) % 2],
            )
        )
    return out


def make_inputs(case: Case, device: str | torch.device = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs scaled so both y and the adapter delta are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[case.dtype]

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    k = case.k
    S = rnd(case.N, k) if case.diag else rnd(case.N, k, k, scale=k**-0.5)
    idx = adapter_indices(case.T, case.N, case.popularity, case.neg_frac, gen)
    inputs = dict(
        y=rnd(case.T, case.d_out).to(dt),
        x=rnd(case.T, case.d_in).to(dt),
        U=rnd(case.C, case.d_out, k, scale=k**-0.5).to(dt),
        V=rnd(case.C, case.d_in, k, scale=case.d_in**-0.5).to(dt),
        S=S,
        adapter_index=idx.to(case.idx_dtype),
        cluster_of_adapter=torch.randint(0, case.C, (case.N,), generator=gen),
    )
    return {name: t.to(device) for name, t in inputs.items()}


def close(out: torch.Tensor, ref: torch.Tensor, dtype: str, *, gpu: bool = False) -> bool:
    """True when out matches ref within the dtype's tolerance."""
    rtol, atol = (GPU_TOL if gpu else TOL)[dtype]
    return torch.allclose(out.float().cpu(), ref.float().cpu(), rtol=rtol, atol=atol)


def assert_matches_reference(
    out: torch.Tensor,
    ref: torch.Tensor,
    y0: torch.Tensor,
    adapter_index: torch.Tensor,
    dtype: str,
    *,
    gpu: bool = False,
) -> None:
    """Non-vacuity first (the op changed y where tokens have adapters), then -1 rows untouched
    bit for bit, then out ~= ref within the dtype's tolerance."""
    rtol, atol = (GPU_TOL if gpu else TOL)[dtype]
    has = (adapter_index >= 0).cpu()
    out, ref, y0 = out.cpu(), ref.cpu(), y0.cpu()
    if bool(has.any()):
        moved = (ref.float() - y0.float())[has].abs().max().item()
        assert moved > 10 * atol, f"vacuous case: the adapters change y by at most {moved}"
    assert torch.equal(out[~has], y0[~has]), "rows with adapter_index -1 were modified"
    assert torch.equal(ref[~has], y0[~has]), "reference modified rows with adapter_index -1"
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)
