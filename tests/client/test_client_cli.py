"""The `soppu` compress / verify / inspect / export commands, run as a user runs them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tests.conftest_bundles import BASE_MODEL
from tests.client.bundle_files import read_cores
from tests.registry.regkit import Registry, Server

from soppu_client.cli import cli

SOPPU = [sys.executable, "-m", "soppu_client.cli"]
COMMANDS = {"compress", "project", "verify", "inspect", "export", "keygen", "sign", "verify-signature", "upload",
            "bases", "rotate-key-proof", "generate"}


def run(*args, check_rc: int | None = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SOPPU, *map(str, args)], capture_output=True, text=True, timeout=600, env=env)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def cli_bundle(peft_adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "bundle"
    proc = run("compress", *peft_adapters, "-o", out, "--rank", 8, "--json")
    payload = json.loads(proc.stdout)
    assert payload["ok"] and payload["bundle"] == str(out)
    assert set(payload["metrics"]["summary"]["adapters"]) == {"alpha", "beta", "gamma"}
    return out


def test_compress_text_output(peft_adapters, tmp_path):
    proc = run("compress", *peft_adapters[:2], "-o", tmp_path / "b", "--rank", 4, "--method", "diag")
    assert "compression ratio" in proc.stdout and "alpha" in proc.stdout and "svd bound" in proc.stdout
    assert "unsquared relative Frobenius" in proc.stdout


def test_inspect_and_export(cli_bundle, tmp_path):
    info = json.loads(run("inspect", cli_bundle, "--json").stdout)
    assert info["manifest"]["rank"] == 8 and info["signed"] is False
    text = run("inspect", cli_bundle).stdout
    assert "method      full, k=8" in text
    out = tmp_path / "exp"
    assert json.loads(run("export", cli_bundle, "gamma", "-o", out, "--json").stdout)["output"] == str(out)
    assert (out / "adapter_model.safetensors").is_file()


def test_verify_weights_and_max_error(cli_bundle, peft_adapters, tmp_path):
    payload = json.loads(run("verify", cli_bundle, "--adapters", *peft_adapters, "--json", "--plot", tmp_path / "e.png").stdout)
    errors = {n: a["error"] for n, a in payload["weights"]["adapters"].items()}
    assert all(0 < e < 1 for e in errors.values())
    assert (tmp_path / "e.png").stat().st_size > 10_000
    worst = max(errors.values())
    run("verify", cli_bundle, "--adapters", *peft_adapters, "--max-error", worst + 1e-3)
    proc = run("verify", cli_bundle, "--adapters", *peft_adapters, "--max-error", worst / 2, check_rc=1)
    assert "exceed --max-error" in proc.stderr
    proc = run("verify", cli_bundle, "--adapters", *peft_adapters, "--max-error", worst / 2, "--json", check_rc=1)
    out = json.loads(proc.stdout)  # one object: the report and the error
    assert out["ok"] is False and out["error"]["code"] == "max_error" and out["failed"] and "adapters" in out["weights"]


def test_bad_input_exits_2_with_a_message(tmp_path, peft_adapters):
    proc = run("compress", peft_adapters[0], tmp_path / "nope", "-o", tmp_path / "b", check_rc=2)
    assert proc.stderr.startswith("error: 1 problem with the input adapters:")
    assert "adapter `nope`" in proc.stderr
    assert not (tmp_path / "b").exists()
    proc = run("inspect", tmp_path, check_rc=2)
    assert proc.stderr.strip() == f"error: {tmp_path} is not a SOPPU bundle: manifest.json is missing"
    proc = run("inspect", tmp_path, "--json", check_rc=2)  # --json: the error is one JSON object on stdout
    assert json.loads(proc.stdout) == {"ok": False, "error": {
        "type": "BundleError", "exit_code": 2, "message": f"{tmp_path} is not a SOPPU bundle: manifest.json is missing"}}


def test_every_command_is_registered_with_help() -> None:
    """The `soppu` group lists every command of the cli modules, and each one's --help works."""
    top = CliRunner().invoke(cli, ["--help"])
    assert top.exit_code == 0 and set(cli.commands) == COMMANDS
    for name in COMMANDS:
        assert f"  {name} " in top.output, name
        sub = CliRunner().invoke(cli, [name, "--help"])
        assert sub.exit_code == 0 and sub.output.startswith(f"Usage: cli {name} "), (name, sub.output)
        assert "--json" in sub.output, name


@pytest.fixture(scope="module")
def live_registry(tmp_path_factory) -> Registry:
    tmp = tmp_path_factory.mktemp("registry")
    server = Server(tmp / "data", "--rate", "0").start()
    try:
        yield Registry(server, tmp)
    finally:
        server.stop()


