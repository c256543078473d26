"""The demo bundle served by stock vLLM through the `soppu` resolver, in both serving forms
(run by `scripts/serve_demo.sh`).

1. compresses `examples/adapters/*` (k=16, as `scripts/demo.sh`) unless `out/demo/bundle` holds them;
2. task accuracy through PEFT (transformers 4.x, `soppu_client.verify.verify_outputs`), for the
   original adapters and for their compressed exports, before vLLM starts (2 cores do not hold both);
3. per form (`--forms peft,compressed`): starts a registry on 127.0.0.1 (temp data dir, owner
   `demo`), signs and uploads the bundle, starts vLLM (`.venv-vllm`, `python -m
   vllm.entrypoints.openai.api_server --enable-lora`, `VLLM_PLUGINS=soppu`,
   `SOPPU_SERVE_FORMAT=<form>`) with the resolver reading that registry, and
   * asks every adapter its held-out prompts (`prompts.json`) over `/v1/chat/completions` (the
     model's chat template, greedy, temperature 0), scored as `soppu verify` scores them (exact match
     after stripping); the first request of an adapter is its cold latency (resolve, verify,
     download, materialize, load, generate), the same request again its warm latency;
   * measures throughput: the same mix of requests (8 tokens each) for the base model, then spread
     over every adapter (warm), tokens/s and the ratio to base on that server;
4. prints accuracy and throughput of both forms side by side (`--json`: one JSON object instead) and
   stops what it started.

Runs in the project's `.venv` (the client side and PEFT); vLLM runs in `.venv-vllm`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The tests' helpers: registry, sign and upload (srckit); vLLM with the soppu plugin (vllmkit).
from tests.serving import srckit
from tests.vllm import vllmkit

EXAMPLES = REPO / "examples" / "adapters"
OWNER = "demo"


def log(msg: str) -> None:
    print(f"[serve_demo] {msg}", file=sys.stderr, flush=True)


@contextmanager
def scratch_dir(prefix: str, keep: bool) -> Iterator[Path]:
    """A temp dir for registry data, cache and logs; removed at the end unless ``keep``."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        if keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def served_through_vllm(tmp: Path, bundle: Path, python: Path, model: Path, extra_args: tuple[str, ...],
                        owner: str = OWNER, form: str = "peft") -> Iterator[tuple[srckit.Registry, vllmkit.VllmServer]]:
    """A registry on loopback with ``bundle`` signed and published as ``owner``'s v1, and a vLLM server
    with the soppu resolver reading from it, serving ``form`` (SOPPU_SERVE_FORMAT); both are stopped
    when the block ends, however it ends. ``tmp`` is this pair's own dir."""
    registry = server = None
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        registry = srckit.start_registry(tmp, owner=owner)
        registry.publish(bundle, version=1)
        env = {"SOPPU_REGISTRY_URL": registry.url, "SOPPU_REGISTRY_TOKEN": registry.serving_token,
               "SOPPU_CACHE_DIR": str(tmp / "cache"), "SOPPU_SERVED_BASE_MODEL": srckit.BASE_MODEL,
               "SOPPU_SERVE_FORMAT": form}
        server = vllmkit.start_vllm(python, model, port=srckit.free_port(), log=tmp / "vllm.log", env=env,
                                    extra_args=extra_args)
        yield registry, server
    finally:
        if server is not None:
            server.stop()
        if registry is not None:
            registry.stop()


def adapter_dirs() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if (p / "adapter_config.json").is_file())


def demo_bundle(tmp: Path, dirs: list[Path], rank: int) -> Path:
    """A copy of out/demo/bundle when it holds every example adapter, else a fresh compression."""
    names = {d.name for d in dirs}
    existing = REPO / "out" / "demo" / "bundle"
    manifest = existing / "manifest.json"
    if manifest.is_file() and set(json.loads(manifest.read_text())["adapters"]) >= names:
        log(f"using {existing.relative_to(REPO)} (copied: signing writes into the bundle)")
        return Path(shutil.copytree(existing, tmp / "bundle", ignore=shutil.ignore_patterns("signature.json")))
    log(f"compressing {len(dirs)} example adapters (k={rank}) as scripts/demo.sh does")
    srckit.run("soppu", "compress", *map(str, dirs), "-o", str(tmp / "bundle"), "--rank", str(rank), "--force")
    return tmp / "bundle"


