"""How the serving side's errors tell an engine's users what to do: one :class:`Wording` per engine.

The checks are engine-neutral; only the fix in a message differs (a LoRAX client sends a token
with its request, a vLLM server has one token for every request). A :class:`~soppu_serving.session.Session`
carries one and every refusal it raises is worded with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from soppu_client.format.errors import RegistryError, SoppuError
from soppu_client.format.refs import AdapterRef

__all__ = ["GENERIC", "LORAX", "VLLM", "Wording"]


@dataclass(frozen=True)
class Wording:
    """The engine-specific halves of the serving side's error messages."""

    engine: str  # "LoRAX", "vLLM", or "the serving host"
    token_fix: str  # what to do about a token the registry rejected (401)
    url_fix: str  # how to give the engine a registry URL
    subject: str = "soppu adapter"  # how every message names the adapter

    def explain(self, err: RegistryError, what: str, *, ref: AdapterRef, url: str) -> SoppuError:
        """A registry refusal (while ``what``) as a message naming the adapter and this engine's fix."""
        who = f"{self.subject} {ref}"
        if err.status is None and err.code in ("deadline", "response_too_large", "bad_response"):
            return RegistryError(f"{who}: refused the registry's answer while {what}: {err}",
                                 status=None, code=err.code, url=err.url)
        if err.status is None:
            return RegistryError(f"{who}: cannot reach the registry at {url} ({what}): {err}. "
                                 "Check SOPPU_REGISTRY_URL and that the registry is running.",
                                 status=None, code="unreachable", url=err.url)
        if err.status == 401:
            return RegistryError(f"{who}: the registry at {url} rejected the token ({err}). {self.token_fix}.",
                                 status=401, code=err.code, url=err.url)
        if err.status == 403:
            return RegistryError(f"{who}: the token may not read adapters of owner {ref.owner!r} ({err}). "
                                 "Use an owner-read token of that owner or a serving-read token.",
                                 status=403, code=err.code, url=err.url)
        if err.status == 404:
            which = f"version {ref.version} of" if ref.version is not None else "version of"
            return RegistryError(f"{who}: unknown adapter: the registry at {url} has no published {which} "
                                 f"{ref.owner}/{ref.name} ({err})", status=404, code=err.code, url=err.url)
        return RegistryError(f"{who}: registry error while {what}: {err}", status=err.status, code=err.code,
                             url=err.url)


GENERIC = Wording("the serving host", "Set SOPPU_REGISTRY_TOKEN to a valid registry token",
                  "set SOPPU_REGISTRY_URL=http://registry:8080")
LORAX = Wording("LoRAX", "Send a valid registry token as the request's api_token (or set SOPPU_REGISTRY_TOKEN)",
                "start LoRAX with SOPPU_REGISTRY_URL=http://registry:8080 to serve adapters of source `soppu`")
VLLM = Wording("vLLM", "Start vLLM with SOPPU_REGISTRY_TOKEN set to a valid serving-read token (the resolver "
                       "sends the server's token for every request)",
               "start vLLM with SOPPU_REGISTRY_URL=http://registry:8080 (and VLLM_PLUGINS=soppu) to resolve "
               "owner/name adapters")
