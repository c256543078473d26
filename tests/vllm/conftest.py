"""One registry and one vLLM server (with the soppu resolver) for the whole vLLM test session.

Published before vLLM starts, all as owner `alice`:
* `main` bundle v1: four shipped example adapters (`soppu compress`, k=16, one shared basis);
* `refusals` bundle v1 and v2: copies of two example adapters named `roll` and `tampered`; then the
  stored core blob of `tampered` is corrupted in the registry's blob dir;
* `expiring` bundle v1: one adapter signed to expire a few seconds after it is published.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.serving import srckit
from tests.vllm import vllmkit

EXAMPLES = vllmkit.REPO / "examples" / "adapters"
MAIN = ("uppercase", "first_name", "initials", "last_word")
EXPIRY_S = 20  # `expiring` is published this long before it expires
PEFT_ADAPTER, N_PROMPTS, MAX_TOKENS = "uppercase", 8, 16
STOP_IDS = {1, 2}  # <|im_start|> (the converted tokenizer's eos) and <|im_end|> (generation_config's)


def strip_stop(ids: list[int]) -> list[int]:
    ids = list(ids)
    while ids and ids[-1] in STOP_IDS:
        ids.pop()
    return ids


def _peft_greedy(adapter_dir: Path, prompts: list[str]) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(prompt ids, base greedy ids, adapter greedy ids) per prompt, with transformers 4.x + PEFT,
    one prompt at a time (no padding), fp32: the reference vLLM must reproduce."""
    import torch
    from peft import PeftModel

    from soppu_client.base_model import load_base_model

    model, tok = load_base_model()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    encoded = [tok(t, add_special_tokens=False, return_tensors="pt") for t in texts]

    def greedy(m) -> list[list[int]]:
        out = []
        with torch.no_grad():
            for enc in encoded:
                gen = m.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=sorted(STOP_IDS),
                                 pad_token_id=2)
                out.append(strip_stop(gen[0, enc["input_ids"].shape[1]:].tolist()))
        return out

    base = greedy(model)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.eval()
    return [e["input_ids"][0].tolist() for e in encoded], base, greedy(peft_model)




@dataclass
class Served:
    server: vllmkit.VllmServer
    registry: srckit.Registry
    cache: Path  # SOPPU_CACHE_DIR of the server
    main_bundle: Path
    expires_at: datetime  # of `expiring`
    tmp: Path
    peft_prompts: list[str]
    peft_reference: tuple  # _peft_greedy of PEFT_ADAPTER's export on peft_prompts


def _copy_adapter(src: str, dst: Path) -> Path:
    shutil.copytree(EXAMPLES / src, dst)
    return dst


def _sign_and_upload(reg: srckit.Registry, bundle: Path, version: int, expires: str) -> None:
    srckit.run("soppu", "sign", str(bundle), "--key", str(reg.key), "--owner", reg.owner, "--version", str(version),
               "--expires", expires)
    srckit.run("soppu", "upload", str(bundle), "--registry", reg.url, "--token", reg.write_token, "--retries", "0",
               "--no-progress", "--json")


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    python = vllmkit.vllm_python()  # skips with the reason when there is no vLLM environment
    from soppu_client.base_model import ensure_default_model

    model = ensure_default_model()
    tmp = tmp_path_factory.mktemp("vllm")
    reg = srckit.start_registry(tmp)
    server = None
    try:
        main = srckit.compress([EXAMPLES / n for n in MAIN], tmp / "main", rank=16)
        reg.publish(main, version=1)
        refusals = srckit.compress([_copy_adapter("repeat_word", tmp / "ads" / "roll"),
                                    _copy_adapter("snake_case", tmp / "ads" / "tampered")], tmp / "refusals", rank=8)
        reg.publish(refusals, version=1)
        reg.publish(refusals, version=2)
        digest = json.loads((refusals / "manifest.json").read_text())["files"]["cores/tampered.safetensors"]["sha256"]
        blob = reg.data / "blobs" / "sha256" / digest[:2] / digest
        blob.chmod(0o644)
        data = bytearray(blob.read_bytes())
        data[-3] ^= 0x01  # one bit of tensor data: the registry now serves bytes the owner never signed
        blob.write_bytes(bytes(data))
        # The PEFT reference runs before vLLM starts: 2 cores are not enough for both at once.
        prompts = [p["prompt"] for p in json.loads((EXAMPLES / PEFT_ADAPTER / "prompts.json").read_text())][:N_PROMPTS]
        srckit.run("soppu", "export", str(main), PEFT_ADAPTER, "-o", str(tmp / "peft"))
        reference = _peft_greedy(tmp / "peft", prompts)
        expiring = srckit.compress([_copy_adapter("date_format", tmp / "ads" / "expiring")], tmp / "expiring", rank=8)
        expires_at = (datetime.now(timezone.utc) + timedelta(seconds=EXPIRY_S)).replace(microsecond=0)
        _sign_and_upload(reg, expiring, 1, expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"))
        cache = tmp / "cache"
        env = {"SOPPU_REGISTRY_URL": reg.url, "SOPPU_REGISTRY_TOKEN": reg.serving_token, "SOPPU_CACHE_DIR": str(cache),
               "SOPPU_SERVED_BASE_MODEL": srckit.BASE_MODEL, "SOPPU_RESOLVE_TTL": "0"}
        server = vllmkit.start_vllm(python, model, port=srckit.free_port(), log=tmp / "vllm.log", env=env)
        print(f"\nvLLM server up in {server.started_in:.1f} s")
        yield Served(server, reg, cache, main, expires_at, tmp, prompts, reference)
    finally:
        if server is not None:
            server.stop()
        reg.stop()


@pytest.fixture
def wait_expired(served: Served):
    """Sleep until `expiring` has expired (the registry published it while it was valid)."""
    def wait() -> None:
        left = (served.expires_at - datetime.now(timezone.utc)).total_seconds() + 1.0
        if left > 0:
            time.sleep(left)
    return wait
