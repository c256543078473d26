"""The `soppu` command line: parse, call the library, print. Nothing imports this module.

Exit codes: 0 ok, 1 a check failed (error above --max-error, bad signature, registry refusal),
2 bad usage or input.
"""

from __future__ import annotations

from pathlib import Path

import click

from soppu_client import __version__
from soppu_client.format.reporting import emit, json_option, progress, reporting

_EPILOG = "Errors are unsquared relative Frobenius norms ||dW - U S V^T||_F / ||dW||_F."


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="soppu")
def cli() -> None:
    """SOPPU: compress many PEFT LoRA adapters into one shared basis per weight matrix plus a
    small core per adapter, verify, sign and upload the bundle.

    \b
    Typical flow:
      soppu compress adapters/* -o bundle --rank 16
      soppu verify bundle --adapters adapters/* --base-model smollm2 --plot errors.png
      soppu keygen -o owner.key && soppu sign bundle --key owner.key --owner me --version 1
      soppu upload bundle --registry http://127.0.0.1:8080 --token ...
    """


@cli.command(epilog=_EPILOG)
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("-k", "--rank", default=16, show_default=True, type=int, help="Shared rank k per module.")
@click.option("--method", type=click.Choice(["full", "diag"]), default="full", show_default=True,
              help="full: orthonormal bases, k x k cores (JD-Full). diag: free bases, diagonal cores (JD-Diag).")
@click.option("--weighting", type=click.Choice(["equal", "norm"]), default="equal", show_default=True,
              help="equal: every adapter's relative error counts the same; norm: larger updates count more.")
@click.option("--clusters", default=1, show_default=True, type=int,
              help="Split the adapters into this many groups, each with its own bases (k-subspaces clustering).")
@click.option("--float64", "float64", is_flag=True, help="Fit in float64 (slower, for ill-conditioned collections).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="Storage dtype of basis and cores; auto keeps the adapters' own (bf16 adapters -> bf16 bundle).")
@click.option("--tol", default=1e-5, show_default=True, type=float, help="Convergence tolerance (relative objective change).")
@click.option("--max-iter", default=200, show_default=True, type=int, help="Iteration cap per module.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the randomized initialisation.")
@click.option("--force", is_flag=True, help="Replace an existing output bundle.")
@json_option
def compress(adapter_dirs, out, rank, method, weighting, clusters, float64, dtype, tol, max_iter, seed, force, as_json) -> None:
    """Compress PEFT LoRA ADAPTER_DIRS (same base model and target modules) into a bundle.

    Adapter names in the bundle are the directory names. Every problem with the inputs is
    reported at once; a failed run leaves no partial bundle.
    """
    from soppu_client.compress import CompressConfig
    from soppu_client.compress.pipeline import compress_adapters
    from soppu_client.report import sizes_text, weight_table

    with reporting(as_json):
        config = CompressConfig(rank=rank, method=method, weighting=weighting, float64=float64, seed=seed,
                                tol=tol, max_iter=max_iter, dtype=dtype, clusters=clusters)
        manifest = compress_adapters(list(adapter_dirs), out, config, force=force, progress=progress("compressing modules"))
        metrics = manifest["metrics"]
        text = "\n".join([
            f"wrote {out}: {len(manifest['adapters'])} adapters, {len(manifest['modules'])} modules, "
            f"method {method}, k={rank}, clusters {manifest['clusters']}, {manifest['fit']['seconds']:.1f}s "
            f"(iterations mean {manifest['fit']['iterations_mean']:.1f}, max {manifest['fit']['iterations_max']})",
            "",
            weight_table(metrics["summary"]),
            "",
            sizes_text(metrics["sizes"]),
            _EPILOG,
        ])
        emit(as_json, {"bundle": str(out), "fit": manifest["fit"], "metrics": metrics}, text)


@cli.command(epilog=_EPILOG)
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--onto", "onto", type=click.Path(file_okay=False, path_type=Path),
              help="Existing local bundle whose basis the new adapters join.")
@click.option("--onto-published", "published", metavar="OWNER/NAME[@V]",
              help="Or a published adapter whose basis they join (fetched from --registry, signature verified).")
