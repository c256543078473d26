"""Fixtures for tests against a real LoRAX checkout (helpers in loraxkit.py).

Tests that need LORAX_SRC / LORAX_PYTHON skip, with the reason, when they are unset.
"""

from __future__ import annotations

from pathlib import Path

import pytest


from tests.lorax.loraxkit import apply_series, copy_lorax, generate_stubs, lorax_python, lorax_src  # noqa: E402


@pytest.fixture(scope="session")
def patched_lorax(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of LORAX_SRC with the series applied and the gRPC stubs generated from the patched proto."""
    src = lorax_src()
    python = lorax_python()
    dest = copy_lorax(src, tmp_path_factory.mktemp("lorax") / "lorax")
    proc = apply_series(dest)
    assert proc.returncode == 0, proc.stderr
    generate_stubs(python, dest)
    return dest
