"""Fixtures for the client tests: the real SmolLM2-135M model and real PEFT adapters on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "adapters"


def example_adapter_dirs() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if (p / "adapter_config.json").is_file()) if EXAMPLES.is_dir() else []


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default base model, fp32, eval mode."""
    from soppu_client.base_model import load_base_model

    return load_base_model()


def _save_random_adapter(model, out: Path, seed: int, **lora_kwargs) -> Path:
    """A real PEFT LoRA on ``model`` with non-zero random A and B (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                  task_type="CAUSAL_LM", lora_dropout=0.0)
    kwargs.update(lora_kwargs)
    config = LoraConfig(**kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    peft_model.save_pretrained(out)
    peft_model.unload()  # restores the plain base model in place
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_NAME
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="session")
def peft_adapters(smollm2, tmp_path_factory) -> list[Path]:
    """Three real PEFT adapters of different ranks (4, 8, 6; one rsLoRA, one with rank/alpha patterns)."""
    model, _ = smollm2
    root = tmp_path_factory.mktemp("adapters")
    return [
        _save_random_adapter(model, root / "alpha", 1, r=4, lora_alpha=8),
        _save_random_adapter(model, root / "beta", 2, r=8, lora_alpha=32, use_rslora=True),
        _save_random_adapter(model, root / "gamma", 3, r=6, lora_alpha=12,
                             rank_pattern={"layers.1.self_attn.q_proj": 3}, alpha_pattern={"v_proj": 4}),
    ]
