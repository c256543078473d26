"""A ``soppu-compressed/1`` dir -> a vLLM ``LoRAModel`` whose layer weights are cores on shared bases.

vLLM's worker loads a LoRA request into a ``LoRAModel`` (module name -> ``LoRALayerWeights`` with
``lora_a`` / ``lora_b``), which its model manager packs (q/k/v -> qkv_proj) and hands, slot by
slot, to each layer's ``set_lora``. A compressed adapter rides the same path with
:class:`SoppuCoreWeights`: ``lora_a`` is the adapter's core S [k, k] and ``lora_b`` a
:class:`SoppuBasis` (the module's U, V of the adapter's cluster, shared by every adapter of that
cluster of that bundle). The SOPPU-aware layers (``layers.py``) recognize it and store only the
core per slot.

Bases are shared in this process too: one :class:`SoppuBasis` per (basis file sha256, module,
dtype), weakly cached, so the thousand ``LoRAModel`` objects of one bundle in vLLM's CPU cache hold
one U, V per module between them, and the basis file is read (and its digest checked) only when no
loaded adapter holds it. The reader is :mod:`soppu_client.format.compressed_form` (digests checked
against the adapter's config; the serving side verified the config against the owner's signature).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from vllm.lora.lora_model import LoRAModel
from vllm.lora.lora_weights import LoRALayerWeights

from soppu_client.format.compressed_form import check_compressed_file, read_compressed_config

__all__ = ["CompressedLoadError", "SoppuBasis", "SoppuCoreWeights", "host_bases", "is_soppu_weights",
           "load_compressed_lora"]


class CompressedLoadError(ValueError):
    """A compressed adapter that this server cannot load (the message names the adapter and the fix)."""


@dataclass(eq=False)
class SoppuBasis:
    """One module's basis of one cluster of one bundle: U [d_out, k], V [d_in, k] (scaling 1)."""

    key: str  # "<basis.safetensors sha256>:<module>": the residency key in the layers
    module: str
    U: torch.Tensor
    V: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.U.numel() * self.U.element_size() + self.V.numel() * self.V.element_size()


class SoppuCoreWeights(LoRALayerWeights):
    """vLLM layer weights of a compressed adapter: ``lora_a`` = core S [k, k], ``lora_b`` = its basis."""

    def __init__(self, module_name: str, core: torch.Tensor, basis: SoppuBasis) -> None:
        k = int(core.shape[0])
        super().__init__(module_name, rank=k, lora_alpha=k, lora_a=core, lora_b=basis, scaling=1.0)

    def optimize(self) -> SoppuCoreWeights:
        return self  # scaling is 1: nothing to fold

    @property
    def input_dim(self) -> int:
        return int(self.lora_b.V.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.lora_b.U.shape[0])


def is_soppu_weights(lora_b: object) -> bool:
    """Whether a ``set_lora`` ``lora_b`` (a tensor, or a list per packed slice) is a compressed adapter's."""
    if isinstance(lora_b, (list, tuple)):
        return any(isinstance(b, SoppuBasis) for b in lora_b)
    return isinstance(lora_b, SoppuBasis)


_lock = threading.Lock()
_bases: weakref.WeakValueDictionary[tuple[str, str, torch.dtype], SoppuBasis] = weakref.WeakValueDictionary()


def host_bases() -> tuple[int, int]:
    """(module bases, bytes) held in this process by loaded compressed adapters (vLLM's CPU LoRA cache)."""
    with _lock:
        live = list(_bases.values())
    return len(live), sum(b.nbytes for b in live)


def _bases_of(config: dict, adapter_dir: Path, dtype: torch.dtype) -> dict[str, SoppuBasis]:
    """The adapter's bases per module: shared with every loaded adapter of the same basis file."""
    digest = str(config["basis"]["sha256"])
    modules = list(config["modules"])
    with _lock:
        hit = {m: _bases.get((digest, m, dtype)) for m in modules}
        if all(b is not None for b in hit.values()):
            return hit  # type: ignore[return-value]
        tensors = load_file(str(check_compressed_file(adapter_dir, config["basis"])))
        out: dict[str, SoppuBasis] = {}
        for m in modules:
            basis = hit[m]
            if basis is None:
                try:
                    U, V = tensors[f"{m}.U"], tensors[f"{m}.V"]
                except KeyError as e:
                    raise CompressedLoadError(f"compressed adapter {adapter_dir}: basis.safetensors lacks "
                                              f"{e.args[0]}") from None
                basis = SoppuBasis(f"{digest}:{m}", m, U.to(dtype).contiguous(), V.to(dtype).contiguous())
                _bases[(digest, m, dtype)] = basis
            out[m] = basis
        return out


def load_compressed_lora(lora_dir: str | Path, *, lora_id: int, name: str, expected_modules: set[str],
                         dtype: torch.dtype, max_rank: int) -> LoRAModel:
    """The ``LoRAModel`` of the compressed adapter at ``lora_dir`` (its cores; bases shared).

    ``expected_modules``: the module base names this vLLM model can adapt (q_proj, v_proj, ...).
    ``max_rank``: vLLM's ``--max-lora-rank``, the padded k of the layers. Raises
    :class:`CompressedLoadError` (naming ``name`` and the fix) for a module the model lacks or a k
    above ``max_rank``; the reader's ``CompressedAdapterError`` for bad files.
    """
    adapter_dir = Path(lora_dir)
    config = read_compressed_config(adapter_dir)
    if config is None:
        raise CompressedLoadError(f"LoRA adapter {name}: {adapter_dir} is not a SOPPU compressed adapter")
    ranks = {m: int(config.get("ranks", {}).get(m, config["rank"])) for m in config["modules"]}
    problems = [f"module {m} ({m.rsplit('.', 1)[-1]} is not one of {sorted(expected_modules)})"
                for m in config["modules"] if m.rsplit(".", 1)[-1] not in expected_modules]
    too_big = sorted({k for k in ranks.values() if k > max_rank})
    if too_big:
        problems.append(f"k={too_big[-1]} exceeds --max-lora-rank {max_rank}: start vLLM with --max-lora-rank >= "
                        f"{too_big[-1]}")
    if problems:
        raise CompressedLoadError(f"compressed LoRA adapter {name} ({adapter_dir}) cannot be served here: "
                                  + "; ".join(problems))
    cores = load_file(str(check_compressed_file(adapter_dir, config["cores"])))
    bases = _bases_of(config, adapter_dir, dtype)
    diag = config["method"] == "diag"
    loras: dict[str, LoRALayerWeights] = {}
    for m in config["modules"]:
        try:
            S = cores[f"{m}.S"]
        except KeyError:
            raise CompressedLoadError(f"compressed LoRA adapter {name}: cores.safetensors lacks {m}.S") from None
        S = torch.diag(S) if diag else S
        loras[m] = SoppuCoreWeights(m, S.to(dtype).contiguous(), bases[m])
    model = LoRAModel(lora_id, max(ranks.values()), loras)
    model.soppu_compressed = True  # type: ignore[attr-defined]
    model.soppu_name = name  # type: ignore[attr-defined]
    return model
