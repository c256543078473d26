"""SOPPU's compressed form served by stock vLLM (`SOPPU_SERVE_FORMAT=compressed`, the `soppu` plugin's
runtime hooks), end to end: registry on loopback -> resolver -> compressed dir -> SOPPU-aware vLLM
layers (cores per slot, shared bases) -> tokens.

Published before vLLM starts, as `alice`: bundle `main` (the 12 example adapters, k=16, one basis)
and bundle `other` (copies of four of them named `b-*`, k=8, another basis). The PEFT form of `main`
(`soppu export`) is the reference: first a stock vLLM server (`SOPPU_SERVE_FORMAT=peft`, no SOPPU code
in its layers) answers every held-out prompt through it, then that server stops and the compressed
one starts (2 cores do not hold both). The compressed server (`--max-loras 4 --max-cpu-loras 4`:
vLLM's LRU evicts adapters all the time, so every test also runs through eviction and reload) has
the PEFT exports loaded as ordinary LoRAs too (`/v1/load_lora_adapter`, names `peft-<adapter>`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.serving import srckit
from tests.vllm import vllmkit
from tests.vllm.conftest import EXAMPLES, MAX_TOKENS, _peft_greedy, strip_stop

OTHER = ("repeat_word", "snake_case", "swap_name", "reverse_words")
REFERENCE_ADAPTER, N_REFERENCE = "uppercase", 8
MAX_LORAS = 4


@dataclass
class CompressedServer:
    server: vllmkit.VllmServer
    registry: srckit.Registry
    names: list[str]  # adapters of `main`
    prompts: dict[str, list[dict]]  # held-out prompts per adapter
    peft_reference: tuple  # _peft_greedy (transformers + PEFT) of REFERENCE_ADAPTER's export
    stock_answers: dict[tuple[str, int], str]  # (adapter, prompt index) -> the PEFT form through stock vLLM


def _chat(server: vllmkit.VllmServer, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> tuple[str, list[int]]:
    r = server.chat(model, prompt, max_tokens=max_tokens)
    assert r.status_code == 200, f"{model}: {r.status_code} {r.text[:500]}"
    choice = r.json()["choices"][0]
    return choice["message"]["content"], strip_stop(choice["token_ids"])


def _load_peft(server: vllmkit.VllmServer, name: str, path: Path) -> None:
    r = requests.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                      timeout=120)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompressedServer]:
    python = vllmkit.vllm_python()
    from soppu_client.base_model import ensure_default_model

    model = ensure_default_model()
    tmp = tmp_path_factory.mktemp("vllm-compressed")
    names = sorted(p.name for p in EXAMPLES.iterdir() if (p / "prompts.json").is_file())
    reg = srckit.start_registry(tmp)
    server = None
    try:
        main = srckit.compress([EXAMPLES / n for n in names], tmp / "main", rank=16)
        reg.publish(main, version=1)
        others = []
        for n in OTHER:
            others.append(Path(shutil.copytree(EXAMPLES / n, tmp / "ads" / f"b-{n}")))
        reg.publish(srckit.compress(others, tmp / "other", rank=8), version=1)
        for n in names:
            srckit.run("soppu", "export", str(main), n, "-o", str(tmp / "peft" / n))
        prompts = {n: json.loads((EXAMPLES / n / "prompts.json").read_text()) for n in names}
        # The independent reference runs before vLLM starts: 2 cores are not enough for both at once.
        reference = _peft_greedy(tmp / "peft" / REFERENCE_ADAPTER,
                                 [p["prompt"] for p in prompts[REFERENCE_ADAPTER][:N_REFERENCE]])
        env = {"SOPPU_REGISTRY_URL": reg.url, "SOPPU_REGISTRY_TOKEN": reg.serving_token,
               "SOPPU_CACHE_DIR": str(tmp / "cache"), "SOPPU_SERVED_BASE_MODEL": srckit.BASE_MODEL}
        flags = ("--max-loras", str(MAX_LORAS), "--max-cpu-loras", str(MAX_LORAS))
        server = vllmkit.start_vllm(python, model, port=srckit.free_port(), log=tmp / "vllm-stock.log",
                                    env={**env, "SOPPU_SERVE_FORMAT": "peft"}, extra_args=flags)
        for n in names:
            _load_peft(server, f"peft-{n}", tmp / "peft" / n)
        jobs = [(n, i) for n in names for i in range(len(prompts[n]))]
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda j: _chat(server, f"peft-{j[0]}", prompts[j[0]][j[1]]["prompt"])[0], jobs))
        assert "soppu compressed" not in server.log_text(), "the stock server ran the compressed path"
        server.stop()
        stock = dict(zip(jobs, texts))
        server = vllmkit.start_vllm(python, model, port=srckit.free_port(), log=tmp / "vllm.log",
                                    env={**env, "SOPPU_SERVE_FORMAT": "compressed"}, extra_args=flags)
        for n in names:
            _load_peft(server, f"peft-{n}", tmp / "peft" / n)
        yield CompressedServer(server, reg, names, prompts, reference, stock)
    finally:
        if server is not None:
            server.stop()
        reg.stop()


def test_compressed_greedy_equals_transformers_peft(compressed: CompressedServer) -> None:
    """Token for token, the compressed path reproduces transformers + PEFT on the adapter's PEFT export."""
    srv = compressed.server
    prompt_ids, base, adapter = compressed.peft_reference
    assert all(b != a for b, a in zip(base, adapter)), "vacuous: the adapter does not change the base model"
    for i, item in enumerate(compressed.prompts[REFERENCE_ADAPTER][:N_REFERENCE]):
        text, ids = _chat(srv, f"alice/{REFERENCE_ADAPTER}@1", item["prompt"])
        assert ids == adapter[i], f"prompt {i} {item['prompt']!r}: vLLM compressed {text!r}"
    events = [e for e, _ in vllmkit.residency_log(srv.log_text())]
    assert any(e.startswith(f"activated alice/{REFERENCE_ADAPTER}@1 ") for e in events), \
        "the adapter did not go through the compressed path"