@click.option("--registry", envvar="SOPPU_REGISTRY", help="Registry base URL for --onto-published (or $SOPPU_REGISTRY).")
@click.option("--token", envvar="SOPPU_TOKEN", help="Token that may read OWNER's adapters (or $SOPPU_TOKEN).")
@click.option("--public-key", "public_key", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Pin OWNER's public key (.pub) instead of trusting the key the registry lists.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing output bundle.")
@json_option
def project(adapter_dirs, onto, published, registry, token, public_key, out, force, as_json) -> None:
    """Project new ADAPTER_DIRS onto the basis of an existing bundle (no refit).

    The basis comes from a local bundle (--onto) or from a published adapter (--onto-published
    owner/name[@version] --registry URL --token T): only that version's manifest and basis are
    downloaded, after its Ed25519 signature and digests are verified. The output bundle reuses
    basis.safetensors byte for byte, so a registry or server that has the basis already only
    receives the new cores.
    """
    import tempfile

    from soppu_client.format import signing
    from soppu_client.format.errors import InputError
    from soppu_client.registry_client import RegistryClient
    from soppu_client.format.refs import AdapterRef
    from soppu_client.fetch import fetch_published_basis

    with reporting(as_json), tempfile.TemporaryDirectory(prefix="soppu-basis-") as scratch:
        if (onto is None) == (published is None):
            raise InputError("give exactly one of --onto BUNDLE and --onto-published OWNER/NAME[@VERSION]")
        label = None
        if published is not None:
            if not registry:
                raise InputError("--onto-published needs --registry URL (or $SOPPU_REGISTRY)")
            ref = AdapterRef.parse(published, label="--onto-published")
            pub = signing.load_public_key(public_key) if public_key else None
            onto, statement = fetch_published_basis(RegistryClient(registry, token), ref, Path(scratch) / "basis",
                                                    public_key=pub)
            label = f"{registry.rstrip('/')}/{ref.owner}/{ref.name}@{statement['version']}"
        _project(adapter_dirs, onto, out, force, as_json, label)


def _project(adapter_dirs, onto, out, force, as_json, label) -> None:
    from soppu_client.compress.projection import project_adapters
    from soppu_client.report import weight_table

    manifest = project_adapters(list(adapter_dirs), onto, out, force=force, progress=progress("projecting modules"),
                                onto_label=label)
    metrics = manifest["metrics"]
    sizes = metrics["sizes"]
    text = "\n".join([
        f"wrote {out}: {len(manifest['adapters'])} adapters on the basis of {manifest['fit']['projected_onto']} "
        f"(basis sha256 {manifest['fit']['basis_sha256'][:12]}...)",
        "",
        weight_table(metrics["summary"]),
        "",
        f"new parameters: {sizes['params_cores']:,} (cores only; basis reused) for {sizes['params_before']:,} "
        f"source parameters = {sizes['param_ratio']:.1f}x",
        _EPILOG,
    ])
    emit(as_json, {"bundle": str(out), "fit": manifest["fit"], "metrics": metrics}, text)


@cli.command(epilog=_EPILOG)
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
def verify(bundle_dir, more_adapter_dirs, adapter_dirs, base_model, prompts_file, max_new_tokens, max_error, plot_path, show_layers, as_json) -> None:
    """Check BUNDLE_DIR against the original adapters (--adapters DIR...): weight-level errors
    and SVD lower bounds, and with --base-model the output-level agreement (KL, top-1, greedy generations)."""
    from soppu_client.adapters import load_collection
    from soppu_client.format.bundle import Bundle
    from soppu_client.format.errors import InputError, VerificationError
    from soppu_client.report import layer_table, output_table, sizes_text, weight_table
    from soppu_client.verify import plot_errors, verify_outputs, verify_weights

    with reporting(as_json):
        bundle = Bundle.open(bundle_dir)
        dirs = [*adapter_dirs, *more_adapter_dirs]
        if not dirs:
            raise InputError("no adapters given; pass the original adapter dirs with --adapters DIR...")
        collection = load_collection(dirs)
        summary, metrics = verify_weights(bundle, collection, progress=progress("verifying modules"))
        payload = {"bundle": str(bundle_dir), "weights": summary, "sizes": bundle.manifest["metrics"].get("sizes")}
        lines = [f"bundle {bundle_dir}: method {bundle.manifest['method']}, k={bundle.rank}", "", weight_table(summary)]
        if show_layers:
            lines += ["", layer_table(summary)]
        if payload["sizes"]:
            lines += ["", sizes_text(payload["sizes"])]
        if plot_path:
            plot_errors(summary, metrics, collection.names, plot_path)
            payload["plot"] = str(plot_path)
            lines.append(f"plot: {plot_path}")
        if base_model is not None:
            checks = [c.to_json() for c in verify_outputs(bundle, collection, base_model, prompts_file=prompts_file,
                                                          max_new_tokens=max_new_tokens, progress=progress("output check"))]
            payload["outputs"] = checks
            lines += ["", "output-level check (original vs compressed adapter on the base model):", output_table(checks)]
        lines.append(_EPILOG)
        failed = []
        if max_error is not None:
            failed = [n for n, a in summary["adapters"].items() if a["error"] > max_error]
            payload["max_error"] = max_error
            payload["failed"] = failed
        if failed:
            emit_text = "\n".join(lines)
            if as_json:
                emit(True, payload, "")
            else:
                click.echo(emit_text)
            raise VerificationError(
                f"{len(failed)} adapter(s) exceed --max-error {max_error}: "
                + ", ".join(f"`{n}` ({summary['adapters'][n]['error']:.4f})" for n in failed)
            )
        emit(as_json, payload, "\n".join(lines))


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--layers", "show_layers", is_flag=True, help="Also print the per-layer error table.")
@json_option
def inspect(bundle_dir, show_layers, as_json) -> None:
    """Show a bundle's manifest: base model, method, rank, adapters, sizes and stored metrics."""
    from soppu_client.format.bundle import Bundle
    from soppu_client.report import layer_table, sizes_text, table, weight_table

    with reporting(as_json):
        bundle = Bundle.open(bundle_dir)
        m = bundle.manifest
        lines = [
            f"bundle      {bundle_dir} ({m['format']})",
            f"base model  {m['base_model']}",
            f"method      {m['method']}, k={m['rank']}, dtype {m['dtype']}, clusters {m['clusters']}",
            f"modules     {len(m['modules'])}",
            "",
            table(["adapter", "source rank", "alpha", "cluster", "core file"],
                  [[n, a.get("source_rank"), a.get("alpha"), a.get("cluster"), a["core"]] for n, a in m["adapters"].items()]),
        ]
        metrics = m.get("metrics") or {}
        if "summary" in metrics:
            lines += ["", weight_table(metrics["summary"])]
        if show_layers and "layers" in metrics:
            lines += ["", layer_table({"layers": metrics["layers"]})]
        if "sizes" in metrics:
            lines += ["", sizes_text(metrics["sizes"])]
        signed = (bundle.path / "signature.json").is_file()
        lines.append(f"signature   {'present (check with soppu verify-signature)' if signed else 'none (soppu sign)'}")
        emit(as_json, {"bundle": str(bundle_dir), "manifest": m, "signed": signed}, "\n".join(lines))


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Adapter dir to write.")
@click.option("--format", "form", type=click.Choice(["peft", "compressed"]), default="peft", show_default=True,
              help="peft: a standard LoRA dir; compressed: basis + cores for LoRAX's compressed mode.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Tensor dtype of a peft export (compressed keeps the bundle's dtype).")
@click.option("--force", is_flag=True, help="Replace an existing output dir.")
@json_option
def export(bundle_dir, name, out, form, dtype, force, as_json) -> None:
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


def _register_commands() -> None:
    """Commands defined beside the core ones: signing, upload, generate."""
    from soppu_client.cli import generate as cli_generate, signing as cli_signing, upload as cli_upload

    for module in (cli_signing, cli_upload, cli_generate):
        for command in module.COMMANDS:
            cli.add_command(command)


_register_commands()


def main() -> None:
    cli(prog_name="soppu")


if __name__ == "__main__":
    main()
