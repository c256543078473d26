"""SOPPU's compressed form inside stock vLLM: one resident basis per (module, cluster, bundle), a core per adapter.

With ``SOPPU_SERVE_FORMAT=compressed`` the ``soppu`` plugin calls :func:`install` in every vLLM
process (general plugins load in the engine core and workers too). From then on:

* vLLM's linear LoRA layers are SOPPU-aware (``layers.py``): a vLLM LoRA slot holding a compressed
  adapter stores only its k x k cores; the bases are resident once per layer slice and basis digest,
  refcounted; ordinary LoRAs (``--lora-modules``, PEFT dirs) use a small pool of full A/B slots in
  the same layer, so both kinds are served in one batch;
* a LoRA request whose path is a ``soppu-compressed/1`` dir is loaded by ``loader.py``;
* a decode step adds ``U_b S_a V_b^T x`` per token with :func:`soppu_kernels.shared_basis_lora`
  (one V^T x GEMM for all bases of the batch, a gathered core per token, one U GEMM): the vectorized
  torch backend on CPU, Triton on CUDA;
* eviction releases cores and, with their last adapter, bases (``hooks.py``).

``hooks.py`` lists the private vLLM names this depends on; they are pinned to :data:`SUPPORTED_VLLM`
and checked at start.
"""

from __future__ import annotations

from vllm_lora_resolver.compressed.hooks import SUPPORTED_VLLM, UnsupportedVllmError, install, residency

__all__ = ["SUPPORTED_VLLM", "UnsupportedVllmError", "install", "residency"]
