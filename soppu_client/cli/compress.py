"""`soppu compress` (fit a shared basis) and `soppu project` (join an existing basis, no refit)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from soppu_client.cli.options import ERROR_EPILOG, registry_option, token_option
from soppu_client.format.errors import InputError
from soppu_client.format.names import REGISTRY_URL_ENV
from soppu_client.format.reporting import emit, json_option, progress, reporting

__all__ = ["COMMANDS", "compress", "project"]


@click.command(epilog=ERROR_EPILOG)
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("-k", "--rank", default=16, show_default=True, type=int, help="Shared rank k per module.")
@click.option("--method", type=click.Choice(["full", "diag"]), default="full", show_default=True,
              help="full: orthonormal bases, k x k cores (JD-Full). diag: free bases, diagonal cores (JD-Diag).")
@click.option("--weighting", type=click.Choice(["equal", "norm"]), default="equal", show_default=True,
              help="equal: every adapter's relative error counts the same; norm: larger updates count more (the "
                   "plain Frobenius objective, LoRALoLA's; better when the adapters' norms are alike, see README).")
@click.option("--clusters", default=1, show_default=True, type=int,
              help="Split the adapters into this many groups, each with its own bases (k-subspaces clustering).")
@click.option("--float64", "float64", is_flag=True, help="Fit in float64 (slower, for ill-conditioned collections).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="Storage dtype of basis and cores; auto keeps the adapters' own (bf16 adapters -> bf16 bundle).")
@click.option("--tol", default=3e-5, show_default=True, type=float,
              help="Stop when an iteration lowers the fit's relative error by less than TOL times itself.")
@click.option("--max-iter", default=200, show_default=True, type=int, help="Iteration cap per module.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the randomized initialisation.")
@click.option("--calibration", type=click.Choice(["auto", "none"]), default="none", show_default=True,
              help="auto: weight the fit (method full) by each module's input and loss-gradient second moments on "
                   "the base model, from the adapters' calibration.jsonl (owner's own prompts; used locally, never "
                   "stored in the bundle); adapters without the file: plain fit. none: plain fit (the default until "
                   "benchmarks/fidelity.py shows a task-accuracy gain at equal size; see README).")
@click.option("--base-model", default=None,
              help="Base model for --calibration: a local HF dir, or `smollm2` for the embedded default (default).")
@click.option("--calibration-powers", default="0.5,0.5", show_default=True, metavar="A,B",
              help="Exponents of the weighted fit ||Gamma^(A/2) (dW - U S V^T) Sigma^(B/2)||: A output side, B input side.")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default=None,
              help="Store U, V and the cores as BITS-bit codes with fp16 per-group scales (error-aware GPTQ-style "
                   "rounding). Default: float at --dtype. With --budget: the only bit width the budget may use.")
@click.option("--group-size", default=64, show_default=True, type=int,
              help="Entries per quantization scale: down each basis column; over the whole flattened core.")
@click.option("--budget", default=None, metavar="Nx|SIZE",
              help="Byte budget in file bytes (tensors, safetensors headers, manifest.json, metrics.json): 9x = "
                   "the bundle's files at most 1/9 of the sources' tensors at bf16; or 2MB, 500KB, "
                   "1.5GiB. Spreads k (<= --rank, now the largest k) and bits (2/3/4/8/float) across modules to "
                   "minimize the total error.")
@click.option("--rounding", type=click.Choice(["gptq", "absmax"]), default="gptq", show_default=True,
              help="gptq: error-aware rounding against the fit; absmax: naive round-to-nearest (baseline).")
@click.option("--force", is_flag=True, help="Replace an existing output bundle.")
@json_option
def compress(adapter_dirs: tuple[Path, ...], out: Path, rank: int, method: str, weighting: str, clusters: int,
             float64: bool, dtype: str, tol: float, max_iter: int, seed: int, calibration: str, base_model: str | None,
             calibration_powers: str, bits: str | None, group_size: int, budget: str | None, rounding: str,
             force: bool, as_json: bool) -> None:
    """Compress PEFT LoRA ADAPTER_DIRS (same base model and target modules) into a bundle.

    Adapter names in the bundle are the directory names. Every problem with the inputs is
    reported at once; a failed run leaves no partial bundle.
    """
    from soppu_client.compress import CompressConfig
    from soppu_client.compress.pipeline import compress_adapters
    from soppu_client.report import sizes_text, weight_table

    with reporting(as_json):
        try:
            power_a, power_b = (float(x) for x in calibration_powers.split(","))
        except ValueError:
            raise InputError(f"--calibration-powers should be two numbers A,B (e.g. 0.5,0.5), not {calibration_powers!r}") from None
        config = CompressConfig(rank=rank, method=method, weighting=weighting, float64=float64, seed=seed,
                                tol=tol, max_iter=max_iter, dtype=dtype, clusters=clusters, calibration=calibration,
                                calibration_output_power=power_a, calibration_input_power=power_b,
                                bits=int(bits) if bits else None, group_size=group_size, budget=budget,
                                rounding=rounding)
        manifest = compress_adapters(list(adapter_dirs), out, config, force=force, progress=progress("compressing modules"),
                                     base_model=base_model)
        metrics, fit = manifest.metrics, manifest.fit
        text = "\n".join([
            f"wrote {out}: {len(manifest.adapters)} adapters, {len(manifest.modules)} modules, "
            f"method {method}, k={rank}, clusters {manifest.clusters}, {fit['seconds']:.1f}s "
            f"(iterations mean {fit['iterations_mean']:.1f}, max {fit['iterations_max']})",
            *([f"calibration: weighted fit from {c['prompts']} prompts of {c['adapters']} adapter(s), "
               f"powers a={c['output_power']:g} (output), b={c['input_power']:g} (input); errors below are plain "
               "(unweighted)"] if (c := fit.get("calibration_used")) else []),
            "",
            weight_table(metrics.summary),
            "",
            sizes_text(metrics.sizes),
            *_storage_lines(fit.get("storage"), metrics.sizes),
            ERROR_EPILOG,
        ])
        report = {**metrics.to_json(), "sizes": metrics.sizes.report_json()}
        emit(as_json, {"bundle": str(out), "fit": fit, "metrics": report}, text)


def _storage_lines(plan: dict | None, sizes) -> list[str]:
    """Chosen k and bits per module (--bits / --budget) and the byte ratio against bf16 sources."""
    if not plan:
        return []
    lines = []
    if "budget_bytes" in plan:
        lines.append(f"budget {plan['budget']}: {plan['budget_bytes']:,} file bytes allowed, {sizes.file_bytes:,} "
                     f"written (planned: safetensors {plan['planned_safetensors_bytes']:,} + at most "
                     f"{plan['json_bytes_bound']:,} of manifest.json and metrics.json)")
    rows: dict[tuple, list[str]] = {}
    for module, c in plan["modules"].items():
        rows.setdefault((c["k"], c["basis_bits"] or "float", c["core_bits"] or "float"), []).append(module)
    lines.append("k  basis bits  core bits  modules")
    for (k, bb, bc), mods in sorted(rows.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(mods[:3]) + (f" and {len(mods) - 3} more" if len(mods) > 3 else "")
        lines.append(f"{k:>2}  {bb!s:>10}  {bc!s:>9}  {len(mods)}: {shown}")
    return lines


@click.command(epilog=ERROR_EPILOG)
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--onto", "onto", type=click.Path(file_okay=False, path_type=Path),
              help="Existing local bundle whose basis the new adapters join.")
@click.option("--onto-published", "published", metavar="OWNER/NAME[@V]",
              help="Or a published adapter whose basis they join (fetched from --registry, signature verified).")
@registry_option("Registry base URL for --onto-published", required=False)
@token_option("Token that may read OWNER's adapters", required=False)
@click.option("--public-key", "public_key", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Pin OWNER's public key (.pub). Without it: trust on first use (the key first accepted for "
                   "OWNER, recorded under $SOPPU_CONFIG_DIR or ~/.config/soppu/known_keys, or one the registry's "
                   "rotation proofs lead to from it).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing output bundle.")
@json_option
def project(adapter_dirs: tuple[Path, ...], onto: Path | None, published: str | None, registry: str | None,
            token: str | None, public_key: Path | None, out: Path, force: bool, as_json: bool) -> None:
    """Project new ADAPTER_DIRS onto the basis of an existing bundle (no refit).

    The basis comes from a local bundle (--onto) or from a published adapter (--onto-published
    owner/name[@version] --registry URL --token T): only that version's manifest and basis are
    downloaded, after its Ed25519 signature and digests are verified. The output bundle reuses
    basis.safetensors byte for byte, so a registry or server that has the basis already only
    receives the new cores.
    """
    from soppu_client.compress.pipeline import project_adapters
    from soppu_client.fetch import fetch_published_basis
    from soppu_client.format import signing
    from soppu_client.format.refs import AdapterRef
    from soppu_client.known_keys import KnownKeys, default_known_keys_dir
    from soppu_client.registry_client import RegistryClient
    from soppu_client.report import weight_table

    with reporting(as_json), tempfile.TemporaryDirectory(prefix="soppu-basis-") as scratch:
        if (onto is None) == (published is None):
            raise InputError("give exactly one of --onto BUNDLE and --onto-published OWNER/NAME[@VERSION]")
        label = None
        if published is not None:
            if not registry:
                raise InputError(f"--onto-published needs --registry URL (or ${REGISTRY_URL_ENV})")
            ref = AdapterRef.parse(published, label="--onto-published")
            pub = signing.load_public_key(public_key) if public_key else None
            known = None if pub is not None else KnownKeys(default_known_keys_dir(registry))
            onto, statement = fetch_published_basis(RegistryClient(registry, token), ref, Path(scratch) / "basis",
                                                    public_key=pub, known_keys=known)
            label = f"{registry.rstrip('/')}/{ref.owner}/{ref.name}@{statement['version']}"
        manifest = project_adapters(list(adapter_dirs), onto, out, force=force, progress=progress("projecting modules"),
                                    onto_label=label)
        metrics, fit = manifest.metrics, manifest.fit
        sizes = metrics.sizes
        text = "\n".join([
            f"wrote {out}: {len(manifest.adapters)} adapters on the basis of {fit['projected_onto']} "
            f"(basis sha256 {fit['basis_sha256'][:12]}...)",
            "",
            weight_table(metrics.summary),
            "",
            f"new parameters: {sizes.params_cores:,} (cores only; basis reused) for {sizes.params_before:,} "
            f"source parameters = {sizes.param_ratio:.1f}x",
            ERROR_EPILOG,
        ])
        report = {**metrics.to_json(), "sizes": metrics.sizes.report_json()}
        emit(as_json, {"bundle": str(out), "fit": fit, "metrics": report}, text)


COMMANDS: list[click.Command] = [compress, project]
