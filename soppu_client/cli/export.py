"""`soppu export`: one adapter of a bundle as a standard PEFT dir or in the served compressed form."""

from __future__ import annotations

from pathlib import Path

import click

from soppu_client.format.reporting import emit, json_option, reporting

__all__ = ["COMMANDS", "export"]


@click.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Adapter dir to write.")
@click.option("--format", "form", type=click.Choice(["peft", "compressed"]), default="peft", show_default=True,
              help="peft: a standard LoRA dir; compressed: basis + cores for LoRAX's compressed mode.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Tensor dtype of a peft export (compressed keeps the bundle's dtype).")
@click.option("--force", is_flag=True, help="Replace an existing output dir.")
@json_option
def export(bundle_dir: Path, name: str, out: Path, form: str, dtype: str, force: bool, as_json: bool) -> None:
    """Export adapter NAME from BUNDLE_DIR.

    \b
    peft        a standard PEFT LoRA dir (r=k, lora_A=V^T, lora_B=U S, scaling 1) that any
                LoRA server or PeftModel.from_pretrained loads;
    compressed  adapter_config.json (peft_type SOPPU_COMPRESSED) + basis.safetensors (its
                cluster's U, V) + cores.safetensors (S), for a LoRAX with the compressed-mode
                patches: adapters of one cluster share the basis file byte for byte."""
    from soppu_client.format.bundle import Bundle, export_peft
    from soppu_client.format.compressed_form import export_compressed

    with reporting(as_json):
        bundle = Bundle.open(bundle_dir)
        if form == "compressed":
            path = export_compressed(bundle, name, out, force=force)
        else:
            path = export_peft(bundle, name, out, dtype=dtype, force=force)
        emit(as_json, {"adapter": name, "format": form, "output": str(path)},
             f"exported `{name}` ({form}) to {path}")


COMMANDS: list[click.Command] = [export]
