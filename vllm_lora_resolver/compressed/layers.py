"""SOPPU-aware vLLM linear LoRA layers: a slot holds a core, ordinary LoRAs use a small pool.

:func:`soppu_layer_class` derives, from each of vLLM's linear LoRA layer classes (the ones
``vllm.lora.utils.from_layer`` picks from ``_all_lora_classes``), a subclass that

* allocates vLLM's stacked A/B tensors for a **pool** of ordinary-LoRA slots only (it starts at
  :data:`INITIAL_POOL` and doubles when more ordinary LoRAs are active at once, up to
  ``max_loras``; it shrinks back when they have all left), not for every vLLM slot;
* keeps, per output slice, a :class:`~vllm_lora_resolver.compressed.state.SliceCores`: a core
  [k, k] per vLLM slot and the resident bases, refcounted;
* in ``set_lora`` stores a compressed adapter's core (its ``lora_b`` is a
  :class:`~vllm_lora_resolver.compressed.loader.SoppuBasis`) or copies an ordinary LoRA into a pool
  slot mapped from the vLLM slot;
* in the forward adds the ordinary LoRAs' delta with vLLM's own torch ops (``bgmv_shrink`` /
  ``bgmv_expand_slice``) on the pool indices, then each slice's compressed delta
  (``SliceCores.apply``). Tokens without an adapter (slot -1) get nothing from either.

So ``--max-loras`` can be in the thousands for compressed adapters: a slot costs k*k values per
module (only on the modules they target), not r*(d_in + d_out) on every LoRA layer.

Refused with a clear error at start (never a silent drop of an adapter): tensor parallelism > 1,
fully sharded LoRAs, vLLM's dual-stream LoRA (``VLLM_LORA_ENABLE_DUAL_STREAM``), and CUDA graphs
(the compressed state is reallocated as adapters come and go, which a captured graph would not see:
run with ``--enforce-eager``).
"""

from __future__ import annotations

import functools

import torch
from vllm.logger import init_logger
from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink

from vllm_lora_resolver.compressed.loader import SoppuBasis, is_soppu_weights
from vllm_lora_resolver.compressed.state import SliceCores

__all__ = ["INITIAL_POOL", "SoppuLinearMixin", "is_soppu_layer", "soppu_layer_class"]

INITIAL_POOL = 1  # ordinary-LoRA pool slots a layer starts with
log = init_logger("vllm.soppu_compressed")


_GRAPHS = ("CUDA graphs (the SOPPU compressed state changes as adapters load, a captured graph would not see it: "
           "start vLLM with --enforce-eager)")


class UnsupportedConfig(RuntimeError):
    """A vLLM configuration the compressed path refuses at start (the message says what to change)."""


def _check_supported(layer, lora_config) -> None:
    problems = []
    if getattr(layer, "tp_size", 1) != 1:
        problems.append(f"tensor parallel size {layer.tp_size} (run with --tensor-parallel-size 1)")
    if lora_config.fully_sharded_loras:
        problems.append("--fully-sharded-loras (leave it off)")
    if getattr(layer, "_enable_aux_cuda_stream", False):
        problems.append("VLLM_LORA_ENABLE_DUAL_STREAM=1 (unset it)")
    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike():
        from vllm.config import CUDAGraphMode, get_current_vllm_config

        try:
            cfg = get_current_vllm_config()
        except AssertionError:  # no config in scope: the capture guard in the forward still refuses
            cfg = None
        eager = cfg is None or (cfg.model_config is not None and cfg.model_config.enforce_eager)
        if not eager and cfg.compilation_config.cudagraph_mode != CUDAGraphMode.NONE:
            problems.append(_GRAPHS)
    if problems:
        msg = ("soppu compressed: SOPPU_SERVE_FORMAT=compressed cannot serve with " + "; ".join(problems))
        log.error(msg)
        raise UnsupportedConfig(msg)


