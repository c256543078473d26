"""The compressed state of one output slice of one vLLM LoRA layer: resident bases, per-slot cores.

Engine-neutral (imports no vLLM), so its math is tested without a server. A vLLM LoRA layer has
``max_loras`` slots; a compressed adapter in slot ``i`` contributes, on this slice,

    y[t] += U_b @ (S_i @ (V_b.T @ x[t]))      for every token t whose slot is i

where ``b`` is the basis block of the adapter's (bundle cluster basis digest, module). What a slot
costs is its core: ``cores`` is [slots, k, k] (k = the layer's largest k; smaller k are zero-padded,
exact). The bases are stacked ``U`` [B, d_out, k], ``V`` [B, d_in, k], one block per distinct
basis with at least one slot using it (refcounted): a basis is freed with its last slot, and the
stacks shrink, so memory follows what is resident, not what came and went.

The op itself is :func:`soppu_kernels.shared_basis_lora` (one V^T x GEMM for every basis of the
batch, a gathered k x k core per token, one U GEMM for every basis): the vectorized ``torch``
backend on CPU, Triton on CUDA (``auto``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SliceCores", "pad_to"]


def pad_to(t: torch.Tensor, rows: int | None, cols: int | None) -> torch.Tensor:
    """``t`` (2-D) zero-padded to ``rows`` x ``cols`` (None: keep that size); ``t`` itself when no padding."""
    r = t.shape[0] if rows is None else rows
    c = t.shape[1] if cols is None else cols
    if (r, c) == tuple(t.shape):
        return t
    out = torch.zeros((r, c), dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


@dataclass
class _Block:
    key: str
    users: int


class SliceCores:
    """Cores per slot and refcounted bases for one output slice (d_in -> d_out) of one layer.

    ``n_slots``: vLLM's ``max_loras``. ``k``: the padded rank (vLLM's ``--max-lora-rank``).
    ``dtype``/``device``: those of the layer's LoRA weights. The core table is allocated at the
    first :meth:`set` (a slice no compressed adapter targets costs nothing).
    """

    def __init__(self, n_slots: int, d_in: int, d_out: int, k: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.n_slots, self.d_in, self.d_out, self.k = n_slots, d_in, d_out, k
        self.dtype, self.device = dtype, torch.device(device)
        self.cores: torch.Tensor | None = None
        self.slot_block = torch.zeros(n_slots, dtype=torch.long, device=self.device)
        self.slot_key: list[str | None] = [None] * n_slots
        self.blocks: list[_Block] = []
        self.U = torch.zeros((0, d_out, k), dtype=dtype, device=self.device)
        self.V = torch.zeros((0, d_in, k), dtype=dtype, device=self.device)

    # ---- residency --------------------------------------------------------------------------
    @property
    def active_slots(self) -> int:
        return sum(1 for key in self.slot_key if key is not None)

    @property
    def basis_bytes(self) -> int:
        return self.U.numel() * self.U.element_size() + self.V.numel() * self.V.element_size()

    @property
    def core_table_bytes(self) -> int:
        return 0 if self.cores is None else self.cores.numel() * self.cores.element_size()

    @property
    def core_bytes_per_slot(self) -> int:
        return self.k * self.k * torch.tensor([], dtype=self.dtype).element_size()

    def keys(self) -> list[str]:
        return [b.key for b in self.blocks]

    def set(self, slot: int, key: str, U: torch.Tensor, V: torch.Tensor, S: torch.Tensor) -> None:
        """Put an adapter's core ``S`` [k_m, k_m] in ``slot``, on basis ``key`` (U [d_out, k_m], V [d_in, k_m]).

        The basis is stacked once per key (the first slot that uses it copies it in); ``k_m`` <= k.
        Whatever ``slot`` held before is released first.
        """
        k_m = S.shape[0]
        if tuple(S.shape) != (k_m, k_m) or tuple(U.shape) != (self.d_out, k_m) or tuple(V.shape) != (self.d_in, k_m):
            raise ValueError(f"basis {key}: U {tuple(U.shape)}, V {tuple(V.shape)}, core {tuple(S.shape)} do not fit "
                             f"a slice {self.d_in} -> {self.d_out} (U [d_out, k], V [d_in, k], core [k, k])")
        if k_m > self.k:
            raise ValueError(f"basis {key}: k={k_m} exceeds the layer's rank {self.k} (vLLM's --max-lora-rank)")
        self.clear(slot)
        if self.cores is None:
            self.cores = torch.zeros((self.n_slots, self.k, self.k), dtype=self.dtype, device=self.device)
        b = next((i for i, blk in enumerate(self.blocks) if blk.key == key), None)
        if b is None:
            b = len(self.blocks)
            self.blocks.append(_Block(key, 0))
            U_p = pad_to(U.to(device=self.device, dtype=self.dtype), None, self.k)
            V_p = pad_to(V.to(device=self.device, dtype=self.dtype), None, self.k)
            self.U = torch.cat([self.U, U_p.unsqueeze(0)])
            self.V = torch.cat([self.V, V_p.unsqueeze(0)])
        self.blocks[b].users += 1
        self.slot_block[slot] = b
        self.slot_key[slot] = key
        self.cores[slot].copy_(pad_to(S.to(device=self.device, dtype=self.dtype), self.k, self.k))

    def clear(self, slot: int) -> None:
        """Release ``slot``: its core is zeroed; its basis is freed if no other slot uses it."""
        key = self.slot_key[slot]
        if key is None:
            return
        self.slot_key[slot] = None
        assert self.cores is not None
        self.cores[slot].zero_()
        b = next(i for i, blk in enumerate(self.blocks) if blk.key == key)
        self.blocks[b].users -= 1
        self.slot_block[slot] = 0
        if self.blocks[b].users == 0:
            del self.blocks[b]
            keep = [i for i in range(self.U.shape[0]) if i != b]
            self.U = self.U[keep].clone()
            self.V = self.V[keep].clone()
            self.slot_block = torch.where(self.slot_block > b, self.slot_block - 1, self.slot_block)
        if not self.blocks:
            self.cores = None  # the last compressed adapter left this slice: its table goes too

    # ---- the op ----------------------------------------------------------------------------
    def apply(self, y: torch.Tensor, x: torch.Tensor, slot_index: torch.Tensor, *,
              backend: str | None = None) -> torch.Tensor:
        """y[t] += U_b S_i V_b^T x[t] for each token t with slot i = slot_index[t] holding a compressed
        adapter of this slice (other slots have zero cores: exactly 0 added; -1: untouched).

        y: [T, d_out] (a column slice of the layer's output is fine), x: [T, d_in], slot_index: [T].
        backend: a ``soppu_kernels`` backend; None picks it: ``torch`` on CPU, ``auto`` (Triton) on CUDA.
        """
        if not self.blocks or self.cores is None:
            return y
        import soppu_kernels as sk

        if backend is None:
            backend = "torch" if x.device.type == "cpu" else "auto"
        if backend in ("torch", "reference"):
            return sk.shared_basis_lora(y, x, self.U, self.V, self.cores, slot_index, self.slot_block, diag=False,
                                        backend=backend)
        out = y.contiguous()
        sk.shared_basis_lora(out, x.contiguous(), self.U, self.V, self.cores, slot_index, self.slot_block, diag=False,
                             backend=backend)
        if out.data_ptr() != y.data_ptr():
            y.copy_(out)
        return y
