"""Failed authentications are limited per client address, before the token is checked (issue 10
item 8), against a real `soppu-registry serve`.

Before the limit (commit 098ffad) 100 wrong tokens in a row were 100 x 401 (1500 at 647/s in the
issue). Now, past ``--max-auth-failures`` per minute, an address gets 429 with Retry-After, for
right and wrong tokens alike (so a throttled guesser cannot tell a hit); its successful requests
spend nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import requests

from tests.registry.regkit import Server, auth, error_code, new_owner
from tests.registry.services import Backend

PER_MINUTE = 12  # refill: one failure per 5 s, so the burst below takes a small part of it


def test_failed_auth_is_throttled_per_address_before_auth(tmp_path: Path, backend: Backend) -> None:
    server = Server(tmp_path / "data", "--rate", "0", "--max-auth-failures", str(PER_MINUTE), backend=backend).start()
    try:
        store = server.storage()
        owner = new_owner(store, "throttled", tmp_path / "keys")
        url = f"{server.url}/v1/keys/{owner.name}"
        # Control: many successful requests from the same address are never limited.
        assert [requests.get(url, headers=auth(owner.read_token), timeout=10).status_code
                for _ in range(100)] == [200] * 100
        # Each kind of failure spends one: unknown token, no header, malformed header.
        bad = [auth(f"soppu_{i:016x}_guess") for i in range(PER_MINUTE - 2)] + [{}, {"Authorization": "Basic x"}]
        codes = [requests.get(url, headers=h, timeout=10).status_code for h in bad]
        assert codes == [401] * PER_MINUTE
        r = requests.get(url, headers=auth("soppu_0000000000000000_guess"), timeout=10)
        wait = r.headers["Retry-After"]  # 5 s for a whole failure, less what refilled during the burst
        assert (r.status_code, error_code(r), wait in ("4", "5")) == (429, "rate_limited", True)
        assert r.json()["error"]["message"] == (f"too many failed authentications from 127.0.0.1; retry after {wait} s "
                                                "(--max-auth-failures)")
        # Checked before the token: the right token is refused too while the address is throttled.
        r = requests.get(url, headers=auth(owner.read_token), timeout=10)
        assert (r.status_code, error_code(r)) == (429, "rate_limited")
        assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200  # no token, no limit
        time.sleep(int(r.headers["Retry-After"]) + 0.2)
        assert requests.get(url, headers=auth(owner.read_token), timeout=10).status_code == 200
        assert requests.get(url, headers=auth("soppu_0000000000000000_guess"), timeout=10).status_code == 401
        r = requests.get(url, headers=auth("soppu_0000000000000000_guess"), timeout=10)
        assert (r.status_code, error_code(r)) == (429, "rate_limited")
    finally:
        server.stop()
    log = "".join(p.read_text() for p in tmp_path.glob("server-*.log"))
    assert "Traceback" not in log, log[-3000:]


def test_zero_disables_the_failure_limit(tmp_path: Path, backend: Backend) -> None:
    server = Server(tmp_path / "data", "--rate", "0", "--max-auth-failures", "0", backend=backend).start()
    try:
        codes = {requests.get(f"{server.url}/v1/keys/x", headers=auth(f"soppu_{i:016x}_guess"), timeout=10).status_code
                 for i in range(100)}
        assert codes == {401}
    finally:
        server.stop()
