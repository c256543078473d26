"""Fixtures for the registry tests (helpers live in regkit.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from soppu_registry.devservices import ServiceError, Services
from tests.registry.regkit import MAX_BLOB, Owner, Registry, Server
from tests.registry.services import BACKENDS, SQLITE, Backend


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """One real PostgreSQL cluster and one SeaweedFS S3 gateway for the session. A service that
    cannot start FAILS the tests that need it (never a skip)."""
    svc = Services(tmp_path_factory.mktemp("services"))
    try:
        svc.start()
    except ServiceError as e:
        pytest.fail(f"cannot start the postgres+s3 test services: {e}", pytrace=False)
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every registry test runs on each storage backend (the services start on first use)."""
    if request.param == SQLITE:
        return Backend(SQLITE)
    return Backend(request.param, request.getfixturevalue("services"))


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Registry]:
    """One shared server per backend (rate limit and failed-auth limit off, 1 MiB blob cap); each
    test makes its own owners."""
    tmp = tmp_path_factory.mktemp("registry")
    server = Server(tmp / "data", "--rate", "0", "--max-auth-failures", "0", "--max-blob-bytes", str(MAX_BLOB),
                    backend=backend).start()
    try:
        yield Registry(server, tmp)
    finally:
        server.stop()
    log = (tmp / f"server-{server.port}.log").read_text()
    assert "Traceback" not in log, f"the registry logged an unhandled exception:\n{log[-3000:]}"


@pytest.fixture
def owner(registry: Registry) -> Owner:
    return registry.new_owner()


