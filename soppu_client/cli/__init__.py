"""The `soppu` command line: the click group and the registration of its commands. Nothing imports
this package but its entry points (`soppu`, `python -m soppu_client.cli`).

Each module holds one command group and lists its commands in ``COMMANDS``; commands only parse,
call the library and print, through :mod:`soppu_client.format.reporting` (``--json``; exit codes
0 ok, 1 a check failed (error above --max-error, bad signature, registry refusal), 2 bad usage or
input). Options shared by several commands live in :mod:`soppu_client.cli.options`.
"""

from __future__ import annotations

import click

from soppu_client import __version__

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="soppu")
def cli() -> None:
    """SOPPU: compress many PEFT LoRA adapters into one shared basis per weight matrix plus a
    small core per adapter, verify, sign and upload the bundle.

    \b
    Typical flow:
      soppu compress adapters/* -o bundle --rank 16
      soppu verify bundle --adapters adapters/* --base-model smollm2 --plot errors.png
      soppu keygen -o owner.key && soppu sign bundle --key owner.key --owner me --version 1
      soppu upload bundle --registry http://127.0.0.1:8080 --token ...
    """


def _register() -> None:
    from soppu_client.cli import compress, export, generate, signing, upload, verify

    for module in (compress, verify, export, signing, upload, generate):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    """Entry point of the `soppu` script."""
    cli(prog_name="soppu")
