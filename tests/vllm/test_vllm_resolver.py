"""The `soppu` LoRA resolver inside a real vLLM API server (stock vLLM, no patch), end to end:
registry on loopback -> resolver -> soppu_serving -> PEFT dir -> vLLM's LoRA layers -> tokens."""

from __future__ import annotations

import hashlib
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.serving import srckit
from tests.vllm import vllmkit
from tests.vllm.conftest import MAX_TOKENS, PEFT_ADAPTER, Served, strip_stop



def _completion(r: requests.Response) -> tuple[list[int], list[int], str]:
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    return body["prompt_token_ids"], strip_stop(choice["token_ids"]), choice["message"]["content"]




def test_greedy_through_vllm_equals_peft(served: Served) -> None:
    name, prompts = PEFT_ADAPTER, served.peft_prompts
    ref_prompt_ids, ref_base, ref_adapter = served.peft_reference
    # Non-vacuity: the adapter changes the base model's greedy output on every prompt.
    assert all(b != a for b, a in zip(ref_base, ref_adapter)), (ref_base, ref_adapter)

    srv = served.server
    for i, prompt in enumerate(prompts):
        prompt_ids, base_ids, _ = _completion(srv.chat(vllmkit.SERVED_NAME, prompt, max_tokens=MAX_TOKENS))
        assert prompt_ids == ref_prompt_ids[i], "vLLM (transformers 5) and PEFT (4.x) tokenize the chat differently"
        assert base_ids == ref_base[i], f"base model, prompt {i} {prompt!r}"
        _, ids, text = _completion(srv.chat(f"alice/{name}", prompt, max_tokens=MAX_TOKENS))
        assert ids == ref_adapter[i], f"adapter, prompt {i} {prompt!r}: vLLM {text!r}"


def test_second_adapter_of_a_basis_downloads_only_its_core(served: Served) -> None:
    srv = served.server
    _completion(srv.chat("alice/first_name", "First name only: Morgan, David", max_tokens=4))
    _completion(srv.chat("alice/initials", "Initials of: Quinn Karen Perez", max_tokens=4))
    done = {ref: (down, reused) for ref, down, reused in vllmkit.materializations(srv.log_text())}
    first, second = done["alice/first_name@1"], done["alice/initials@1"]
    assert "basis.safetensors" in first[0] + first[1]
    assert "basis.safetensors" not in second[0], second
    assert "basis.safetensors" in second[1], second
    assert [p for p in second[0] if p.startswith("cores/")] == ["cores/initials.safetensors"]
    assert not [p for p in second[0] if p.endswith(".safetensors") and not p.startswith("cores/")]


def test_concurrent_first_requests_download_once(served: Served) -> None:
    """Eight simultaneous first requests, under two names vLLM locks separately (`alice/last_word`
    and `alice/last_word@1`): one materialization, the core downloaded once."""
    srv = served.server
    names = ["alice/last_word", "alice/last_word@1"] * 4
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda n: srv.chat(n, "Last word of: forest window turtle", max_tokens=4), names))
    assert [r.status_code for r in answers] == [200] * len(names), [r.text for r in answers if r.status_code != 200]
    done = [(down, reused) for ref, down, reused in vllmkit.materializations(srv.log_text()) if ref == "alice/last_word@1"]
    assert len(done) == 1, done
    assert done[0][0].count("cores/last_word.safetensors") == 1


def _refused(served: Served, model: str, status: int, *fragments: str) -> None:
    r = served.server.chat(model, "Repeat three times: rosa", max_tokens=4)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for fragment in fragments:
        assert fragment in message, message
    assert "soppu resolver: refused " + model in served.server.log_text()
    assert served.server.alive(), "the vLLM server died after a refusal"


def _assert_not_cached(served: Served, name: str) -> None:
    files = srckit.cache_files(served.cache)
    assert not [f for f in files if f.startswith(f"alice/{name}/")], files


def test_tampered_blob_is_refused(served: Served) -> None:
    _refused(served, "alice/tampered", 422, "soppu adapter alice/tampered@2: digest mismatch",
             "cores/tampered.safetensors")
    _assert_not_cached(served, "tampered")
    for blob in (served.cache / ".blobs").rglob("*"):  # every stored blob still holds what its name says
        if blob.is_file():
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob
    _completion(served.server.chat("alice/first_name", "First name only: Lee, Ann", max_tokens=4))  # still serving


