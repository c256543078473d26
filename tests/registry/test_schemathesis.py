"""Schemathesis against a live registry's own OpenAPI document, with a real owner-write token
(issue 10, item 5): no 500, and every response (status, content type, body) is one the document
lists. Bounded: a few dozen generated requests per operation, each operation well under a minute."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from soppu_client.registry_client import RegistryClient
from tests.registry.regkit import Owner, Registry, Server, new_owner
from tests.registry.services import Backend

EXAMPLES = 80
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[tuple[Registry, Owner]]:
    """A registry of its own (failed-auth limiting off: the fuzzer sends bad tokens on purpose) with one
    owner, who has published a bundle so that reads find something."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    server = Server(tmp / "data", "--rate", "0", "--max-auth-failures", "0", "--max-blob-bytes", str(1 << 20),
                    backend=backend).start()
    try:
        reg = Registry(server, tmp)
        owner = new_owner(reg.store, "fuzz", tmp / "keys")
        RegistryClient(reg.url, owner.write_token).upload_bundle(owner.bundle(Path(tmp / "bundle"), 1))
        yield reg, owner
    finally:
        server.stop()
    log = (tmp / f"server-{server.port}.log").read_text()
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_api_conforms_to_its_openapi_document(live: tuple[Registry, Owner], mode: GenerationMode) -> None:
    reg, owner = live
    schema = schemathesis.openapi.from_url(f"{reg.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9  # every route is documented (and so fuzzed)
    failures: dict[str, str] = {}
    seen: Counter[int] = Counter()
    for op in operations:

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            r = case.call_and_validate(base_url=reg.url, headers={"Authorization": f"Bearer {owner.write_token}"},
                                       checks=CHECKS, timeout=10)
            seen[r.status_code] += 1

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid (GET /healthz takes no input)
            assert mode is GenerationMode.NEGATIVE
        except Exception as e:  # collect every operation's failure, then fail once
            failures[op.label] = str(e)[:2000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    print(f"\nschemathesis {mode.value}: {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))}")
    assert seen[200] and seen[400] and sum(seen.values()) >= 100  # it reached the routes, valid and invalid
