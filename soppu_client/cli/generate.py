"""`soppu generate`: stream a completion from a LoRAX server that serves SOPPU adapters.

Registered on the `soppu` group by cli.py via ``COMMANDS``. Uses the PyPI ``lorax-client``; that
client rejects source names it does not know, so no ``adapter_source`` is sent: the server must be
launched with ``--default-adapter-source soppu`` (see server_patches/README.md). The token is the
registry token LoRAX forwards to the registry (owner-read or serving-read).

Exit codes: 0 ok, 1 the server refused or could not be reached, 2 bad usage.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

__all__ = ["COMMANDS", "generate"]

def _check_adapter(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    from soppu_client.format.errors import InputError
    from soppu_client.format.refs import AdapterRef

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
@click.option("--token", envvar="SOPPU_TOKEN", default=None,
              help="Registry token LoRAX uses to fetch the adapter (or $SOPPU_TOKEN).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Sample with this temperature (default: greedy).")
@click.option("--seed", default=None, type=int, help="Sampling seed.")
@click.option("--timeout", default=120, show_default=True, type=click.IntRange(min=1), help="Seconds per request.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end instead of streaming text.")
def generate(prompt: str, server: str, adapter: str, token: str | None, max_new_tokens: int, temperature: float | None,
             seed: int | None, timeout: int, as_json: bool) -> None:
    """Generate from PROMPT with SOPPU adapter --adapter on a LoRAX --server, streaming tokens."""
    from lorax import Client

    client = Client(server.rstrip("/"), timeout=timeout)
    params: dict[str, Any] = {"adapter_id": adapter, "api_token": token, "max_new_tokens": max_new_tokens}
    if temperature is not None:
        params.update(do_sample=True, temperature=temperature)
    if seed is not None:
        params["seed"] = seed
    tokens: list[str] = []
    final: Any = None
    out: Callable[[str], None] = (lambda s: None) if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    try:
        for event in client.generate_stream(prompt, **params):
            if not event.token.special:
                tokens.append(event.token.text)
                out(event.token.text)
            if event.details is not None:
                final = event
    except Exception as exc:  # lorax-client raises its own exception per HTTP status, requests its own
        _fail(server, adapter, exc, as_json)
    text = final.generated_text if final is not None and final.generated_text is not None else "".join(tokens)
    if as_json:
        details = final.details if final is not None else None
        click.echo(json.dumps({"ok": True, "server": server, "adapter": adapter, "generated_text": text,
                               "generated_tokens": getattr(details, "generated_tokens", len(tokens)),
                               "finish_reason": getattr(getattr(details, "finish_reason", None), "value", None)},
                              indent=2))
    else:
        click.echo("")


def _fail(server: str, adapter: str, exc: Exception, as_json: bool) -> None:
    import requests

    if isinstance(exc, requests.RequestException):
        message = f"cannot reach LoRAX at {server}: {exc}"
    else:
        message = f"LoRAX at {server} refused adapter {adapter}: {type(exc).__name__}: {exc}"
    if as_json:
        click.echo(json.dumps({"ok": False, "error": {"type": type(exc).__name__, "message": message,
                                                      "exit_code": 1}}, indent=2))
    else:
        click.echo(f"\nerror: {message}", err=True)
    sys.exit(1)


COMMANDS = [generate]
