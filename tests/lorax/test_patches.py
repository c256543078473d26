"""The patch series and `python -m server_patches`: applies cleanly, is idempotent, reports failures."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.lorax.loraxkit import REPO, apply_series, copy_lorax, lorax_src

from server_patches import PINNED_COMMIT, apply_series as apply_api
from server_patches import check_series, series
from server_patches._unidiff import PatchFormatError, apply_file_patch, parse_patch

TOUCHED = {
    "proto/generate.proto",
    "server/lorax_server/utils/sources/__init__.py",
    "server/lorax_server/utils/adapter.py",
    "clients/python/lorax/types.py",
}


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server_patches", *args], cwd=REPO, capture_output=True, text=True)


# -- without LoRAX -----------------------------------------------------------------------------

def test_stock_series_touches_only_the_routing_files() -> None:
    patches = series()
    stock = [p for p in patches if p.name[:4] in ("0001", "0002", "0003", "0004")]
    assert [p.name for p in stock] == [
        "0001-proto-add-soppu-adapter-source.patch",
        "0002-sources-dispatch-soppu.patch",
        "0003-adapter-soppu-enum-string.patch",
        "0004-client-adapter-sources-soppu.patch",
    ]
    assert {f.path for p in stock for f in p.files} == TOUCHED
    added = [ln for p in stock for f in p.files for h in f.hunks for ln in h.lines if ln.startswith("+")]
    # Routing only: every added line is an enum value, a constant, an import or a dispatch line.
    assert len(added) <= 25, added
    body = [ln[1:].strip() for ln in added]
    odd = [ln for ln in body if ln and not ("lorax_adapter_source" in ln or "SOPPU" in ln or "soppu" in ln
                                            or ln.startswith("return ") or "ADAPTER_SOURCES" in ln)]
    assert odd == []


SMALL = """Subject: demo

--- a/f.txt
+++ b/f.txt
@@ -1,3 +1,4 @@
 one
 two
+two and a half
 three
"""


def test_unidiff_applies_detects_applied_and_reports_the_hunk() -> None:
    (fp,) = parse_patch(SMALL, "demo.patch")
    new, failures, applied = apply_file_patch("zero\none\ntwo\nthree\n", fp, "demo.patch")  # offset by one line
    assert (new, failures, applied) == ("zero\none\ntwo\ntwo and a half\nthree\n", [], False)
    assert apply_file_patch(new, fp, "demo.patch") == (None, [], True)
    new, failures, applied = apply_file_patch("one\n2\nthree\n", fp, "demo.patch")
    assert new is None and not applied
    assert str(failures[0]) == ("demo.patch: f.txt: hunk #1 (@@ -1,3 +1,4 @@): context does not match: "
                                "line 2: expected 'two', found '2'")
    with pytest.raises(PatchFormatError, match="no file diffs found"):
        parse_patch("just text\n", "x.patch")
    with pytest.raises(PatchFormatError, match="unsupported target path"):
        parse_patch(SMALL.replace("b/f.txt", "b/../f.txt"), "x.patch")


def test_cli_usage_errors(tmp_path: Path) -> None:
    proc = run_tool("apply", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    proc = run_tool("apply", str(tmp_path), "--check")
    assert proc.returncode == 1
    assert "0001-proto-add-soppu-adapter-source.patch: proto/generate.proto: file not found" in proc.stderr
    proc = run_tool("list")
    assert proc.returncode == 0 and proc.stdout.count(".patch:") == len(series())


# -- against LORAX_SRC -------------------------------------------------------------------------

@pytest.fixture
def lorax_copy(tmp_path: Path) -> Path:
    return copy_lorax(lorax_src(), tmp_path / "lorax")


@pytest.mark.lorax
def test_series_applies_cleanly_and_is_idempotent(lorax_copy: Path) -> None:
    head = (lorax_src() / ".git" / "HEAD")
    if head.exists() and head.read_text().strip() != PINNED_COMMIT:
        pytest.skip(f"LORAX_SRC is not at the pinned commit {PINNED_COMMIT} (detached HEAD expected)")
    before = {p: (lorax_copy / p).read_text() for p in TOUCHED}
    check = run_tool("apply", str(lorax_copy), "--check")
    assert check.returncode == 0, check.stderr
    n = len(series())
    assert check.stdout.count("would apply") == n
    assert {p: (lorax_copy / p).read_text() for p in TOUCHED} == before  # --check wrote nothing

    proc = apply_series(lorax_copy)
    assert proc.returncode == 0, proc.stderr
    assert f"{len({f.path for p in series() for f in p.files})} file(s) written" in proc.stdout
    for p in TOUCHED:
        assert (lorax_copy / p).read_text() != before[p], p
    assert 'SOPPU = "soppu"' in (lorax_copy / "server/lorax_server/utils/sources/__init__.py").read_text()
    assert "SOPPU = 4;" in (lorax_copy / "proto/generate.proto").read_text()

    again = apply_series(lorax_copy)
    assert again.returncode == 0 and again.stdout.count("already applied") == n


@pytest.mark.lorax
def test_git_apply_agrees(lorax_copy: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    patches = sorted(str(p) for p in (REPO / "server_patches" / "patches").glob("*.patch"))
    proc = subprocess.run(["git", "apply", "--check", *patches], cwd=lorax_copy, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.lorax
def test_a_moved_line_names_the_failing_hunk_and_writes_nothing(lorax_copy: Path) -> None:
    target = lorax_copy / "server/lorax_server/utils/sources/__init__.py"
    text = target.read_text()
    target.write_text(text.replace("        return get_model_local_dir(model_id).as_posix()",
                                   "        return str(get_model_local_dir(model_id))"))
    before = {p: (lorax_copy / p).read_text() for p in TOUCHED}
    proc = run_tool("apply", str(lorax_copy))
    assert proc.returncode == 1
    assert ("FAILED 0002-sources-dispatch-soppu.patch: server/lorax_server/utils/sources/__init__.py: "
            "hunk #3 (@@ -123,6 +128,10 @@ def get_config_path(model_id: str, source: str) -> str:): "
            "context does not match: line 125: expected '        return get_model_local_dir(model_id).as_posix()', "
            "found '        return str(get_model_local_dir(model_id))'") in proc.stderr
    assert "nothing was written" in proc.stderr
    assert {p: (lorax_copy / p).read_text() for p in TOUCHED} == before
    result = check_series(lorax_copy)
    assert result.status["0002-sources-dispatch-soppu.patch"] == "failed"
    assert not apply_api(lorax_copy).written
