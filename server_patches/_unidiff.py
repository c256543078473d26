"""A small, strict unified-diff reader and applier (standard library only).

Strict means `git apply` without fuzz: every hunk's context and removed lines must match the
target file exactly, at the line the hunk names or (if the file moved a little) at the nearest
offset where they do. A hunk that does not match is reported with the file, the hunk's number and
header, and the first line that differs (expected vs found), so a failure on a newer LoRAX commit
says exactly what moved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)$")


class PatchFormatError(ValueError):
    """A patch file is not a unified diff this tool can read."""


@dataclass
class Hunk:
    index: int  # 1-based, within its file
    old_start: int
    old_len: int
    new_start: int
    new_len: int
    section: str
    lines: list[str]  # each begins with " ", "-" or "+"; no newline

    @property
    def header(self) -> str:
        return f"@@ -{self.old_start},{self.old_len} +{self.new_start},{self.new_len} @@{self.section}"

    @property
    def old_lines(self) -> list[str]:
        return [ln[1:] for ln in self.lines if ln[0] in " -"]

    @property
    def new_lines(self) -> list[str]:
        return [ln[1:] for ln in self.lines if ln[0] in " +"]


@dataclass
class FilePatch:
    path: str  # relative to the LoRAX checkout root
    hunks: list[Hunk] = field(default_factory=list)


@dataclass
class HunkFailure:
    patch: str
    path: str
    hunk: Hunk | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.patch}: {self.path}"
        if self.hunk is not None:
            where += f": hunk #{self.hunk.index} ({self.hunk.header.strip()})"
        return f"{where}: {self.reason}"


def parse_patch(text: str, name: str = "<patch>") -> list[FilePatch]:
    """Parse a unified diff (git style, with optional free text before the first ``diff``/``---``)."""
    lines = text.splitlines()
    files: list[FilePatch] = []
    i = 0
    current: FilePatch | None = None
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            old = line[4:].split("\t")[0].strip()
            new = lines[i + 1][4:].split("\t")[0].strip()
            path = new if new != "/dev/null" else old
            if path.startswith(("a/", "b/")):
                path = path[2:]
            if path == "/dev/null" or ".." in Path(path).parts or path.startswith("/"):
                raise PatchFormatError(f"{name}: unsupported target path {path!r}")
            current = FilePatch(path=path)
            files.append(current)
            i += 2
            continue
        m = _HUNK_RE.match(line)
        if m:
            if current is None:
                raise PatchFormatError(f"{name}: line {i + 1}: hunk before any '---'/'+++' file header")
            old_start, old_len = int(m.group(1)), int(m.group(2) if m.group(2) is not None else 1)
            new_start, new_len = int(m.group(3)), int(m.group(4) if m.group(4) is not None else 1)
            hunk = Hunk(len(current.hunks) + 1, old_start, old_len, new_start, new_len, m.group(5), [])
            i += 1
            n_old = n_new = 0
            while i < len(lines) and (n_old < old_len or n_new < new_len):
                body = lines[i]
                if body.startswith("\\"):  # "\ No newline at end of file"
                    i += 1
                    continue
                tag = body[:1] or " "  # an empty line is an empty context line
                if tag not in " -+":
                    raise PatchFormatError(
                        f"{name}: line {i + 1}: hunk #{hunk.index} of {current.path} ends early "
                        f"(expected {old_len} old / {new_len} new lines)"
                    )
                hunk.lines.append(tag + body[1:])
                n_old += tag in " -"
                n_new += tag in " +"
                i += 1
            if n_old != old_len or n_new != new_len:
                raise PatchFormatError(f"{name}: hunk #{hunk.index} of {current.path} is truncated")
            current.hunks.append(hunk)
            continue
        i += 1
    if not files:
        raise PatchFormatError(f"{name}: no file diffs found")
    return files


def _matches(target: list[str], at: int, want: list[str]) -> bool:
    return at >= 0 and at + len(want) <= len(target) and target[at : at + len(want)] == want


def _first_difference(target: list[str], at: int, want: list[str]) -> str:
    for k, expected in enumerate(want):
        j = at + k
        found = target[j] if 0 <= j < len(target) else "<end of file>"
        if found != expected:
            return f"line {j + 1}: expected {expected!r}, found {found!r}"
    return "no difference"  # pragma: no cover - only called on a mismatch


def _locate(target: list[str], want: list[str], expected_at: int, start: int) -> int | None:
    """Index where ``want`` matches, nearest to ``expected_at``, not before ``start``; None if nowhere."""
    best = None
    for at in range(start, len(target) - len(want) + 1):
        if target[at : at + len(want)] == want:
            if best is None or abs(at - expected_at) < abs(best - expected_at):
                best = at
    return best


def apply_file_patch(text: str, fp: FilePatch, patch_name: str) -> tuple[str | None, list[HunkFailure], bool]:
    """Apply every hunk of ``fp`` to ``text``.

    Returns (new_text or None on failure, failures, already_applied). ``already_applied`` is True
    when no hunk applies forward but every hunk applies in reverse (the series was applied before).
    """
    keep_final_newline = text.endswith("\n")
    target = text.splitlines()
    out: list[str] = []
    pos = 0
    failures: list[HunkFailure] = []
    offset = 0
    for hunk in fp.hunks:
        want = hunk.old_lines
        base = hunk.old_start - 1 if hunk.old_len else hunk.old_start  # 0-based line the hunk names
        expected_at = base + offset
        at = expected_at if _matches(target, expected_at, want) else _locate(target, want, expected_at, pos)
        if at is None:
            failures.append(
                HunkFailure(
                    patch_name,
                    fp.path,
                    hunk,
                    "context does not match: " + _first_difference(target, max(expected_at, 0), want),
                )
            )
            continue
        out.extend(target[pos:at])
        out.extend(hunk.new_lines)
        pos = at + len(want)
        offset = at - base
    if failures:
        # Applied already? Every hunk's "new" side present, in order.
        rpos = 0
        for hunk in fp.hunks:
            at = _locate(target, hunk.new_lines, hunk.new_start - 1, rpos)
            if at is None:
                return None, failures, False
            rpos = at + len(hunk.new_lines)
        return None, [], True
    out.extend(target[pos:])
    new_text = "\n".join(out) + ("\n" if keep_final_newline or not out else "")
    return new_text, [], False
