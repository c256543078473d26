"""The repo's shape, enforced by the test command (issue 22): import contracts, lint, types.

- ``lint-imports`` holds the one-way arrows of docs/ARCHITECTURE.md (contracts in pyproject.toml),
  and breaking one on purpose (in a copy of the packages) makes it fail, naming the contract;
- ``ruff check`` passes with the project's config (line length 120);
- ``mypy`` passes on the trusted core and the serving side (``soppu_client/format``, ``soppu_serving``;
  strict but for bare generics).

The tools run as subprocesses from this venv's bin directory, as CI would run them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PACKAGES = ("soppu_client", "soppu_registry", "soppu_serving", "lorax_adapter_source", "vllm_lora_resolver")
CORE_CONTRACT = "the trusted core imports nothing else of the project"
TORCH_CONTRACT = "the registry and the torch-free core never reach torch, peft or transformers"


def _tool(name: str) -> str:
    exe = BIN / name
    if not exe.exists():
        pytest.fail(f"{name} is not installed in {BIN}: run `bash scripts/setup_env.sh` (it comes with .[test])")
    return str(exe)


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the packages under ``root`` (they shadow any installed copy on the path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "kernels")])}
    return subprocess.run([_tool("lint-imports"), "--no-cache", "--config", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(config["tool"]["importlinter"]["contracts"])


def test_import_contracts_hold() -> None:
    names = [c["name"] for c in _contracts()]
    assert CORE_CONTRACT in names and TORCH_CONTRACT in names and len(names) >= 5, names
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Contracts: {len(names)} kept, 0 broken." in r.stdout, r.stdout


def test_core_contract_lists_every_client_module() -> None:
    """The core contract forbids soppu_client's other modules by name: a new one must be added."""
    core = next(c for c in _contracts() if c["name"] == CORE_CONTRACT)
    forbidden = set(core["forbidden_modules"])  # type: ignore[call-overload]
    children = {f"soppu_client.{p.stem if p.is_file() else p.name}" for p in (ROOT / "soppu_client").iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    missing = children - forbidden - {"soppu_client.format"}
    assert len(children) > 5 and not missing, f"add {sorted(missing)} to `{CORE_CONTRACT}` in pyproject.toml"


@pytest.mark.parametrize("module, line, contract", [
    ("soppu_client/format/names.py", "import soppu_serving.settings", CORE_CONTRACT),
    ("soppu_registry/checks.py", "from soppu_client.format import compressed_form", TORCH_CONTRACT),
])
def test_broken_contract_fails(tmp_path: Path, module: str, line: str, contract: str) -> None:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels" / "soppu_kernels", tmp_path / "kernels" / "soppu_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    clean = _lint_imports(tmp_path)  # non-vacuous: the copy passes before it is broken
    assert clean.returncode == 0, clean.stdout + clean.stderr
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # broken on purpose\n")
    broken = _lint_imports(tmp_path)
    assert broken.returncode != 0, broken.stdout
    assert f"{contract} BROKEN" in broken.stdout, broken.stdout


def test_ruff_check_passes() -> None:
    r = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_core_and_serving_pass() -> None:
    files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    assert "soppu_client/format" in files and "soppu_serving" in files, files
    r = subprocess.run([_tool("mypy"), "--no-incremental"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success: no issues found" in r.stdout, r.stdout
