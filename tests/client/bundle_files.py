"""An independent reader of bundle core files for tests: the safetensors library plus the format
as documented (docs/ARCHITECTURE.md, ``packed_cores.py``), no soppu code. Both layouts:
``per-module`` ("<module>.S", or ".S.q" / ".S.scale") and ``packed`` ("cores", "cores.q",
"cores.scale"; modules in sorted order, segments in that order, each module's codes byte-aligned).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def decode(packed: np.ndarray, scale: np.ndarray, rows: int, cols: int, bits: int, group: int) -> np.ndarray:
    """Values [rows, cols] of little-endian bit-packed codes: scale[r // group, c] * (code - 2^(b-1))."""
    bitstream = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")[: rows * cols * bits]
    codes = (bitstream.reshape(rows * cols, bits) * (2 ** np.arange(bits))).sum(1).reshape(rows, cols)
    scale = np.asarray(scale, np.float64).reshape(-1, cols)
    return np.stack([scale[r // group] * (codes[r] - 2 ** (bits - 1)) for r in range(rows)])


def read_cores(bundle_dir: Path, adapter: str) -> dict[str, torch.Tensor]:
    """{"<module>.S": float64 tensor [k, k] or [k]} of ``adapter``, whatever the core layout."""
    m = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    raw = load_file(str(Path(bundle_dir) / m["adapters"][adapter]["core"]))
    diag = m["method"] == "diag"
    out, f_off, q_off, s_off = {}, 0, 0, 0
    for module in sorted(m["modules"]):
        meta = m["modules"][module]
        k = meta.get("rank", m["rank"])
        shape = (k,) if diag else (k, k)
        n = math.prod(shape)
        q = meta.get("quant", {}).get("cores")
        if m.get("cores_layout", "per-module") == "per-module":
            if q is None:
                out[f"{module}.S"] = raw[f"{module}.S"].double()
            else:
                vals = decode(raw[f"{module}.S.q"].numpy(), raw[f"{module}.S.scale"].float().numpy(), n, 1,
                              q["bits"], q["group_size"])
                out[f"{module}.S"] = torch.from_numpy(vals.reshape(shape))
            continue
        assert m["cores_layout"] == "packed"
        if q is None:
            out[f"{module}.S"] = raw["cores"][f_off:f_off + n].double().reshape(shape)
            f_off += n
        else:
            nq, ns = (n * q["bits"] + 7) // 8, -(-n // q["group_size"])
            vals = decode(raw["cores.q"][q_off:q_off + nq].numpy(), raw["cores.scale"][s_off:s_off + ns].float().numpy(),
                          n, 1, q["bits"], q["group_size"])
            out[f"{module}.S"] = torch.from_numpy(vals.reshape(shape))
            q_off, s_off = q_off + nq, s_off + ns
    used = {"cores": f_off, "cores.q": q_off, "cores.scale": s_off}
    assert all(raw[key].numel() == used[key] for key in raw if key in used), "packed tensors longer than their segments"
    return out


def relayout(src: Path, dst: Path, layout: str) -> Path:
    """Write bundle ``src`` again with core layout ``layout`` through ``BundleBuilder`` (the
    writer under test; ``per-module`` is the code path of bundles written before ``packed``):
    the same basis file byte for byte, the same stored cores (quantized ones as the same codes and
    scales, read here from the raw file), the same manifest otherwise."""
    from dataclasses import replace

    from soppu_client.format.bundle import Bundle, BundleBuilder, torch_dtype
    from soppu_client.format.quant import QTensor

    bundle = Bundle.open(src)
    m = bundle.manifest
    builder = BundleBuilder(m.names, m.rank, m.diag, m.clusters, torch_dtype(m.dtype),
                            reuse_basis=Path(src) / "basis.safetensors", cores_layout=layout)
    raw = {n: load_file(str(Path(src) / m.adapters[n].core)) for n in m.names}
    for module in m.modules:
        spec = m.quant_spec(module, "cores")
        Us, Vs = zip(*(bundle.bases(module, c) for c in range(m.clusters)))
        cores = []
        for n in m.names:
            if spec is None:
                cores.append(bundle.load_cores(n)[f"{module}.S"])
                continue
            if m.cores_layout == "packed":
                seg = next(s for s in m.core_segments() if s.module == module)
                codes = raw[n]["cores.q"][seg.offset:seg.offset + seg.size]
                scale = raw[n]["cores.scale"][seg.scale_offset:seg.scale_offset + seg.scale_size].reshape(-1, 1)
            else:
                codes, scale = raw[n][f"{module}.S.q"], raw[n][f"{module}.S.scale"]
            cores.append(QTensor(codes.numpy(), scale.numpy(), spec, m.core_shape(module), "cores"))
        if spec is None:
            cores = torch.stack(cores)
        builder.add_module(module, list(Us), list(Vs), cores)
        if (bspec := m.quant_spec(module, "basis")) is not None:
            builder.quant.setdefault(module, {})["basis"] = bspec
    extra = {"metrics.json": (Path(src) / "metrics.json").read_bytes()} if "metrics.json" in m.files else None
    builder.write(Path(dst), replace(m, files={}, cores_layout=layout), extra_files=extra)
    return Path(dst)
