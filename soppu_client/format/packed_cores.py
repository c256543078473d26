"""The packed core-file layout (manifest ``"cores_layout": "packed"``): one adapter's cores in at
most three tensors instead of one or two per module.

    "cores"        <dtype> [n_float]   every float-stored core, flattened ([k, k] row-major or [k]),
                                        concatenated
    "cores.q"      U8  [n_codes]       every quantized core's packed codes (``quant.py``), each module's
                                        bytes whole (byte-aligned), concatenated
    "cores.scale"  F16 [n_groups]      their per-group scales, concatenated

A tensor no module uses is absent. Modules are laid out in sorted name order (the order
manifest.json lists them); module m's segment, its offsets and lengths, follow from the manifest
alone (its k, ``method`` and ``quant.cores`` spec), so :func:`core_segments` is the whole layout
and nothing about it can disagree with the manifest. Readers unpack to the per-module
``{"<module>.S": tensor}`` map the per-module layout (``"per-module"``, the default, one
``"<module>.S"`` or ``.S.q`` / ``.S.scale`` per module) holds, so every consumer sees the same
cores whatever the layout.

Why: a per-module header entry is ~100 bytes, as much as a small core itself; with 60 modules the
header was about a third of a core file. Packed, a core file has at most three entries (<2%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from soppu_client.format.quant import SCALE_DTYPE, QuantSpec, matrix_view

if TYPE_CHECKING:
    import torch

CORES_LAYOUTS = ("per-module", "packed")
"""Values of the manifest's ``cores_layout`` (absent: ``per-module``, bundles written before it)."""
PACKED = "packed"
FLOAT_KEY, CODES_KEY, SCALES_KEY = "cores", "cores.q", "cores.scale"

__all__ = ["CORES_LAYOUTS", "PACKED", "Segment", "core_segments", "pack_cores", "packed_entries", "unpack_cores"]


@dataclass(frozen=True)
class Segment:
    """Where module ``module``'s core lies in a packed core file: ``shape`` (its logical shape);
    float: elements [offset, offset + size) of "cores"; quantized (``spec``): bytes
    [offset, offset + size) of "cores.q" and scales [scale_offset, scale_offset + scale_size)."""

    module: str
    shape: tuple[int, ...]
    spec: QuantSpec | None
    offset: int
    size: int
    scale_offset: int = 0
    scale_size: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"module": self.module, "shape": list(self.shape),
                               "tensor": FLOAT_KEY if self.spec is None else CODES_KEY,
                               "offset": self.offset, "size": self.size}
        if self.spec is not None:
            out.update(scales=[self.scale_offset, self.scale_offset + self.scale_size], **self.spec.to_json())
        return out


def core_segments(shapes: dict[str, tuple[int, ...]], specs: dict[str, QuantSpec | None]) -> list[Segment]:
    """The layout of a packed core file: ``shapes`` module -> core shape, ``specs`` module -> its
    cores' quantization (None or absent: float)."""
    out, f_off, q_off, s_off = [], 0, 0, 0
    for module in sorted(shapes):
        shape, spec = tuple(shapes[module]), specs.get(module)
        if spec is None:
            n = math.prod(shape)
            out.append(Segment(module, shape, None, f_off, n))
            f_off += n
        else:
            rows, cols = matrix_view(shape, "cores")
            nq, ns = spec.packed_len(rows, cols), math.prod(spec.scale_shape(rows, cols))
            out.append(Segment(module, shape, spec, q_off, nq, s_off, ns))
            q_off, s_off = q_off + nq, s_off + ns
    return out


def packed_entries(segments: list[Segment], float_dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors (name -> (safetensors dtype, shape)) a packed core file with ``segments`` holds."""
    n_float = sum(s.size for s in segments if s.spec is None)
    n_codes = sum(s.size for s in segments if s.spec is not None)
    n_scales = sum(s.scale_size for s in segments if s.spec is not None)
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    if n_float:
        out[FLOAT_KEY] = (float_dtype, (n_float,))
    if n_codes:
        out[CODES_KEY] = ("U8", (n_codes,))
        out[SCALES_KEY] = (SCALE_DTYPE, (n_scales,))
    return out


def pack_cores(segments: list[Segment], cores: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of a packed core file from ``cores`` module -> float tensor or :class:`QTensor`."""
    import numpy as np
    import torch

    floats = [cores[s.module].to(dtype).reshape(-1) for s in segments if s.spec is None]
    quant = [cores[s.module] for s in segments if s.spec is not None]
    out: dict[str, torch.Tensor] = {}
    if floats:
        out[FLOAT_KEY] = torch.cat(floats).contiguous()
    if quant:
        out[CODES_KEY] = torch.from_numpy(np.concatenate([np.asarray(q.packed, np.uint8).reshape(-1) for q in quant]))
        out[SCALES_KEY] = torch.from_numpy(np.concatenate([np.asarray(q.scale).reshape(-1) for q in quant])
                                           .astype(np.float16))
    return out


def scale_slices(segments: list[Segment], scales: Any) -> Iterator[tuple[Segment, Any]]:
    """(segment, its scales) of every quantized segment, ``scales`` the "cores.scale" array."""
    for s in segments:
        if s.spec is not None:
            yield s, scales[s.scale_offset:s.scale_offset + s.scale_size]


def unpack_cores(segments: list[Segment], raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"<module>.S": tensor}`` from a packed core file's tensors (quantized ones dequantized to float32)."""
    import torch

    from soppu_client.format.quant import dequantize

    out = {}
    for s in segments:
        if s.spec is None:
            out[f"{s.module}.S"] = raw[FLOAT_KEY][s.offset:s.offset + s.size].reshape(s.shape).clone()
        else:
            codes = raw[CODES_KEY][s.offset:s.offset + s.size].numpy()
            scale = raw[SCALES_KEY][s.scale_offset:s.scale_offset + s.scale_size].float().numpy().reshape(-1, 1)
            out[f"{s.module}.S"] = torch.from_numpy(dequantize(codes, scale, s.spec, s.shape, "cores"))
    return out