def peft_accuracy(bundle: Path, dirs: list[Path], max_prompts: int, max_tokens: int) -> dict[str, dict]:
    from soppu_client.adapters import load_collection
    from soppu_client.format.bundle import Bundle
    from soppu_client.verify import verify_outputs

    def progress(items):
        for item in items:
            log(f"  PEFT: {item[1].name}")
            yield item

    checks = verify_outputs(Bundle.open(bundle), load_collection(dirs), "smollm2", max_new_tokens=max_tokens,
                            max_prompts=max_prompts, progress=progress)
    return {c.adapter: {"original": c.task_accuracy_original, "compressed": c.task_accuracy_compressed}
            for c in checks}


def ask(server: vllmkit.VllmServer, model: str, prompt: str, max_tokens: int) -> tuple[str, float]:
    start = time.perf_counter()
    r = server.chat(model, prompt, max_tokens=max_tokens)
    elapsed = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"{model}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()["choices"][0]["message"]["content"], elapsed


def vllm_accuracy(server: vllmkit.VllmServer, dirs: list[Path], max_prompts: int, max_tokens: int,
                  concurrency: int) -> dict[str, dict]:
    from soppu_client.verify import exact_match, load_prompts

    out = {}
    for d in dirs:
        items = load_prompts(d)[:max_prompts]
        model = f"{OWNER}/{d.name}@1"
        first, cold = ask(server, model, items[0]["prompt"], max_tokens)
        again, warm = ask(server, model, items[0]["prompt"], max_tokens)
        with ThreadPoolExecutor(concurrency) as pool:
            rest = list(pool.map(lambda it, m=model: ask(server, m, it["prompt"], max_tokens)[0], items[1:]))
        texts = [first, *rest]
        hits = [exact_match(t, it["answer"]) for t, it in zip(texts, items)]
        out[d.name] = {"prompts": len(items), "accuracy": sum(hits) / len(hits), "cold_s": cold, "warm_s": warm,
                       "deterministic": first == again, "example": {"prompt": items[0]["prompt"], "vllm": first,
                                                                     "answer": items[0]["answer"]}}
        log(f"{model}: {sum(hits)}/{len(hits)} correct, cold {cold:.2f} s, warm {warm:.2f} s")
    return out


def throughput(server: vllmkit.VllmServer, dirs: list[Path], requests: int, concurrency: int) -> dict:
    """Warm tokens/s of ``requests`` 8-token requests for the base model, then spread over every adapter."""
    from soppu_client.verify import load_prompts

    prompts = [it["prompt"] for d in dirs for it in load_prompts(d)]
    prompts = [prompts[(i * 7) % len(prompts)] for i in range(requests)]

    def run(models: list[str]) -> float:
        def one(mp):
            body = {"model": mp[0], "messages": [{"role": "user", "content": mp[1]}], "max_tokens": 8,
                    "temperature": 0, "ignore_eos": True}
            r = requests_post(server.url + "/v1/chat/completions", body)
            return r.json()["usage"]["completion_tokens"]
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            tokens = sum(pool.map(one, zip(models, prompts)))
        return tokens / (time.perf_counter() - start)

    adapters = [f"{OWNER}/{d.name}@1" for d in dirs]
    run([vllmkit.SERVED_NAME] * concurrency)  # warm-up
    base = run([vllmkit.SERVED_NAME] * requests)
    mixed = run([adapters[i % len(adapters)] for i in range(requests)])
    base_again = run([vllmkit.SERVED_NAME] * requests)
    base_mean = (base + base_again) / 2
    return {"base_tokens_per_s": round(base_mean, 1), "adapters_tokens_per_s": round(mixed, 1),
            "ratio_to_base": round(mixed / base_mean, 3), "requests": requests}


