"""Failed authentications are limited per (address, credential) and per address, before the token
is looked up (issue 10 item 8; issue 19 finding 2), against a real `soppu-registry serve`.

Before the limit (commit 098ffad) 100 wrong tokens in a row were 100 x 401. Then (issue 10) the
budget was the address's alone, so on a shared serving host, where every tenant's requests come
from one address, one user looping on a bad token made another tenant's *valid* token get 429
(issue 19, finding 2). Now a credential that keeps failing is refused alone; an address sending
many different failing credentials is refused, except for tokens this process has seen work.
"""

from __future__ import annotations

import time
from pathlib import Path

import requests

from tests.registry.regkit import Server, auth, error_code, new_owner
from tests.registry.services import Backend

PER_MINUTE = 12  # per credential: refill one failure per 5 s, so a burst takes a small part of it
PER_ADDRESS = 24  # over all credentials of one address: one per 2.5 s


def _get(url: str, headers: dict[str, str]) -> requests.Response:
    return requests.get(url, headers=headers, timeout=10)


def _log_is_clean(tmp_path: Path) -> None:
    log = "".join(p.read_text() for p in tmp_path.glob("server-*.log"))
    assert "Traceback" not in log, log[-3000:]


def test_one_tenants_bad_token_never_locks_out_another_tenants_valid_token(tmp_path: Path, backend: Backend) -> None:
    """Issue 19 finding 2, retried as found: one user loops on a bad token from 127.0.0.1 until it
    gets 429; another tenant's valid token, never used before, from the same address still gets
    200, and the bad token keeps getting 429."""
    server = Server(tmp_path / "data", "--rate", "0", "--max-auth-failures", str(PER_MINUTE),
                    "--max-address-auth-failures", str(PER_ADDRESS), backend=backend).start()
    try:
        store = server.storage()
        noisy, victim = (new_owner(store, n, tmp_path / "keys") for n in ("noisy", "victim"))
        url = f"{server.url}/v1/keys/{noisy.name}"
        # Control: many successful requests from the same address are never limited.
        assert [_get(url, auth(noisy.read_token)).status_code for _ in range(50)] == [200] * 50
        bad = auth(noisy.read_token[:-4] + "xxxx")  # a stale / mistyped token of one tenant
        codes = []
        while len(codes) < 100 and (not codes or codes[-1] != 429):
            codes.append(_get(url, bad).status_code)
        assert codes == [401] * PER_MINUTE + [429]  # non-vacuous: the bad token is throttled
        r = _get(url, bad)
        wait = r.headers["Retry-After"]
        assert (r.status_code, error_code(r), wait in ("4", "5")) == (429, "rate_limited", True)
        assert r.json()["error"]["message"] == (f"too many failed authentications with this token from 127.0.0.1; "
                                                f"retry after {wait} s (--max-auth-failures)")
        # Another tenant, same address, a token this server has never seen: served.
        assert [_get(url, auth(victim.read_token)).status_code for _ in range(3)] == [200] * 3
        assert _get(url, auth(noisy.write_token)).status_code == 200  # the looping tenant's other token too
        r = _get(url, bad)
        assert (r.status_code, error_code(r)) == (429, "rate_limited")  # and the bad one is still refused
    finally:
        server.stop()
    _log_is_clean(tmp_path)


def test_many_different_bad_tokens_throttle_the_address_but_not_known_tokens(tmp_path: Path, backend: Backend) -> None:
    """A guesser sending a new value each time is still limited (no bypass by varying the token):
    past the address's budget every unknown credential gets 429 before any lookup, while a token
    this process has seen authenticate is served; an unseen valid token waits out Retry-After."""
    server = Server(tmp_path / "data", "--rate", "0", "--max-auth-failures", str(PER_MINUTE),
                    "--max-address-auth-failures", str(PER_ADDRESS), backend=backend).start()
    try:
        store = server.storage()
        known, unseen = (new_owner(store, n, tmp_path / "keys") for n in ("known", "unseen"))
        url = f"{server.url}/v1/keys/{known.name}"
        assert _get(url, auth(known.read_token)).status_code == 200
        # Each kind of failure spends one: unknown tokens, no header, a malformed header.
        bad = [auth(f"soppu_{i:016x}_guess") for i in range(PER_ADDRESS - 2)] + [{}, {"Authorization": "Basic x"}]
        assert [_get(url, h).status_code for h in bad] == [401] * PER_ADDRESS
        r = _get(url, auth("soppu_ffffffffffffffff_guess"))  # yet another new value
        wait = r.headers["Retry-After"]
        assert (r.status_code, error_code(r), wait in ("2", "3")) == (429, "rate_limited", True)
        assert r.json()["error"]["message"] == (f"too many failed authentications of different tokens from 127.0.0.1; "
                                                f"retry after {wait} s (--max-address-auth-failures)")
        assert _get(url, auth(known.read_token)).status_code == 200  # known good: served
        r = _get(url, auth(unseen.read_token))  # valid but never seen by this process: waits
        assert (r.status_code, error_code(r)) == (429, "rate_limited")
        assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200  # no token, no limit
        time.sleep(int(r.headers["Retry-After"]) + 0.2)
        assert _get(url, auth(unseen.read_token)).status_code == 200
        assert _get(url, auth("soppu_eeeeeeeeeeeeeeee_guess")).status_code == 401
        r = _get(url, auth("soppu_dddddddddddddddd_guess"))
        assert (r.status_code, error_code(r)) == (429, "rate_limited")
        # A revoked token that used to work is a failure like any other, and stops being known.
        store.revoke_token(known.read_token.split("_")[1])
        r = _get(url, auth(known.read_token))
        assert (r.status_code, error_code(r)) == (401, "unauthorized")
        r = _get(url, auth(known.read_token))
        assert (r.status_code, error_code(r)) == (429, "rate_limited")
    finally:
        server.stop()
    _log_is_clean(tmp_path)


def test_zero_disables_the_failure_limit(tmp_path: Path, backend: Backend) -> None:
    server = Server(tmp_path / "data", "--rate", "0", "--max-auth-failures", "0", backend=backend).start()
    try:
        codes = {_get(f"{server.url}/v1/keys/x", auth(f"soppu_{i:016x}_guess")).status_code for i in range(100)}
        codes |= {_get(f"{server.url}/v1/keys/x", auth("soppu_0000000000000000_guess")).status_code for _ in range(100)}
        assert codes == {401}
    finally:
        server.stop()
