"""Run the `soppu` resolver in-process under the vLLM environment (real vLLM, real registry):
``.venv-vllm/bin/python -m tests.vllm.resolver_worker '<json>'``.

Input: ``{"settings": {Settings keywords}, "base_model": <the served model path>, "requests":
[lora names]}``. Builds one :class:`SoppuLoRAResolver` (one session, as ``register_resolver``
does once per process) and calls ``resolve_sync`` for each name in turn, as vLLM's API server
does per request. Prints one JSON object: per request, the outcome (``lora_path`` or the refusal's
HTTP status and message) and what the session counted for it (registry requests, signature
verifications)."""

from __future__ import annotations

import json
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    from soppu_client.format.errors import SoppuError
    from soppu_serving import Settings
    from vllm_lora_resolver.resolver import SoppuLoRAResolver, SoppuResolveError

    try:
        resolver = SoppuLoRAResolver(Settings(**spec["settings"]))
    except SoppuError as e:
        print(json.dumps({"init_error": {"type": type(e).__name__, "message": str(e)}}))
        return
    served: list = []
    serve = resolver.session.serve

    def spy(*args, **kwargs):  # calls through: records what each request's serve counted
        result = serve(*args, **kwargs)
        served.append(result)
        return result

    resolver.session.serve = spy
    out = []
    for name in spec["requests"]:
        served.clear()
        try:
            req = resolver.resolve_sync(spec["base_model"], name)
            row = {"name": name, "lora_path": req.lora_path if req is not None else None}
        except SoppuResolveError as e:
            row = {"name": name, "status": int(e.http_status), "message": e.message}
        if served:
            s = served[-1].stats
            row.update(registry_requests=s.registry_requests, verifications=s.verifications,
                       signature_checks=s.signature_checks, warm=s.warm, materialized=s.materialized)
        out.append(row)
    print(json.dumps({"results": out}))


if __name__ == "__main__":
    main()