def test_held_out_completions_compressed_equal_peft_form(compressed: CompressedServer) -> None:
    """Every example adapter's held-out prompts, the compressed form (compressed server) vs the PEFT
    form (stock vLLM): >= 95% identical strings, task accuracy within one answer per task."""
    from soppu_client.verify import exact_match

    srv = compressed.server
    jobs = [(n, i, item) for n in compressed.names for i, item in enumerate(compressed.prompts[n])]

    def both(job):
        n, i, item = job
        return _chat(srv, f"alice/{n}@1", item["prompt"])[0], compressed.stock_answers[(n, i)]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(both, jobs))
    # Non-vacuity: the adapters change the base model's answers.
    base = [_chat(srv, vllmkit.SERVED_NAME, compressed.prompts[n][0]["prompt"])[0] for n in compressed.names]
    firsts = [answers[k][0] for k, (_, i, _) in enumerate(jobs) if i == 0]
    assert sum(b != c for b, c in zip(base, firsts)) >= len(base) - 1, (base, firsts)
    same = sum(c == p for c, p in answers)
    assert same >= 0.95 * len(jobs), [(j[0], j[2]["prompt"], a) for j, a in zip(jobs, answers) if a[0] != a[1]]
    for n in compressed.names:
        rows = [(a, j[2]["answer"]) for j, a in zip(jobs, answers) if j[0] == n]
        acc_c = sum(exact_match(c, ans) for (c, _), ans in rows)
        acc_p = sum(exact_match(p, ans) for (_, p), ans in rows)
        assert abs(acc_c - acc_p) <= 1, f"{n}: compressed {acc_c}/{len(rows)} vs PEFT form {acc_p}/{len(rows)}"
        assert acc_p >= len(rows) // 2, f"{n}: the PEFT form itself answers {acc_p}/{len(rows)}: not a task test"
    activated = {e.split()[1] for e, _ in vllmkit.residency_log(srv.log_text()) if e.startswith("activated ")}
    assert {f"alice/{n}@1" for n in compressed.names} <= activated


def test_mixed_batch_three_compressed_one_ordinary_and_base(compressed: CompressedServer) -> None:
    """3 compressed adapters, 1 ordinary LoRA and the base model, sent together (one batch: 5 requests,
    --max-num-seqs 8, 4 LoRA slots), each get their own answer, the one they get alone."""
    srv = compressed.server
    jobs = [("alice/uppercase@1", "Convert to uppercase: ocean violin"),
            ("alice/first_name@1", "First name only: Morgan, David"),
            ("alice/initials@1", "Initials of: Quinn Karen Perez"),
            ("peft-last_word", "Last word of: forest window turtle"),
            (vllmkit.SERVED_NAME, "Convert to uppercase: ocean violin")]
    alone = [_chat(srv, m, p)[1] for m, p in jobs]
    assert len({tuple(a) for a in alone}) == len(jobs), "vacuous: two requests give the same answer alone"
    assert alone[0] != alone[4], "vacuous: the adapter does not change the base model's answer"
    for _ in range(3):
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda mp: _chat(srv, *mp)[1], jobs))
        assert together == alone, [(m, a, t) for (m, _), a, t in zip(jobs, alone, together) if a != t]


def test_eviction_frees_cores_and_bases(compressed: CompressedServer) -> None:
    """Adapters of two bundles come and go through 4 LoRA slots: a bundle's bases leave with its last
    adapter, and the resident state after each round is the same (no growth)."""
    srv = compressed.server
    rounds = []
    for _ in range(3):
        for n in OTHER:  # 4 adapters of `other`: every slot, every `main` adapter evicted
            _chat(srv, f"alice/b-{n}@1", compressed.prompts[n][0]["prompt"], max_tokens=4)
        after_other = vllmkit.residency_log(srv.log_text())[-1][1]
        for n in ("uppercase", "first_name", "initials", "last_word"):
            _chat(srv, f"alice/{n}@1", compressed.prompts[n][0]["prompt"], max_tokens=4)
        after_main = vllmkit.residency_log(srv.log_text())[-1][1]
        rounds.append((after_other, after_main))
    log = vllmkit.residency_log(srv.log_text())
    assert any(e.startswith("released ") for e, _ in log), "no adapter was released"
    for after_other, after_main in rounds:
        # Only one bundle's adapters are in the 4 slots: one basis per targeted module (60), its cores.
        assert after_other["compressed_adapters"] == MAX_LORAS and after_main["compressed_adapters"] == MAX_LORAS
        assert after_other["bases"] == 60 and after_main["bases"] == 60
        assert after_other["host_basis_bytes"] < after_main["host_basis_bytes"], "k=8 bases of `other`, k=16 of `main`"
        assert after_main["host_bases"] == 60, "bases of evicted adapters are still held in the process"
    assert all(r == rounds[0] for r in rounds), rounds
    assert max(f["bases"] for _, f in log) <= 120 and max(f["compressed_adapters"] for _, f in log) <= MAX_LORAS
