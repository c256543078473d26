"""What the vLLM compressed path refuses, and the exact messages (run in `.venv-vllm`, no server):
an unsupported vLLM version, a configuration it cannot serve (tensor parallel, fully sharded, CUDA
graphs: the CUDA platform check is exercised with the platform's answer patched, no GPU here), an
adapter with k above --max-lora-rank or a module the model lacks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.serving import srckit
from tests.vllm import vllmkit

SCRIPT = r'''
import json, sys, types
import vllm
out = {}
from vllm_lora_resolver.compressed import hooks
real = vllm.__version__
vllm.__version__ = "0.31.1"
try:
    hooks.install()
except hooks.UnsupportedVllmError as e:
    out["version"] = str(e)
vllm.__version__ = real
from vllm_lora_resolver.compressed.layers import UnsupportedConfig, _check_supported
layer = types.SimpleNamespace(tp_size=2, _enable_aux_cuda_stream=False)
try:
    _check_supported(layer, types.SimpleNamespace(fully_sharded_loras=True))
except UnsupportedConfig as e:
    out["config"] = str(e)
from vllm.config import CUDAGraphMode, VllmConfig, set_current_vllm_config
import vllm.platforms
cfg = VllmConfig()
cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL  # as on a CUDA machine without --enforce-eager
is_cuda = vllm.platforms.current_platform.is_cuda_alike
vllm.platforms.current_platform.is_cuda_alike = lambda: True
with set_current_vllm_config(cfg):
    try:
        _check_supported(types.SimpleNamespace(tp_size=1, _enable_aux_cuda_stream=False),
                         types.SimpleNamespace(fully_sharded_loras=False))
    except UnsupportedConfig as e:
        out["graphs"] = str(e)
vllm.platforms.current_platform.is_cuda_alike = is_cuda
import torch
from vllm_lora_resolver.compressed.loader import CompressedLoadError, load_compressed_lora
path = sys.argv[1]
for name, kwargs in {"rank": dict(expected_modules={"q_proj", "v_proj"}, max_rank=8),
                     "module": dict(expected_modules={"q_proj"}, max_rank=16)}.items():
    try:
        load_compressed_lora(path, lora_id=1, name="alice/x@1", dtype=torch.float32, **kwargs)
    except CompressedLoadError as e:
        out[name] = str(e)
m = load_compressed_lora(path, lora_id=1, name="alice/x@1", expected_modules={"q_proj", "v_proj"},
                         dtype=torch.float32, max_rank=16)
m2 = load_compressed_lora(path, lora_id=2, name="alice/y@1", expected_modules={"q_proj", "v_proj"},
                          dtype=torch.float32, max_rank=16)
a = next(iter(m.loras.values()))
b = m2.loras[a.module_name]
out["shared_basis"] = a.lora_b is b.lora_b
out["core_shape"] = list(a.lora_a.shape)
print(json.dumps(out))
'''


def test_refusals_name_the_fix(tmp_path: Path) -> None:
    python = vllmkit.vllm_python()
    examples = vllmkit.REPO / "examples" / "adapters"
    bundle = srckit.compress([examples / "uppercase", examples / "initials"], tmp_path / "b", rank=16)
    srckit.run("soppu", "export", str(bundle), "uppercase", "-o", str(tmp_path / "c"), "--format", "compressed")
    proc = subprocess.run([str(python), "-c", SCRIPT, str(tmp_path / "c")], capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["version"] == (
        "soppu compressed serving (SOPPU_SERVE_FORMAT=compressed) hooks private vLLM LoRA internals and supports "
        "vLLM 0.32.0 only; this is vLLM 0.31.1. Install a supported vLLM (scripts/setup_vllm.sh pins it) or serve "
        "the PEFT form (SOPPU_SERVE_FORMAT=peft)")
    assert out["config"] == (
        "soppu compressed: SOPPU_SERVE_FORMAT=compressed cannot serve with tensor parallel size 2 (run with "
        "--tensor-parallel-size 1); --fully-sharded-loras (leave it off)")
    assert out["graphs"] == (
        "soppu compressed: SOPPU_SERVE_FORMAT=compressed cannot serve with CUDA graphs (the SOPPU compressed state "
        "changes as adapters load, a captured graph would not see it: start vLLM with --enforce-eager)")
    c = tmp_path / "c"
    assert out["rank"] == (f"compressed LoRA adapter alice/x@1 ({c}) cannot be served here: k=16 exceeds "
                           "--max-lora-rank 8: start vLLM with --max-lora-rank >= 16")
    assert out["module"].startswith(f"compressed LoRA adapter alice/x@1 ({c}) cannot be served here: module "
                                    "model.layers.0.self_attn.v_proj (v_proj is not one of ['q_proj'])")
    assert out["shared_basis"] is True, "two loads of one basis file must share the basis tensors"
    assert out["core_shape"] == [16, 16]
