"""`soppu verify` (a bundle against its original adapters) and `soppu inspect` (a bundle's manifest)."""

from __future__ import annotations

from pathlib import Path

import click

from soppu_client.cli.options import ERROR_EPILOG
from soppu_client.format.errors import InputError, VerificationError
from soppu_client.format.names import SIGNATURE
from soppu_client.format.reporting import emit, json_option, progress, reporting

__all__ = ["COMMANDS", "inspect", "verify"]


@click.command(epilog=ERROR_EPILOG)
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("more_adapter_dirs", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option("--adapters", "adapter_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Original adapter dir; `--adapters dir1 dir2 ...` (a shell glob) works too.")
@click.option("--base-model", default=None,
              help="Run the output-level check on this base model: a local HF dir, or `smollm2` for the embedded default.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON list of prompts for the output check (default: prompts.json in each adapter dir).")
@click.option("--max-new-tokens", default=16, show_default=True, type=int)
@click.option("--max-error", type=float, default=None, help="Exit 1 if any adapter's weight error exceeds this.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG of per-layer errors with per-adapter dots.")
@click.option("--layers", "show_layers", is_flag=True, help="Also print the per-layer table.")
@json_option
def verify(bundle_dir: Path, more_adapter_dirs: tuple[Path, ...], adapter_dirs: tuple[Path, ...], base_model: str | None,
           prompts_file: Path | None, max_new_tokens: int, max_error: float | None, plot_path: Path | None,
           show_layers: bool, as_json: bool) -> None:
    """Check BUNDLE_DIR against the original adapters (--adapters DIR...): weight-level errors
    and SVD lower bounds, and with --base-model the output-level agreement (KL, top-1, greedy generations)."""
    from soppu_client.adapters import load_collection
    from soppu_client.format.bundle import Bundle
    from soppu_client.report import layer_table, output_table, sizes_text, weight_table
    from soppu_client.verify import plot_errors, verify_outputs, verify_weights

    with reporting(as_json):
        bundle = Bundle.open(bundle_dir)
        dirs = [*adapter_dirs, *more_adapter_dirs]
        if not dirs:
            raise InputError("no adapters given; pass the original adapter dirs with --adapters DIR...")
        collection = load_collection(dirs)
        summary, metrics = verify_weights(bundle, collection, progress=progress("verifying modules"))
        sizes = bundle.manifest.metrics.sizes if bundle.manifest.metrics else None
        payload = {"bundle": str(bundle_dir), "weights": summary, "sizes": sizes.to_json() if sizes else None}
        lines = [f"bundle {bundle_dir}: method {bundle.manifest.method}, {storage_text(bundle.manifest)}"
                 " (errors of the stored, dequantized values)", "", weight_table(summary)]
        if show_layers:
            lines += ["", layer_table(summary)]
        if sizes:
            lines += ["", sizes_text(sizes)]
        if plot_path:
            plot_errors(summary, metrics, collection.names, plot_path)
            payload["plot"] = str(plot_path)
            lines.append(f"plot: {plot_path}")
        if base_model is not None:
            checks = [c.to_json() for c in verify_outputs(bundle, collection, base_model, prompts_file=prompts_file,
                                                          max_new_tokens=max_new_tokens, progress=progress("output check"))]
            payload["outputs"] = checks
            lines += ["", "output-level check (original vs compressed adapter on the base model):", output_table(checks)]
        lines.append(ERROR_EPILOG)
        failed: list[str] = []
        if max_error is not None:
            failed = [n for n, a in summary["adapters"].items() if a["error"] > max_error]
            payload["max_error"] = max_error
            payload["failed"] = failed
        if not failed:
            emit(as_json, payload, "\n".join(lines))
            return
        if not as_json:
            click.echo("\n".join(lines))  # the full report, then the failure (exit 1)
        err = VerificationError(
            f"{len(failed)} adapter(s) exceed --max-error {max_error}: "
            + ", ".join(f"`{n}` ({summary['adapters'][n]['error']:.4f})" for n in failed),
            code="max_error",
        )
        err.report = payload  # --json: one object, the report beside the error
        raise err


@click.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--layers", "show_layers", is_flag=True, help="Also print the per-layer error table.")
@json_option
def inspect(bundle_dir: Path, show_layers: bool, as_json: bool) -> None:
    """Show a bundle's manifest: base model, method, rank, adapters, sizes and stored metrics.

    Bytes: as recorded at compress time (tensors, safetensors files, all files, each against the
    sources at bf16) and as the directory holds them now (os.stat; signature.json apart)."""
    from soppu_client.format.bundle import Bundle
    from soppu_client.report import bf16_bytes_text, disk_bytes, layer_table, sizes_text, table, weight_table

    with reporting(as_json):
        bundle = Bundle.open(bundle_dir)
        m = bundle.manifest
        lines = [
            f"bundle      {bundle_dir} ({m.format})",
            f"base model  {m.base_model}",
            f"method      {m.method}, {storage_text(m)}, dtype {m.dtype}, clusters {m.clusters}",
            f"modules     {len(m.modules)}",
            "",
            table(["adapter", "source rank", "alpha", "cluster", "core file"],
                  [[n, a.source_rank, a.alpha, a.cluster, a.core] for n, a in m.adapters.items()]),
        ]
        if m.metrics is not None:
            lines += ["", weight_table(m.metrics.summary)]
            if show_layers:
                lines += ["", layer_table({"layers": m.metrics.layers})]
            lines += ["", sizes_text(m.metrics.sizes)]
        disk = disk_bytes(bundle.path)
        sizes = m.metrics.sizes if m.metrics is not None else None
        source = sizes.source_bf16_bytes if sizes is not None else None
        disk["bf16_byte_ratio"] = source / disk["file_bytes"] if source and disk["file_bytes"] else None
        lines += ["", f"on disk     {disk['file_bytes']:,} bytes = tensors {disk['tensor_bytes']:,} + safetensors headers "
                      f"{disk['header_bytes']:,} + manifest.json {disk['manifest_bytes']:,} + metrics.json "
                      f"{disk['metrics_bytes']:,}" + (f" (signature.json {disk['signature_bytes']:,} more)"
                                                        if disk["signature_bytes"] else ""),
                  f"core files  {m.cores_layout} layout"]
        if source:
            lines.append(bf16_bytes_text(source, disk["tensor_bytes"], disk["safetensors_bytes"], disk["file_bytes"])
                         + (" (basis included)" if sizes is not None and sizes.basis_reused else ""))
        signed = (bundle.path / SIGNATURE).is_file()
        lines.append(f"signature   {'present (check with soppu verify-signature)' if signed else 'none (soppu sign)'}")
        emit(as_json, {"bundle": str(bundle_dir), "manifest": m.to_json(), "signed": signed, "disk": disk,
                       "sizes": sizes.report_json() if sizes is not None else None}, "\n".join(lines))


def storage_text(m) -> str:
    """``k=8`` or ``k=3..16 per module``, plus the bit widths of quantized storage."""
    ks = sorted({m.module_rank(x) for x in m.modules})
    text = f"k={ks[0]}" if len(ks) == 1 else f"k={ks[0]}..{ks[-1]} per module"
    bits = sorted({f"{role} {s.bits}-bit/g{s.group_size}" for q in m.quant.values() for role, s in q.items()})
    return text + (f", quantized: {', '.join(bits)}" if bits else "")


COMMANDS: list[click.Command] = [inspect, verify]
