"""Runtime hooks into vLLM's LoRA machinery (no file of vLLM is changed), pinned to one vLLM version.

:func:`install` (called by the ``soppu`` plugin in every vLLM process when
``SOPPU_SERVE_FORMAT=compressed``) touches these vLLM internals, each checked to exist first:

* ``vllm.lora.utils._all_lora_classes``: the linear LoRA layer classes ``from_layer`` picks from
  are replaced by their SOPPU-aware subclasses (``layers.soppu_layer_class``); ``isinstance`` checks
  against vLLM's classes still hold;
* ``vllm.lora.worker_manager.WorkerLoRAManager._load_adapter``: a LoRA request whose path is a
  ``soppu-compressed/1`` dir loads through ``loader.load_compressed_lora``; any other path goes to
  vLLM's own loader;
* ``vllm.lora.model_manager.LoRAModelManager._deactivate_adapter`` and ``remove_all_adapters``:
  vLLM only forgets a slot's adapter there (its weights stay until the slot is reused); the hook
  also releases the slot in the SOPPU layers, so cores and bases are freed when their adapter is
  evicted, and memory follows what is resident;
* ``LoRAModelManager.activate_adapter`` (wrapped, not changed): logs residency after a compressed
  adapter is placed.

Private names move between vLLM releases, so the hooks refuse to install on any vLLM version other
than :data:`SUPPORTED_VLLM` (the server then stops at start with that message).
"""

from __future__ import annotations

import functools

__all__ = ["SUPPORTED_VLLM", "UnsupportedVllmError", "install", "residency"]

SUPPORTED_VLLM = ("0.32.0",)
_installed = False


class UnsupportedVllmError(RuntimeError):
    """vLLM is a version whose private LoRA internals these hooks were not written against."""


def _check_version() -> str:
    import vllm

    version = str(getattr(vllm, "__version__", "unknown"))
    base = version.split("+")[0]
    if base not in SUPPORTED_VLLM:
        raise UnsupportedVllmError(
            f"soppu compressed serving (SOPPU_SERVE_FORMAT=compressed) hooks private vLLM LoRA internals and "
            f"supports vLLM {', '.join(SUPPORTED_VLLM)} only; this is vLLM {version}. Install a supported vLLM "
            f"(scripts/setup_vllm.sh pins it) or serve the PEFT form (SOPPU_SERVE_FORMAT=peft)")
    return version


def residency(manager) -> dict[str, int]:
    """Sum of the SOPPU layers' residency figures of a ``LoRAModelManager`` (see ``layers.soppu_residency``)."""
    from vllm_lora_resolver.compressed.layers import is_soppu_layer

    total: dict[str, int] = {}
    slots = []
    for module in manager.modules.values():
        if not is_soppu_layer(module):
            continue
        fig = module.soppu_residency()
        slots.append((fig.pop("compressed_slots"), fig.pop("ordinary_slots")))
        for k, v in fig.items():
            total[k] = total.get(k, 0) + v
    total["compressed_adapters"] = max((c for c, _ in slots), default=0)
    total["ordinary_adapters"] = max((o for _, o in slots), default=0)
    return total


def _log_residency(manager, what: str) -> None:
    from vllm_lora_resolver.compressed.layers import log

    from vllm_lora_resolver.compressed.loader import host_bases

    r = residency(manager)
    n_host, host_bytes = host_bases()
    log.info("soppu compressed: %s; residency compressed_adapters=%d core_bytes_per_adapter=%d core_table_bytes=%d "
             "bases=%d basis_bytes=%d ordinary_adapters=%d pool_slots=%d pool_bytes=%d stock_slot_bytes=%d "
             "host_bases=%d host_basis_bytes=%d",
             what, r.get("compressed_adapters", 0), r.get("core_bytes_per_slot", 0), r.get("core_table_bytes", 0),
             r.get("bases", 0), r.get("basis_bytes", 0), r.get("ordinary_adapters", 0), r.get("pool_slots", 0),
             r.get("pool_bytes", 0), r.get("stock_slot_bytes", 0), n_host, host_bytes)