def requests_post(url: str, body: dict):
    import requests

    r = requests.post(url, json=body, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"{body['model']}: HTTP {r.status_code}: {r.text[:500]}")
    return r


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--forms", default="peft,compressed", help="serving forms, one vLLM server each")
    p.add_argument("--rank", type=int, default=16, help="k of the bundle when it is compressed here")
    p.add_argument("--max-prompts", type=int, default=16, help="held-out prompts per adapter (as soppu verify)")
    p.add_argument("--max-tokens", type=int, default=16, help="generated tokens per prompt (as soppu verify)")
    p.add_argument("--concurrency", type=int, default=8, help="parallel requests after the cold/warm pair")
    p.add_argument("--throughput-requests", type=int, default=48, help="requests per throughput pass")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (registry data, cache, logs)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    if any(f not in ("peft", "compressed") for f in forms):
        p.error(f"--forms {args.forms!r}: each form is peft or compressed")

    import pytest

    try:
        python = vllmkit.vllm_python()
    except pytest.skip.Exception as exc:
        log(f"cannot serve with vLLM: {exc}")
        return 2
    from soppu_client.base_model import ensure_default_model

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops what was started
    t0 = time.monotonic()
    dirs = adapter_dirs()
    with scratch_dir("soppu-serve-demo-", args.keep) as tmp:
        model = ensure_default_model()
        bundle = demo_bundle(tmp, dirs, args.rank)
        log("task accuracy through PEFT (original adapters and compressed exports)...")
        t = time.monotonic()
        peft = peft_accuracy(bundle, dirs, args.max_prompts, args.max_tokens)
        peft_s = time.monotonic() - t
        n = len(dirs)
        served, speed, startup, passes = {}, {}, {}, {}
        for form in forms:
            server_args = ("--max-loras", str(min(n, 8)), "--max-cpu-loras", str(n))
            with served_through_vllm(tmp / form, bundle, python, model, server_args, form=form) as (registry, server):
                log(f"{form}: registry {registry.url}: {OWNER}'s bundle v1 signed and uploaded ({n} adapters); "
                    f"vLLM up at {server.url} in {server.started_in:.1f} s (log {tmp / form / 'vllm.log'})")
                t = time.monotonic()
                served[form] = vllm_accuracy(server, dirs, args.max_prompts, args.max_tokens, args.concurrency)
                passes[form] = round(time.monotonic() - t, 1)
                speed[form] = throughput(server, dirs, args.throughput_requests, args.concurrency)
                startup[form] = round(server.started_in, 1)
                log(f"{form}: {speed[form]}")
        names = [d.name for d in dirs]
        result = {
            "base_model": srckit.BASE_MODEL, "bundle": str(bundle), "max_new_tokens": args.max_tokens,
            "forms": forms, "vllm_startup_s": startup, "peft_pass_s": round(peft_s, 1), "vllm_pass_s": passes,
            "throughput": speed, "total_s": round(time.monotonic() - t0, 1),
            "adapters": {name: {"prompts": served[forms[0]][name]["prompts"], "peft_original": peft[name]["original"],
                                "peft_compressed": peft[name]["compressed"],
                                **{f"vllm_{f}": served[f][name]["accuracy"] for f in forms},
                                **{f"cold_s_{f}": round(served[f][name]["cold_s"], 3) for f in forms},
                                **{f"warm_s_{f}": round(served[f][name]["warm_s"], 3) for f in forms},
                                "example": served[forms[0]][name]["example"]} for name in names},
        }
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        cols = ["peft_original", "peft_compressed", *[f"vllm_{f}" for f in forms]]
        lat = [c for f in forms for c in (f"cold_s_{f}", f"warm_s_{f}")]
        rows = [[name, a["prompts"], *[fmt(a[c]) for c in cols], *[f"{a[c]:.2f}" for c in lat]]
                for name, a in result["adapters"].items()]
        mean = lambda key: sum(a[key] for a in result["adapters"].values()) / len(rows)  # noqa: E731
        rows.append(["MEAN", "", *[fmt(mean(c)) for c in cols], *[f"{mean(c):.2f}" for c in lat]])
        print(f"\nTask accuracy (exact match, greedy, {args.max_tokens} new tokens, chat template) and latency of "
              f"one request (s) through vLLM with the soppu resolver; bundle k={json.loads((bundle / 'manifest.json').read_text())['rank']}")
        print(table(rows, ["adapter", "prompts", "PEFT orig", "PEFT compressed", *[f"vLLM {f} form" for f in forms],
                           *[f"{w} s {f}" for f in forms for w in ("cold", "warm")]]))
        print("\nThroughput (warm, 8-token requests, %d in flight; base measured on the same server before and "
              "after):" % args.concurrency)
        print(table([[f, speed[f]["base_tokens_per_s"], speed[f]["adapters_tokens_per_s"],
                      f"{speed[f]['ratio_to_base']:.2f}"] for f in forms],
                    ["form", "base tok/s", f"{n} adapters tok/s", "ratio to base"]))
        print(f"\nPEFT = transformers 4.x + PEFT on the original adapter / its compressed export (batched, "
              f"soppu verify); vLLM peft form = the resolver hands vLLM a PEFT dir (stock LoRA layers); vLLM "
              f"compressed form = SOPPU_SERVE_FORMAT=compressed (cores per adapter on one resident basis).\n"
              f"cold = first request (resolve, verify, download, materialize, load, generate); warm = the same "
              f"request again. CPU, relative figures.\n"
              f"vLLM startup {startup} s; PEFT pass {result['peft_pass_s']} s; vLLM passes {passes} s; "
              f"total {result['total_s']} s")
        return 0


if __name__ == "__main__":
    sys.exit(main())
