"""Plain-text tables for the CLI (the CLI prints; the library computes)."""

from __future__ import annotations

from pathlib import Path

from soppu_client.format.bundle import Sizes


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """Fixed-width table; ``align`` is one char per column ('l' or 'r'), default: first left."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    lines = []
    for n, row in enumerate(cells):
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.4f}"
    return str(value)


def weight_table(summary: dict) -> str:
    rows = [
        [name, a["error"], a["lower_bound"], a["mean_module_error"], a["max_module_error"]]
        for name, a in summary["adapters"].items()
    ]
    rows.append(["MEAN", summary["mean_error"], summary["mean_lower_bound"], None, None])
    return table(["adapter", "error", "svd bound", "mean/module", "max/module"], rows)


def layer_table(summary: dict) -> str:
    rows = [[r["layer"], r["module_type"], r["mean_error"], r["max_error"], r["mean_lower_bound"]]
            for r in summary["layers"]]
    return table(["layer", "module", "mean error", "max error", "svd bound"], rows, "rlrrr")


def sizes_text(sizes: Sizes) -> str:
    """Parameters (and, where recorded, bytes) before -> after; a reused basis is not counted."""
    parts = (f"cores {sizes.params_cores:,}; basis {sizes.params_basis:,} reused" if sizes.basis_reused
             else f"basis {sizes.params_basis:,} + cores {sizes.params_cores:,}")
    text = (
        f"parameters: {sizes.params_before:,} -> {sizes.params_after:,} ({parts}), "
        f"compression ratio {sizes.param_ratio:.2f}x"
    )
    if sizes.source_bytes is not None and sizes.byte_ratio is not None:
        text += (f"\nbytes: {sizes.source_bytes:,} (adapter files) -> {sizes.file_bytes:,} "
                 f"(bundle files{', basis not counted' if sizes.basis_reused else ''}) = {sizes.byte_ratio:.2f}x")
    elif sizes.source_bytes is not None and sizes.tensor_bytes:  # bundles from before file bytes were recorded
        text += (f"\nbytes: {sizes.source_bytes:,} (adapter files) -> {sizes.tensor_bytes:,} "
                 f"(bundle tensors) = {sizes.source_bytes / sizes.tensor_bytes:.2f}x")
    if sizes.source_bf16_bytes and sizes.file_bytes:
        text += "\n" + bf16_bytes_text(sizes.source_bf16_bytes, sizes.tensor_bytes, sizes.safetensors_bytes,
                                        sizes.file_bytes)
    return text


def bf16_bytes_text(source_bf16: int, tensors: int | None, safetensors: int | None, files: int | None) -> str:
    """One line: the sources' tensors at bf16 against the bundle's tensors, safetensors files and all files."""
    parts = [f"{label} {n:,} = {source_bf16 / n:.2f}x" for label, n in
             (("tensors", tensors), ("safetensors files", safetensors), ("all files", files)) if n]
    return f"bytes vs the sources at bf16 ({source_bf16:,}): " + ", ".join(parts)


def disk_bytes(bundle_dir: Path) -> dict[str, int]:
    """What a bundle directory holds now, from os.stat: ``safetensors_bytes`` (basis and cores,
    headers included), ``header_bytes`` (their headers: 8-byte length + JSON), ``tensor_bytes``
    (the difference), ``manifest_bytes``, ``metrics_bytes``, ``file_bytes`` (all of these:
    what ``soppu compress`` writes) and ``signature_bytes`` (``soppu sign``'s, 0 if unsigned; not
    in ``file_bytes``)."""
    import struct

    from soppu_client.format.names import MANIFEST, METRICS, SIGNATURE

    bundle_dir = Path(bundle_dir)
    st = [p for p in [bundle_dir / "basis.safetensors", *sorted((bundle_dir / "cores").glob("*.safetensors"))]
          if p.is_file()]
    headers = 0
    for p in st:
        with p.open("rb") as f:
            headers += 8 + struct.unpack("<Q", f.read(8))[0]
    size = {name: (bundle_dir / name).stat().st_size if (bundle_dir / name).is_file() else 0
            for name in (MANIFEST, METRICS, SIGNATURE)}
    safetensors = sum(p.stat().st_size for p in st)
    return {"tensor_bytes": safetensors - headers, "header_bytes": headers, "safetensors_bytes": safetensors,
            "manifest_bytes": size[MANIFEST], "metrics_bytes": size[METRICS],
            "file_bytes": safetensors + size[MANIFEST] + size[METRICS], "signature_bytes": size[SIGNATURE]}


def output_table(checks: list[dict]) -> str:
    rows = [
        [
            c["adapter"],
            c["prompts"],
            c["mean_kl"],
            c["top1_agreement"],
            c["greedy_exact_match"],
            c["adapter_changes_output"],
            c["task_accuracy_original"],
            c["task_accuracy_compressed"],
        ]
        for c in checks
    ]
    return table(
        ["adapter", "prompts", "mean KL", "top-1 agree", "greedy match", "adapter effect", "acc orig", "acc comp"], rows
    )
