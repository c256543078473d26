"""vLLM glue only: the ``soppu`` LoRA resolver plugin.

Installed with this distribution as the ``vllm.general_plugins`` entry point ``soppu``
(:func:`register`). Start stock vLLM with it::

    VLLM_PLUGINS=soppu VLLM_ALLOW_RUNTIME_LORA_UPDATING=true \\
    SOPPU_REGISTRY_URL=http://registry:8080 SOPPU_REGISTRY_TOKEN=<serving-read token> \\
    SOPPU_SERVED_BASE_MODEL=HuggingFaceTB/SmolLM2-135M-Instruct \\
    python -m vllm.entrypoints.openai.api_server --model <dir> --enable-lora

A request whose ``model`` is ``owner/name[@version]`` is then resolved through the registry,
verified and materialized as a PEFT dir by :mod:`soppu_serving` (:class:`SoppuLoRAResolver`).
Nothing from vLLM is imported until :func:`register` runs.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """The entry point vLLM calls in each of its processes: register the ``soppu`` resolver."""
    from vllm_lora_resolver.resolver import register_resolver

    register_resolver()
