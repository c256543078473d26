"""Constants and helpers shared by the compressed-mode tests (imported by name)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
N_LAYERS = 2
MODULES = [f"model.layers.{i}.self_attn.{t}" for i in range(N_LAYERS) for t in ("q_proj", "v_proj")]


def peft_layer(model, module: str):
    i, t = int(module.split(".")[2]), module.split(".")[-1]
    return getattr(model.base_model.model.model.layers[i].self_attn, t)
