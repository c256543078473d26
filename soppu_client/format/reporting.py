"""The one reporting convention of every SOPPU entry point (`soppu`, `soppu-registry`, `soppu-cache`):
errors -> message and exit code (0 ok, 1 failed check, 2 bad usage or input), `--json` output, progress."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from soppu_client.format.errors import SoppuError

T = TypeVar("T")

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")


@contextmanager
def reporting(as_json: bool) -> Iterator[None]:
    """Turn a SoppuError into its message and exit code; never a traceback for user mistakes.

    With ``as_json`` the output is one object ``{"ok": false, "error": {...}}``; an error that
    carries a ``report`` dict (a check that ran and failed) puts that report beside ``error``."""
    try:
        yield
    except SoppuError as exc:
        if as_json:
            err = {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}
            for field in ("status", "code", "url"):  # RegistryError carries where and why
                if hasattr(exc, field):
                    err[field] = getattr(exc, field)
            report = getattr(exc, "report", None) or {}
            click.echo(json.dumps({"ok": False, **report, "error": err}, indent=2, default=_jsonable))
        else:
            click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


def emit(as_json: bool, payload: dict[str, Any], text: str) -> None:
    """One JSON object (``{"ok": true, ...}``) with --json, else the human text."""
    click.echo(json.dumps({"ok": True, **payload}, indent=2, default=_jsonable) if as_json else text)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def progress(desc: str, quiet: bool = False) -> Callable[[Iterable[T]], Iterable[T]]:
    """A tqdm wrapper factory on stderr, shown only on a terminal."""
    from tqdm import tqdm

    def wrap(items: Iterable[T]) -> Iterable[T]:
        shown: Iterable[T] = tqdm(items, desc=desc, unit="module" if "module" in desc else "it",
                                  disable=True if quiet else None, file=sys.stderr, leave=False)
        return shown

    return wrap