class SoppuLinearMixin:
    """Mixed into a vLLM linear LoRA layer class (see the module docstring); vLLM slot ids are kept,
    the storage behind them differs by adapter form."""

    soppu_layer = True

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        _check_supported(self, lora_config)
        self._soppu_n_slots = max_loras
        self._soppu_model_config = model_config
        self._soppu_pool_cap = min(INITIAL_POOL, max_loras)
        # One extra, always-zero pool row at the end: what slot -1 and non-pool slots gather.
        super().create_lora_weights(self._soppu_pool_cap + 1, lora_config, model_config)
        self._soppu_pool_of_slot = torch.full((max_loras + 1,), -1, dtype=torch.long, device=self.device)
        self._soppu_free_pool = list(range(self._soppu_pool_cap - 1, -1, -1))
        self._soppu_kind: list[str | None] = [None] * max_loras
        self._soppu_raw = False
        dtype = self.lora_a_stacked[0].dtype
        self._soppu_slices = [SliceCores(max_loras, self.input_size, size, lora_config.max_lora_rank, dtype,
                                         self.device) for size in self._soppu_output_slices()]

    def _soppu_output_slices(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.output_slices)

    # ---- vLLM's slot API -------------------------------------------------------------------
    # Every change of the layer's state runs in inference mode: vLLM calls these both inside its
    # forward's inference mode (activation for a batch) and outside it (add_lora), and a tensor
    # made in inference mode cannot be changed in place outside it.
    @torch.inference_mode()
    def reset_lora(self, index: int) -> None:
        if self._soppu_raw:  # the parent's set_lora resets the pool row it writes
            return super().reset_lora(index)
        self.soppu_release(index)

    @torch.inference_mode()
    def set_lora(self, index: int, lora_a, lora_b) -> None:
        self.soppu_release(index)
        if is_soppu_weights(lora_b):
            a_list = lora_a if isinstance(lora_a, (list, tuple)) else [lora_a]
            b_list = lora_b if isinstance(lora_b, (list, tuple)) else [lora_b]
            if len(b_list) != len(self._soppu_slices):
                raise ValueError(f"soppu compressed: {len(b_list)} packed modules for a layer with "
                                 f"{len(self._soppu_slices)} output slices")
            for state, S, basis in zip(self._soppu_slices, a_list, b_list):
                if isinstance(basis, SoppuBasis):
                    state.set(index, basis.key, basis.U, basis.V, S)
            self._soppu_kind[index] = "core"
            return
        p = self._soppu_take_pool_slot()
        self._soppu_raw = True
        try:
            super().set_lora(p, lora_a, lora_b)
        finally:
            self._soppu_raw = False
        self._soppu_pool_of_slot[index] = p
        self._soppu_kind[index] = "full"

    @torch.inference_mode()
    def soppu_release(self, index: int) -> str | None:
        """Free whatever vLLM slot ``index`` holds here: its cores (and a basis with its last user), or
        its pool slot. vLLM calls ``reset_lora``/``set_lora``; the hooks call this on deactivation.
        Returns what the slot held: "core", "full" or None."""
        kind = self._soppu_kind[index]
        if kind == "core":
            for state in self._soppu_slices:
                state.clear(index)
        elif kind == "full":
            p = int(self._soppu_pool_of_slot[index])
            self._soppu_raw = True
            try:
                super().reset_lora(p)
            finally:
                self._soppu_raw = False
            self._soppu_pool_of_slot[index] = -1
            self._soppu_free_pool.append(p)
            if len(self._soppu_free_pool) == self._soppu_pool_cap and self._soppu_pool_cap > INITIAL_POOL:
                self._soppu_resize_pool(min(INITIAL_POOL, self._soppu_n_slots))
        self._soppu_kind[index] = None
        return kind

    def _soppu_take_pool_slot(self) -> int:
        if not self._soppu_free_pool:
            self._soppu_resize_pool(min(2 * self._soppu_pool_cap, self._soppu_n_slots))
        return self._soppu_free_pool.pop()

    def _soppu_resize_pool(self, cap: int) -> None:
        """Reallocate the pool's stacked A/B for ``cap`` slots (+1 zero row), keeping rows in use."""
        used = sorted(int(p) for p in self._soppu_pool_of_slot.tolist() if p >= 0)
        if used and used[-1] >= cap:
            return  # cannot shrink below a slot in use (never happens: we shrink only when empty)
        old_a, old_b = self.lora_a_stacked, self.lora_b_stacked
        super().create_lora_weights(cap + 1, self.lora_config, self._soppu_model_config)
        n = min(cap, self._soppu_pool_cap)
        for new, old in zip(self.lora_a_stacked + self.lora_b_stacked, old_a + old_b):
            new[:n].copy_(old[:n])
        self._soppu_free_pool = [p for p in range(cap - 1, -1, -1) if p not in used]
        self._soppu_pool_cap = cap

    # ---- residency figures -----------------------------------------------------------------
    def soppu_residency(self) -> dict[str, int]:
        pool_bytes = sum(t.numel() * t.element_size() for t in self.lora_a_stacked + self.lora_b_stacked)
        r = self.lora_config.max_lora_rank
        elt = self.lora_a_stacked[0].element_size()
        stock_slot = sum(r * (self.input_size + s) * elt for s in self._soppu_output_slices())
        return {
            "basis_bytes": sum(s.basis_bytes for s in self._soppu_slices),
            "bases": sum(len(s.blocks) for s in self._soppu_slices),
            "core_table_bytes": sum(s.core_table_bytes for s in self._soppu_slices),
            "core_bytes_per_slot": sum(s.core_bytes_per_slot for s in self._soppu_slices if s.cores is not None),
            "compressed_slots": sum(1 for k in self._soppu_kind if k == "core"),
            "ordinary_slots": sum(1 for k in self._soppu_kind if k == "full"),
            "pool_slots": self._soppu_pool_cap,
            "pool_bytes": pool_bytes,
            "stock_slot_bytes": stock_slot,  # what one vLLM LoRA slot of this layer costs at --max-lora-rank
        }

    # ---- the forward -----------------------------------------------------------------------
    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        original_shape = output.shape if output.ndim == 3 else None
        if x.ndim == 3 and output.ndim == 3:
            output = output.flatten(0, 1)
            x = x.flatten(0, 1)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            msg = "soppu compressed: SOPPU_SERVE_FORMAT=compressed cannot serve with " + _GRAPHS
            log.error(msg)
            raise UnsupportedConfig(msg)
        idx = self.punica_wrapper.token_lora_indices
        if idx.shape[0] != x.shape[0]:
            idx = idx[: x.shape[0]]
        offsets = [0]
        for s in self._soppu_output_slices():
            offsets.append(offsets[-1] + s)
        if len(self._soppu_free_pool) < self._soppu_pool_cap:  # some ordinary LoRA is in the pool
            pidx = self._soppu_pool_of_slot[torch.where(idx < 0, self._soppu_n_slots, idx)]
            r = self.lora_b_stacked[0].shape[-1]
            for s, size in enumerate(self._soppu_output_slices()):
                buf = torch.zeros((x.shape[0], r), dtype=torch.float32, device=x.device)
                bgmv_shrink(x, self.lora_a_stacked[s], buf, pidx, 1.0)
                bgmv_expand_slice(buf, self.lora_b_stacked[s], output, pidx, offsets[s], size, add_inputs=True)
        for s, state in enumerate(self._soppu_slices):
            if state.blocks:
                state.apply(output[:, offsets[s]:offsets[s + 1]], x, idx)
        if original_shape is not None:
            output = output.reshape(original_shape)
        return output


def is_soppu_layer(module: object) -> bool:
    return bool(getattr(module, "soppu_layer", False))


@functools.lru_cache(maxsize=None)
def soppu_layer_class(cls: type) -> type:
    """The SOPPU-aware subclass of vLLM LoRA layer class ``cls`` (one per class, same name + "Soppu")."""
    return type("Soppu" + cls.__name__, (SoppuLinearMixin, cls), {"__module__": __name__})