def test_expired_signature_is_refused(served: Served, wait_expired) -> None:
    wait_expired()
    _refused(served, "alice/expiring", 422, "soppu adapter alice/expiring@1", "expired")
    _assert_not_cached(served, "expiring")


def test_version_below_one_already_served_is_refused(served: Served) -> None:
    srv = served.server
    _completion(srv.chat("alice/roll@2", "Repeat three times: rosa", max_tokens=8))
    # The registry (compromised, or restored from an old backup) now answers v1 as the latest.
    db = sqlite3.connect(served.registry.data / "registry.sqlite3")
    try:
        with db:
            db.execute("DELETE FROM versions WHERE owner='alice' AND name='roll' AND version=2")
    finally:
        db.close()
    _refused(served, "alice/roll", 422, "rollback refused", "version 1", "version 2")
    assert not (served.cache / "alice" / "roll" / "v1").exists()


def test_unknown_adapter_is_vllms_404(served: Served) -> None:
    r = served.server.chat("alice/no_such_adapter", "hi", max_tokens=2)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["type"] == "NotFoundError"
    assert served.server.alive()


# -- the resolver in-process under vLLM's environment (one session, counted per request) -----------

def _worker(served: Served, settings: dict, requests_: list[str], base_model: str) -> dict:
    import json
    import subprocess

    python = vllmkit.vllm_python()
    proc = subprocess.run([str(python), "-m", "tests.vllm.resolver_worker",
                           json.dumps({"settings": settings, "base_model": base_model, "requests": requests_})],
                          capture_output=True, text=True, timeout=600, cwd=vllmkit.REPO)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_each_vllm_request_verifies_once_over_one_pooled_connection(served: Served, tmp_path) -> None:
    from tests.serving.counting import Counting

    reg = served.registry
    with Counting(reg.url) as proxy:
        settings = {"registry_url": proxy.url, "registry_token": reg.serving_token, "cache_dir": str(tmp_path / "c"),
                    "served_base_model": srckit.BASE_MODEL, "resolve_ttl": 60}
        out = _worker(served, settings, ["alice/first_name", "alice/initials", "alice/first_name"], "/model")
        rows = out["results"]
        assert [r.get("lora_path") is not None for r in rows] == [True, True, True], rows
        # One statement verification per request, warm or cold (by Ed25519 the first time this process
        # sees the bundle's signed bytes, then by its verdict on the same bytes).
        assert [r["verifications"] for r in rows] == [1, 1, 1]
        assert [r["signature_checks"] for r in rows] == [1, 0, 0]
        # Cold: record, signature document, keys, manifest, basis, core; the second adapter: record,
        # core; warm: nothing (the record reused within the TTL).
        assert [r["registry_requests"] for r in rows] == [6, 2, 0]
        assert [r["warm"] for r in rows] == [False, False, True]
        connections, requests_seen = proxy.snapshot()
        assert requests_seen == 8 and connections == 1, (connections, proxy.requests)


def test_a_refused_base_model_raises_no_mark_and_a_file_cache_dir_is_named(served: Served, tmp_path) -> None:
    reg = served.registry
    cache = tmp_path / "c"
    settings = {"registry_url": reg.url, "registry_token": reg.serving_token, "cache_dir": str(cache)}
    rows = _worker(served, settings, ["alice/initials", "alice/uppercase@1"], "/some/other/model")["results"]
    assert [r["status"] for r in rows] == [400, 400]
    assert "was made for base model 'HuggingFaceTB/SmolLM2-135M-Instruct', but this server serves " \
           "'/some/other/model'" in rows[0]["message"]
    assert srckit.cache_files(cache) == []  # no rollback mark, nothing downloaded
    file = tmp_path / "file"
    file.write_text("x")
    out = _worker(served, {**settings, "cache_dir": str(file)}, [], "/m")
    assert out == {"init_error": {"type": "InputError", "message": (
        f"the soppu cache {file} (SOPPU_CACHE_DIR) is not a directory; point SOPPU_CACHE_DIR at a directory "
        "(created if absent) or remove that file")}}
