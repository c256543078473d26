"""`soppu generate`: stream a completion from a LoRAX server that serves SOPPU adapters.

Uses the PyPI ``lorax-client``; that client rejects source names it does not know, so no
``adapter_source`` is sent: the server must be launched with ``--default-adapter-source soppu``
(see server_patches/README.md). The token is the registry token LoRAX forwards to the registry
(owner-read or serving-read). A refusal or an unreachable server is exit 1.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from soppu_client.cli.options import token_option
from soppu_client.format.errors import InputError, SoppuError
from soppu_client.format.refs import AdapterRef
from soppu_client.format.reporting import emit, json_option, reporting

__all__ = ["COMMANDS", "generate"]


def _check_adapter(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        AdapterRef.parse(value, label="adapter")
    except InputError as e:
        raise click.BadParameter(str(e)) from None
    return value


@click.command()
@click.argument("prompt")
@click.option("--server", envvar="SOPPU_LORAX_URL", required=True,
              help="LoRAX base URL, e.g. http://127.0.0.1:8080 (or $SOPPU_LORAX_URL).")
@click.option("--adapter", required=True, callback=_check_adapter, help="owner/name[@version] in the registry.")
@token_option("Registry token LoRAX uses to fetch the adapter", required=False)
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Sample with this temperature (default: greedy).")
@click.option("--seed", default=None, type=int, help="Sampling seed.")
@click.option("--timeout", default=120, show_default=True, type=click.IntRange(min=1), help="Seconds per request.")
@json_option
def generate(prompt: str, server: str, adapter: str, token: str | None, max_new_tokens: int, temperature: float | None,
             seed: int | None, timeout: int, as_json: bool) -> None:
    """Generate from PROMPT with SOPPU adapter --adapter on a LoRAX --server, streaming tokens
    (with --json: one JSON object at the end instead)."""
    with reporting(as_json):
        try:
            from lorax import Client
        except ImportError:
            raise InputError("`soppu generate` needs the lorax-client package: pip install lorax-client") from None
        client = Client(server.rstrip("/"), timeout=timeout)
        params: dict[str, Any] = {"adapter_id": adapter, "api_token": token, "max_new_tokens": max_new_tokens}
        if temperature is not None:
            params.update(do_sample=True, temperature=temperature)
        if seed is not None:
            params["seed"] = seed
        tokens: list[str] = []
        final: Any = None
        try:
            for event in client.generate_stream(prompt, **params):
                if not event.token.special:
                    tokens.append(event.token.text)
                    if not as_json:
                        sys.stdout.write(event.token.text)
                        sys.stdout.flush()
                if event.details is not None:
                    final = event
        except Exception as exc:  # lorax-client raises its own exception per HTTP status, requests its own
            if tokens and not as_json:
                click.echo("")  # end the streamed line before the error
            raise SoppuError(_failure(server, adapter, exc)) from None
        text = final.generated_text if final is not None and final.generated_text is not None else "".join(tokens)
        details = final.details if final is not None else None
        emit(as_json, {"server": server, "adapter": adapter, "generated_text": text,
                       "generated_tokens": getattr(details, "generated_tokens", len(tokens)),
                       "finish_reason": getattr(getattr(details, "finish_reason", None), "value", None)},
             "")  # text mode: the tokens are streamed already; end their line


def _failure(server: str, adapter: str, exc: Exception) -> str:
    """What went wrong, naming the server and the adapter."""
    import requests

    if isinstance(exc, requests.RequestException):
        return f"cannot reach LoRAX at {server}: {exc}"
    return f"LoRAX at {server} refused adapter {adapter}: {type(exc).__name__}: {exc}"


COMMANDS: list[click.Command] = [generate]
