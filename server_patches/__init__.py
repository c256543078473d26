"""The patch series that adds the ``soppu`` adapter source to LoRAX, and the tool that applies it.

LoRAX has no plugin system, so four small patches route source ``"soppu"`` to
:mod:`lorax_adapter_source.source`; no logic lives in them (see ``patches/`` and README.md).

    python -m server_patches apply LORAX_DIR [--check]
    python -m server_patches list

Public API::

    PINNED_COMMIT                  the LoRAX commit the series is written against
    series() -> list[Patch]        the patches, in order
    check_series(lorax_dir)        -> SeriesResult (nothing written)
    apply_series(lorax_dir)        -> SeriesResult (all files written, or none)

This package uses only the standard library so that it runs inside a LoRAX image build.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ._unidiff import FilePatch, HunkFailure, PatchFormatError, apply_file_patch, parse_patch

PINNED_COMMIT = "a7394ba386ece427d5a6125b419aa38b46d966dc"
PATCH_DIR = Path(__file__).resolve().parent / "patches"

__all__ = [
    "PINNED_COMMIT",
    "PATCH_DIR",
    "Patch",
    "SeriesResult",
    "PatchFormatError",
    "series",
    "check_series",
    "apply_series",
]


@dataclass(frozen=True)
class Patch:
    name: str
    subject: str
    files: tuple[FilePatch, ...]


@dataclass
class SeriesResult:
    """What a check or an apply found: per patch "applies", "already applied" or failures."""

    lorax_dir: Path
    status: dict[str, str] = field(default_factory=dict)  # patch name -> applies | already applied | failed
    failures: list[HunkFailure] = field(default_factory=list)
    written: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def series(patch_dir: Path = PATCH_DIR) -> list[Patch]:
    """Read the series from ``patch_dir`` (``NNNN-*.patch``, applied in name order)."""
    out = []
    for path in sorted(Path(patch_dir).glob("[0-9][0-9][0-9][0-9]-*.patch")):
        text = path.read_text(encoding="utf-8")
        subject = next((ln[len("Subject: ") :] for ln in text.splitlines() if ln.startswith("Subject: ")), path.stem)
        out.append(Patch(path.name, subject, tuple(parse_patch(text, path.name))))
    if not out:
        raise PatchFormatError(f"no patches (NNNN-*.patch) found in {patch_dir}")
    return out


def _plan(lorax_dir: Path, patches: list[Patch]) -> tuple[SeriesResult, dict[str, str]]:
    """Apply the series in memory; returns the result and {relative path: new text}."""
    result = SeriesResult(lorax_dir=lorax_dir)
    texts: dict[str, str] = {}
    changed: dict[str, str] = {}
    for patch in patches:
        failed = False
        already = []
        staged: dict[str, str] = {}
        for fp in patch.files:
            target = lorax_dir / fp.path
            if fp.path not in texts:
                if not target.is_file():
                    result.failures.append(
                        HunkFailure(patch.name, fp.path, None, f"file not found in {lorax_dir} (is this a LoRAX checkout?)")
                    )
                    failed = True
                    continue
                texts[fp.path] = target.read_text(encoding="utf-8")
            new_text, failures, was_applied = apply_file_patch(texts[fp.path], fp, patch.name)
            if failures:
                result.failures.extend(failures)
                failed = True
            elif was_applied:
                already.append(fp.path)
            else:
                staged[fp.path] = new_text
        if failed:
            result.status[patch.name] = "failed"
            continue
        for path, text in staged.items():
            texts[path] = text
            changed[path] = text
        result.status[patch.name] = "already applied" if already and not staged else "applies"
    return result, changed


def check_series(lorax_dir: str | os.PathLike[str], patch_dir: Path = PATCH_DIR) -> SeriesResult:
    """Dry run: would the series apply to ``lorax_dir``? Writes nothing."""
    result, _ = _plan(Path(lorax_dir), series(patch_dir))
    return result


def apply_series(lorax_dir: str | os.PathLike[str], patch_dir: Path = PATCH_DIR) -> SeriesResult:
    """Apply the series; if any hunk fails nothing is written. Each file is replaced atomically."""
    lorax_dir = Path(lorax_dir)
    result, changed = _plan(lorax_dir, series(patch_dir))
    if not result.ok:
        return result
    for rel, text in changed.items():
        target = lorax_dir / rel
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".soppu-tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(text)
            os.chmod(tmp, target.stat().st_mode & 0o7777)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        result.written.append(rel)
    return result
