"""`soppu-cache prune` on a cache filled by the real source from the real registry: old versions
and the blobs only they used go; the latest versions (both serving forms) still load; a pruned
version can be fetched again."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.serving import srckit

from soppu_serving.cache import Cache
from soppu_serving.session import forget_sessions
from soppu_client.format.compressed_form import load_compressed
from lorax_adapter_source.source import SoppuModelSource


def prune(cache: Path, *args: str) -> dict:
    proc = subprocess.run([str(srckit.BIN / "soppu-cache"), "prune", "--cache", str(cache), "--json", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def test_prune_keeps_latest_and_drops_what_only_old_versions_used(published, source_env: Path) -> None:
    reg = published.registry
    tmp = published.tmp / "prune"
    v1 = srckit.compress([srckit.write_adapter(tmp / "v1" / "pr0", seed=700)], tmp / "b1", rank=4)
    v2 = srckit.compress([srckit.write_adapter(tmp / "v2" / "pr0", seed=701)], tmp / "b2", rank=4)
    reg.publish(v1, version=1)
    tok = reg.serving_token
    for form in ("peft", "compressed"):
        SoppuModelSource(f"{reg.owner}/pr0", api_token=tok, form=form).download_model_assets()
    reg.publish(v2, version=2)
    forget_sessions()
    for form in ("peft", "compressed"):
        SoppuModelSource(f"{reg.owner}/pr0", api_token=tok, form=form).download_model_assets()
    peft_v1, peft_v2 = source_env / reg.owner / "pr0" / "v1", source_env / reg.owner / "pr0" / "v2"
    comp_v1, comp_v2 = (source_env / ".compressed" / reg.owner / "pr0" / f"v{v}" for v in (1, 2))
    assert all(p.is_dir() for p in (peft_v1, peft_v2, comp_v1, comp_v2))
    old_blobs = {f["sha256"] for f in json.loads((peft_v1 / "soppu_source.json").read_text())["files"]}
    old_blobs.add(json.loads((comp_v1 / "adapter_config.json").read_text())["basis"]["sha256"])
    blob = source_env / ".blobs" / "sha256"
    assert all((blob / h).is_file() for h in old_blobs)

    dry = prune(source_env, "--dry-run")
    assert sorted(dry["removed_dirs"]) == [f".compressed/{reg.owner}/pr0/v1", f"{reg.owner}/pr0/v1"]
    assert set(dry["removed_blobs"]) == old_blobs and dry["bytes"] > 0
    assert peft_v1.is_dir() and comp_v1.is_dir() and all((blob / h).is_file() for h in old_blobs)

    done = prune(source_env)
    assert sorted(done["removed_dirs"]) == sorted(dry["removed_dirs"]) and done["busy"] == 0
    assert not peft_v1.exists() and not comp_v1.exists()
    assert not any((blob / h).exists() for h in old_blobs)
    assert not any((source_env / ".tmp").iterdir())
    new_blobs = {f["sha256"] for f in json.loads((peft_v2 / "soppu_source.json").read_text())["files"]}
    new_blobs.add(json.loads((comp_v2 / "adapter_config.json").read_text())["basis"]["sha256"])
    assert not new_blobs & old_blobs and all((blob / h).is_file() for h in new_blobs)
    # What stays still serves: the PEFT dir complete, the compressed dir's digests intact.
    forget_sessions()
    latest = SoppuModelSource(f"{reg.owner}/pr0", api_token=tok, form="peft")
    assert latest.weight_files() == [peft_v2 / "adapter_model.safetensors"]
    load_compressed(comp_v2)
    # A second prune finds nothing more to remove.
    assert prune(source_env)["removed_dirs"] == [] and prune(source_env)["removed_blobs"] == []
    # A pinned request for the pruned version fetches and verifies it again.
    again = SoppuModelSource(f"{reg.owner}/pr0@1", api_token=tok, form="peft")
    again.download_model_assets()
    assert again.last_stats.materialized and "cores/pr0.safetensors" in again.last_stats.blobs_downloaded


def test_prune_skips_a_version_whose_lock_is_held(published, source_env: Path) -> None:
    """The source builds and prune removes a version dir under the one ``Cache.version_lock``."""
    reg = published.registry
    bundle = srckit.publish_fresh(published, ("lk0",), seed=800)
    tok = reg.serving_token
    SoppuModelSource(f"{reg.owner}/lk0", api_token=tok).download_model_assets()
    reg.publish(bundle, version=2)
    forget_sessions()
    SoppuModelSource(f"{reg.owner}/lk0", api_token=tok).download_model_assets()
    v1 = source_env / reg.owner / "lk0" / "v1"
    with Cache(source_env, "peft").version_lock(reg.owner, "lk0", 1, timeout=0):
        busy = prune(source_env)
    assert busy["busy"] == 1 and f"{reg.owner}/lk0/v1" not in busy["removed_dirs"] and v1.is_dir()
    assert f"{reg.owner}/lk0/v1" in prune(source_env)["removed_dirs"] and not v1.exists()


def test_prune_bad_cache_dir(tmp_path: Path) -> None:
    proc = subprocess.run([str(srckit.BIN / "soppu-cache"), "prune", "--cache", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == f"error: {tmp_path / 'none'} is not a directory (no soppu cache there; pass --cache DIR)\n"
    proc = subprocess.run([str(srckit.BIN / "soppu-cache"), "prune", "--cache", str(tmp_path / "none"), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {"ok": False, "error": {
        "type": "InputError", "exit_code": 2,
        "message": f"{tmp_path / 'none'} is not a directory (no soppu cache there; pass --cache DIR)"}}
