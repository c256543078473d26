"""LoRAX's own code (patched checkout, LORAX_PYTHON, CPU) serving a soppu adapter from a loopback registry.

LoRAX side (tests/lorax/lorax_side.py, run by LORAX_PYTHON): get_model_source("soppu", ...),
download_adapter_weights, load_adapter_config, load_module_map, LoraWeights.load and the
pure-PyTorch forward_lora path. This side: PEFT on the real SmolLM2 with the same materialized
adapter; both must give the same layer outputs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from tests.serving import srckit
import torch
from tests.lorax.loraxkit import lorax_env, lorax_python
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.lorax

N_LAYERS = 2


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    lorax_python()  # skip before building anything when LoRAX is not available
    tmp = tmp_path_factory.mktemp("lorax-e2e")
    adapters = [srckit.write_adapter(tmp / "adapters" / f"ad{i}", seed=10 + i) for i in range(2)]
    bundle = srckit.compress(adapters, tmp / "bundle", rank=8)
    reg = srckit.start_registry(tmp)
    try:
        reg.publish(bundle, version=1)
        yield reg
    finally:
        reg.stop()


def run_lorax_side(patched: Path, reg, cache: Path, inputs: Path, out: Path, adapter_id: str, token: str):
    env = lorax_env(patched, SOPPU_REGISTRY_URL=reg.url, SOPPU_CACHE_DIR=str(cache))
    args = {"adapter_id": adapter_id, "token": token, "model_id": srckit.BASE_MODEL, "n_layers": N_LAYERS,
            "inputs": str(inputs), "out": str(out)}
    return subprocess.run([lorax_python(), str(Path(__file__).with_name("lorax_side.py")), json.dumps(args)],
                          env=env, capture_output=True, text=True, timeout=600)


def test_lorax_serves_soppu_adapter_like_peft(patched_lorax: Path, registry, tmp_path: Path) -> None:
    from peft import PeftModel

    from soppu_client.base_model import load_base_model

    base, _tok = load_base_model()
    base.eval()
    torch.manual_seed(0)
    x = torch.randn(7, 576)
    n_adapter = 4  # the first 4 tokens use the adapter, the last 3 the base model
    inputs = {"x": x, "n_adapter_tokens": torch.tensor([n_adapter])}
    for i in range(N_LAYERS):
        for t in ("q_proj", "v_proj"):
            inputs[f"{i}.{t}.weight"] = getattr(base.model.layers[i].self_attn, t).weight.detach().float().contiguous()
    save_file(inputs, str(tmp_path / "inputs.safetensors"))

    cache = tmp_path / "cache"
    proc = run_lorax_side(patched_lorax, registry, cache, tmp_path / "inputs.safetensors", tmp_path / "out.safetensors",
                          f"{registry.owner}/ad0", registry.serving_token)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["has_sgmv"] is False
    assert (report["enum"], report["enum_name"], report["enum_back"]) == (4, "SOPPU", "soppu")
    assert report["source_class"] == "lorax_adapter_source.source.SoppuModelSource"
    assert report["cached_before"] is False
    served = cache / registry.owner / "ad0" / "v1"
    assert report["weight_files"] == [str(served / "adapter_model.safetensors")]
    assert report["weight_bytes"] > 0
    assert Path(report["config_path"]).resolve() == served.resolve()
    assert report["config"] == {"type": "LoraConfig", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                "base_model_name_or_path": srckit.BASE_MODEL}
    assert report["module_map"] == [f"model.layers.{i}.self_attn.{t}" for i in range(N_LAYERS)
                                    for t in ("q_proj", "v_proj")]
    lorax_out = load_file(str(tmp_path / "out.safetensors"))

    model = PeftModel.from_pretrained(base, str(served))
    model.eval()
    for i in range(N_LAYERS):
        for t in ("q_proj", "v_proj"):
            layer = getattr(model.base_model.model.model.layers[i].self_attn, t)
            with torch.no_grad():
                peft_y = layer(x)
                base_y = layer.base_layer(x)
            got = lorax_out[f"{i}.{t}"]
            # Non-vacuous: the adapter changes the output of this layer.
            assert (peft_y[:n_adapter] - base_y[:n_adapter]).abs().max() > 1e-3
            torch.testing.assert_close(got[:n_adapter], peft_y[:n_adapter], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[n_adapter:], base_y[n_adapter:], rtol=1e-5, atol=1e-5)


def test_lorax_passes_registry_errors_through(patched_lorax: Path, registry, tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1, 576), "n_adapter_tokens": torch.tensor([1])}, str(tmp_path / "in.safetensors"))
    proc = run_lorax_side(patched_lorax, registry, tmp_path / "cache", tmp_path / "in.safetensors",
                          tmp_path / "out.safetensors", f"{registry.owner}/ad1", "soppu_0000000000000000_wrong")
    assert proc.returncode != 0
    assert "soppu adapter alice/ad1: the registry at" in proc.stderr and "rejected the token" in proc.stderr
    proc = run_lorax_side(patched_lorax, registry, tmp_path / "cache", tmp_path / "in.safetensors",
                          tmp_path / "out.safetensors", f"{registry.owner}/nope", registry.serving_token)
    assert proc.returncode != 0 and "unknown adapter" in proc.stderr
    assert srckit.cache_files(tmp_path / "cache") == []