def test_registry_options_read_soppu_registry_url_and_token(live_registry, tmp_path):
    """upload / bases take --registry and --token from $SOPPU_REGISTRY_URL / $SOPPU_REGISTRY_TOKEN
    (the serving side's names); the old $SOPPU_REGISTRY / $SOPPU_TOKEN are not read."""
    owner = live_registry.new_owner()
    bundle = owner.bundle(tmp_path / "b", adapters=("alpha",))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SOPPU_REGISTRY", "SOPPU_TOKEN"))}
    env = {**clean, "SOPPU_REGISTRY_URL": live_registry.url, "SOPPU_REGISTRY_TOKEN": owner.write_token}
    proc = run("upload", bundle, env=env)
    assert proc.stdout == f"published {owner.name}/alpha@1 (created)\n"
    found = json.loads(run("bases", BASE_MODEL, "--json", env={**env, "SOPPU_REGISTRY_TOKEN": owner.read_token}).stdout)
    assert [f"{u['owner']}/{u['name']}" for b in found["bases"] for u in b["used_by"]] == [f"{owner.name}/alpha"]
    old = {**clean, "SOPPU_REGISTRY": live_registry.url, "SOPPU_TOKEN": owner.read_token}
    proc = run("bases", BASE_MODEL, env=old, check_rc=2)
    assert "Missing option '--registry'" in proc.stderr
    proc = run("bases", BASE_MODEL, "--registry", live_registry.url, env=old, check_rc=2)
    assert "Missing option '--token'" in proc.stderr
    proc = run("project", tmp_path / "new", "--onto-published", f"{owner.name}/alpha", "-o", tmp_path / "p", env=old,
               check_rc=2)
    assert proc.stderr == "error: --onto-published needs --registry URL (or $SOPPU_REGISTRY_URL)\n"


@pytest.mark.slow
def test_verify_outputs_on_real_model(cli_bundle, peft_adapters, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Reverse the word: garden", {"prompt": "What is 2+3?", "answer": "5"}]))
    payload = json.loads(
        run("verify", cli_bundle, "--adapters", *peft_adapters, "--base-model", "smollm2", "--prompts", prompts,
            "--max-new-tokens", 6, "--json").stdout
    )
    checks = {c["adapter"]: c for c in payload["outputs"]}
    assert set(checks) == {"alpha", "beta", "gamma"}
    for c in checks.values():
        assert c["prompts"] == 2 and c["mean_kl"] >= 0 and 0 <= c["top1_agreement"] <= 1


def test_export_compressed_form(peft_adapters, tmp_path):
    """`soppu export --format compressed` on a 2-cluster bundle: the dir holds exactly the adapter's
    cluster basis and its core (read back with the safetensors library), adapters of one cluster get
    byte-identical basis files, and U S V^T equals the PEFT export's B A."""
    from safetensors.torch import load_file

    bundle = tmp_path / "clustered"
    run("compress", *peft_adapters, "-o", bundle, "--rank", 4, "--clusters", 2, "--json")
    manifest = json.loads((bundle / "manifest.json").read_text())
    clusters = {n: a["cluster"] for n, a in manifest["adapters"].items()}
    assert sorted(set(clusters.values())) == [0, 1]  # non-vacuous: both clusters used
    bundle_basis = load_file(str(bundle / "basis.safetensors"))
    basis_bytes = {}
    for name, c in clusters.items():
        out = tmp_path / f"{name}-c"
        payload = json.loads(run("export", bundle, name, "-o", out, "--format", "compressed", "--json").stdout)
        assert payload["format"] == "compressed" and payload["output"] == str(out)
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "basis.safetensors", "cores.safetensors"]
        config = json.loads((out / "adapter_config.json").read_text())
        assert (config["peft_type"], config["format"], config["adapter"]) == ("SOPPU_COMPRESSED", "soppu-compressed/1", name)
        assert config["basis"]["cluster"] == c
        for part in ("basis", "cores"):
            data = (out / config[part]["file"]).read_bytes()
            assert config[part]["size"] == len(data)
            assert config[part]["sha256"] == hashlib.sha256(data).hexdigest()
        basis_bytes[name] = (out / "basis.safetensors").read_bytes()
        basis = load_file(str(out / "basis.safetensors"))
        cores = load_file(str(out / "cores.safetensors"))
        assert set(basis) == {f"{m}.{s}" for m in manifest["modules"] for s in ("U", "V")}
        bundle_cores = read_cores(bundle, name)  # the packed core file, read from the format spec
        assert set(cores) == set(bundle_cores) and all(torch.equal(cores[k].double(), bundle_cores[k]) for k in cores)
        peft_dir = tmp_path / f"{name}-p"
        run("export", bundle, name, "-o", peft_dir)
        peft = load_file(str(peft_dir / "adapter_model.safetensors"))
        for module in manifest["modules"]:
            U, V, S = basis[f"{module}.U"], basis[f"{module}.V"], cores[f"{module}.S"]
            assert torch.equal(U, bundle_basis[f"{module}.c{c}.U"]) and torch.equal(V, bundle_basis[f"{module}.c{c}.V"])
            A = peft[f"base_model.model.{module}.lora_A.weight"]
            B = peft[f"base_model.model.{module}.lora_B.weight"]
            torch.testing.assert_close(U @ S @ V.T, B @ A, rtol=1e-5, atol=1e-6)
    names = sorted(clusters)
    for a in names:
        for b in names:
            assert (basis_bytes[a] == basis_bytes[b]) == (clusters[a] == clusters[b]), (a, b)
    proc = run("export", bundle, "nobody", "-o", tmp_path / "nobody", "--format", "compressed", check_rc=2)
    assert "nobody" in proc.stderr and not (tmp_path / "nobody").exists()


def test_compress_is_byte_reproducible(cli_bundle, peft_adapters, tmp_path):
    """Same adapters, same options, another process: the same basis and core bytes (so a re-upload
    is idempotent on the registry and a basis digest names its content)."""
    again = tmp_path / "again"
    run("compress", *peft_adapters, "-o", again, "--rank", 8, "--json")
    files = ["basis.safetensors", *(f"cores/{n}.safetensors" for n in ("alpha", "beta", "gamma"))]
    for rel in files:
        assert (again / rel).read_bytes() == (cli_bundle / rel).read_bytes(), rel
