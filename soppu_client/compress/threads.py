"""How many CPU threads one module's fit uses.

A small module is latency-bound: its GEMMs, QRs and eigendecompositions on a few hundred KB take
microseconds, and with several OpenMP threads every one of them ends in a barrier. On a machine
whose cores are busy (another process, a test's registry server, a second job), a thread of that
barrier gets descheduled and each tiny operation waits milliseconds: measured here, compressing two
SmolLM2 r=8 adapters took 84 s with 2 threads beside one other busy process, 3 s with 1. One thread
is never slower on such stacks, so they get one; large stacks keep torch's setting (their GEMMs
do scale with threads).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

SMALL_STACK_ELEMENTS = 1 << 22
"""Stacked-factor elements, N * r * (d_in + d_out), below which a fit runs on one thread (4M: the
12 example adapters are 0.1M, 100 Mistral-7B-shaped r=16 q_proj modules 13M)."""


@contextmanager
def fit_threads(n_elements: int) -> Iterator[int]:
    """Run the block with one torch thread when ``n_elements`` < SMALL_STACK_ELEMENTS (restored
    afterwards, also on error); yields the thread count in effect."""
    import torch

    before = torch.get_num_threads()
    if n_elements >= SMALL_STACK_ELEMENTS or before == 1:
        yield before
        return
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(before)
