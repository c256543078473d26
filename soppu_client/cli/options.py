"""Options and texts shared by several `soppu` commands: registry URL and token (read from
$SOPPU_REGISTRY_URL / $SOPPU_REGISTRY_TOKEN), the key passphrase, the error-norm epilog."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from soppu_client.format.errors import InputError
from soppu_client.format.names import PASSPHRASE_ENV, REGISTRY_TOKEN_ENV, REGISTRY_URL_ENV

ERROR_EPILOG = "Errors are unsquared relative Frobenius norms ||dW - U S V^T||_F / ||dW||_F."
"""Closing line of every command that prints reconstruction errors (help epilog and output)."""

_Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def registry_option(what: str = "Registry base URL", *, required: bool = True) -> _Decorator:
    """``--registry URL``, defaulting to $SOPPU_REGISTRY_URL."""
    return click.option("--registry", required=required, envvar=REGISTRY_URL_ENV, help=f"{what} (or ${REGISTRY_URL_ENV}).")


def token_option(what: str, *, required: bool = True) -> _Decorator:
    """``--token T``, defaulting to $SOPPU_REGISTRY_TOKEN."""
    return click.option("--token", required=required, envvar=REGISTRY_TOKEN_ENV, help=f"{what} (or ${REGISTRY_TOKEN_ENV}).")


passphrase_file_option = click.option(
    "--passphrase-file", type=click.Path(dir_okay=False, allow_dash=True), default=None,
    help=f"File holding the key passphrase ('-' for stdin). Default: ${PASSPHRASE_ENV} if set.")


def read_passphrase(passphrase_file: str | None) -> bytes | None:
    """The key passphrase: from ``passphrase_file`` ('-' = stdin, one trailing newline dropped),
    else from $SOPPU_KEY_PASSPHRASE, else None. Passphrases never travel on the command line."""
    if passphrase_file is None:
        env = os.environ.get(PASSPHRASE_ENV)
        return env.encode("utf-8") if env else None
    try:
        data = sys.stdin.buffer.read() if passphrase_file == "-" else Path(passphrase_file).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read --passphrase-file {passphrase_file}: {exc.strerror or exc}") from None
    data = data[:-1] if data.endswith(b"\n") else data
    data = data[:-1] if data.endswith(b"\r") else data
    if not data:
        raise InputError(f"--passphrase-file {passphrase_file} is empty; put the passphrase in it")
    return data
