"""`soppu-cache`: look after the serving-side cache of the `soppu` source (on the serving host).

    soppu-cache prune [--cache DIR] [--keep 1] [--dry-run] [--json]

Exit codes (``soppu_client.format.reporting``): 0 ok, 1 failed, 2 bad input.
"""

from __future__ import annotations

from pathlib import Path

import click

from soppu_client.format.errors import InputError
from soppu_client.format.reporting import emit, json_option, reporting
from soppu_serving.prune import prune_cache
from soppu_serving.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Admin commands for the soppu source's cache (default: $SOPPU_CACHE_DIR or <HF hub cache>/soppu)."""


@main.command()
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache root (default: $SOPPU_CACHE_DIR or <HUGGINGFACE_HUB_CACHE>/soppu).")
@click.option("--keep", default=1, show_default=True, type=click.IntRange(min=1),
              help="Newest versions to keep per adapter and serving form (the `latest` one always stays).")
@click.option("--dry-run", is_flag=True, help="Report what would be removed; remove nothing.")
@json_option
def prune(cache_dir: Path | None, keep: int, dry_run: bool, as_json: bool) -> None:
    """Remove old version dirs, then the blobs no remaining dir was built from.

    Safe while LoRAX runs: a dir or blob a fetch is using is skipped (counted as busy); a pinned
    request for a removed version fetches and verifies it again.
    """
    with reporting(as_json):
        root = cache_dir or Settings.from_env().cache_root
        if not root.is_dir():
            raise InputError(f"{root} is not a directory (no soppu cache there; pass --cache DIR)")
        report = prune_cache(root, keep=keep, dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        lines = [f"{verb} {len(report['removed_dirs'])} version dir(s) and {len(report['removed_blobs'])} blob(s), "
                 f"{report['bytes']:,} bytes from {report['cache']}"
                 + (f"; {report['busy']} in use, skipped" if report["busy"] else "")]
        lines += [f"  {d}" for d in report["removed_dirs"]]
        emit(as_json, report, "\n".join(lines))


if __name__ == "__main__":
    main()
