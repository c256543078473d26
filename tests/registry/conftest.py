"""Fixtures for the registry tests (helpers live in regkit.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.registry.regkit import MAX_BLOB, Owner, Registry, Server


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One shared server (rate limit and failed-auth limit off, 1 MiB blob cap); each test makes its own owners."""
    tmp = tmp_path_factory.mktemp("registry")
    server = Server(tmp / "data", "--rate", "0", "--max-auth-failures", "0", "--max-blob-bytes", str(MAX_BLOB)).start()
    try:
        yield Registry(server, tmp)
    finally:
        server.stop()
    log = (tmp / f"server-{server.port}.log").read_text()
    assert "Traceback" not in log, f"the registry logged an unhandled exception:\n{log[-3000:]}"


@pytest.fixture
def owner(registry: Registry) -> Owner:
    return registry.new_owner()


