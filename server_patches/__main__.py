"""``python -m server_patches apply LORAX_DIR [--check]`` and ``python -m server_patches list``.

Exit status: 0 the series applies (or is already applied), 1 a hunk failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import PINNED_COMMIT, PatchFormatError, apply_series, check_series, series


def _git_head(lorax_dir: Path) -> str | None:
    head = lorax_dir / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
    except OSError:
        return None
    if ref.startswith("ref: "):
        try:
            return (lorax_dir / ".git" / ref[5:]).read_text().strip()
        except OSError:
            return None
    return ref


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server_patches",
        description=f"Add the soppu adapter source to a LoRAX checkout (written against {PINNED_COMMIT}).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_apply = sub.add_parser("apply", help="apply the patch series (all files or none)")
    p_apply.add_argument("lorax_dir", type=Path, help="root of a predibase/lorax checkout")
    p_apply.add_argument("--check", action="store_true", help="dry run: report what would happen, write nothing")
    sub.add_parser("list", help="list the patches in the series")
    args = parser.parse_args(argv)

    try:
        patches = series()
    except PatchFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.command == "list":
        for p in patches:
            files = ", ".join(f.path for f in p.files)
            print(f"{p.name}: {p.subject} [{files}]")
        return 0

    lorax_dir: Path = args.lorax_dir
    if not lorax_dir.is_dir():
        print(f"error: LORAX_DIR {lorax_dir} is not a directory", file=sys.stderr)
        return 2
    head = _git_head(lorax_dir)
    if head is not None and len(head) == 40 and head != PINNED_COMMIT:
        print(f"warning: {lorax_dir} is at {head}, the series was written against {PINNED_COMMIT}", file=sys.stderr)

    result = check_series(lorax_dir) if args.check else apply_series(lorax_dir)
    verb = "would apply" if args.check or not result.ok else "applied"
    for name, status in result.status.items():
        shown = {"applies": verb}.get(status, status)
        print(f"{name}: {shown}")
    for failure in result.failures:
        print(f"FAILED {failure}", file=sys.stderr)
    if not result.ok:
        print(f"error: the series does not apply to {lorax_dir}; nothing was written", file=sys.stderr)
        return 1
    if not args.check:
        print(f"{len(result.written)} file(s) written in {lorax_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