def install() -> bool:
    """Install the hooks in this process (idempotent); returns True the first time.

    Raises :class:`UnsupportedVllmError` on an unsupported vLLM, AttributeError naming the missing
    internal if the pinned version somehow lacks one.
    """
    global _installed
    if _installed:
        return False
    _check_version()
    import vllm.lora.model_manager as mm
    import vllm.lora.utils as lu
    import vllm.lora.worker_manager as wm
    from vllm.lora.layers import (
        ColumnParallelLinearWithLoRA,
        MergedColumnParallelLinearWithLoRA,
        MergedQKVParallelLinearWithLoRA,
        QKVParallelLinearWithLoRA,
        ReplicatedLinearWithLoRA,
        RowParallelLinearWithLoRA,
    )
    from vllm.lora.utils import get_adapter_absolute_path

    from soppu_client.format.compressed_form import read_compressed_config
    from vllm_lora_resolver.compressed.layers import is_soppu_layer, soppu_layer_class
    from vllm_lora_resolver.compressed.loader import load_compressed_lora

    for owner, name in ((lu, "_all_lora_classes"), (wm.WorkerLoRAManager, "_load_adapter"),
                        (mm.LoRAModelManager, "_deactivate_adapter"), (mm.LoRAModelManager, "remove_all_adapters"),
                        (mm.LoRAModelManager, "activate_adapter")):
        if not hasattr(owner, name):
            raise AttributeError(f"soppu compressed: vLLM {_check_version()} lacks {getattr(owner, '__name__', owner)}"
                                 f".{name}, which the hooks need")

    # 1. Layers: SOPPU-aware subclasses of the plain (unsharded) linear LoRA classes.
    plain = (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA, QKVParallelLinearWithLoRA,
             MergedQKVParallelLinearWithLoRA, RowParallelLinearWithLoRA, ReplicatedLinearWithLoRA)
    lu._all_lora_classes = tuple(soppu_layer_class(c) if c in plain else c for c in lu._all_lora_classes)

    # 2. Loading: compressed dirs through our loader, everything else through vLLM's.
    original_load = wm.WorkerLoRAManager._load_adapter

    @functools.wraps(original_load)
    def _load_adapter(self, lora_request):
        path = get_adapter_absolute_path(lora_request.lora_path)
        if read_compressed_config(path) is None:
            return original_load(self, lora_request)
        manager = self._adapter_manager
        expected: set[str] = set()
        for module in manager.supported_lora_modules:
            expected.update(manager.packed_modules_mapping.get(module, [module]))
        return load_compressed_lora(path, lora_id=lora_request.lora_int_id, name=lora_request.lora_name,
                                    expected_modules=expected, dtype=self.lora_config.lora_dtype,
                                    max_rank=self.lora_config.max_lora_rank)

    wm.WorkerLoRAManager._load_adapter = _load_adapter

    # 3. Eviction: release the slot in the SOPPU layers when vLLM forgets it.
    original_deactivate = mm.LoRAModelManager._deactivate_adapter

    @functools.wraps(original_deactivate)
    def _deactivate_adapter(self, lora_id: int):
        index = self.lora_index_to_id.index(lora_id) if lora_id in self.lora_index_to_id else None
        result = original_deactivate(self, lora_id)
        if index is not None:
            kinds = {module.soppu_release(index) for module in self.modules.values() if is_soppu_layer(module)}
            if "core" in kinds:
                _log_residency(self, f"released adapter id {lora_id} from slot {index}")
        return result

    mm.LoRAModelManager._deactivate_adapter = _deactivate_adapter

    original_remove_all = mm.LoRAModelManager.remove_all_adapters

    @functools.wraps(original_remove_all)
    def remove_all_adapters(self):
        result = original_remove_all(self)
        for module in self.modules.values():
            if is_soppu_layer(module):
                for index in range(self.lora_slots):
                    module.soppu_release(index)
        return result

    mm.LoRAModelManager.remove_all_adapters = remove_all_adapters

    original_activate = mm.LoRAModelManager.activate_adapter

    @functools.wraps(original_activate)
    def activate_adapter(self, lora_id: int):
        result = original_activate(self, lora_id)
        model = self._registered_adapters.get(lora_id)
        if result and getattr(model, "soppu_compressed", False):
            _log_residency(self, f"activated {model.soppu_name} (id {lora_id}) in slot "
                                 f"{self.lora_index_to_id.index(lora_id)}")
        return result

    mm.LoRAModelManager.activate_adapter = activate_adapter
    # LRUCacheLoRAModelManager overrides activate_adapter and calls super(): the wrapped one above.
    _installed = True
    return True
