"""Plain-text tables for the CLI (the CLI prints; the library computes)."""

from __future__ import annotations

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
    rows = [[r["layer"], r["module_type"], r["mean_error"], r["max_error"], r["mean_lower_bound"]] for r in summary["layers"]]
    return table(["layer", "module", "mean error", "max error", "svd bound"], rows, "rlrrr")


def sizes_text(sizes: Sizes) -> str:
    """Parameters (and, where recorded, bytes) before -> after; a reused basis is not counted."""
    parts = (f"cores {sizes.params_cores:,}; basis {sizes.params_basis:,} reused" if sizes.basis_reused
             else f"basis {sizes.params_basis:,} + cores {sizes.params_cores:,}")
    text = (
        f"parameters: {sizes.params_before:,} -> {sizes.params_after:,} ({parts}), "
        f"compression ratio {sizes.param_ratio:.2f}x"
    )
    if sizes.source_bytes is not None and sizes.tensor_bytes is not None and sizes.byte_ratio is not None:
        text += (
            f"\nbytes: {sizes.source_bytes:,} (adapter files) -> {sizes.tensor_bytes:,} "
            f"(bundle tensors) = {sizes.byte_ratio:.2f}x"
        )
    return text


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
