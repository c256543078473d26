"""vLLM glue only: the ``soppu`` LoRA resolver plugin.

Installed with this distribution as the ``vllm.general_plugins`` entry point ``soppu``
(:func:`register`). Start stock vLLM with it::

    VLLM_PLUGINS=soppu VLLM_ALLOW_RUNTIME_LORA_UPDATING=true \\
    SOPPU_REGISTRY_URL=http://registry:8080 SOPPU_REGISTRY_TOKEN=<serving-read token> \\
    SOPPU_SERVED_BASE_MODEL=HuggingFaceTB/SmolLM2-135M-Instruct \\
    python -m vllm.entrypoints.openai.api_server --model <dir> --enable-lora

A request whose ``model`` is ``owner/name[@version]`` is then resolved through the registry,
verified and materialized as a PEFT dir by :mod:`soppu_serving` (:class:`SoppuLoRAResolver`).
With ``SOPPU_SERVE_FORMAT=compressed`` the plugin also installs the compressed path
(:mod:`vllm_lora_resolver.compressed`): cores per adapter on shared, resident bases.
Nothing from vLLM is imported until :func:`register` runs.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """The entry point vLLM calls in each of its processes: register the ``soppu`` resolver and, with
    ``SOPPU_SERVE_FORMAT=compressed``, install the compressed path's hooks (before any model is built)."""
    from soppu_serving import Settings

    if Settings.from_env().serve_format == "compressed":
        from vllm_lora_resolver.compressed import install

        install()
    from vllm_lora_resolver.resolver import register_resolver

    register_resolver()
