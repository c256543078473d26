"""The ``soppu`` :class:`~vllm.lora.resolver.LoRAResolver`: ``owner/name[@version]`` -> a verified adapter dir.

vLLM consults resolvers when a request names a model it does not know
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``), with ``base_model_name`` = the served model *path*
(``model_config.model``, not ``--served-model-name``). This resolver

1. parses ``lora_name`` as ``owner/name[@version]`` (anything else: not ours, ``None``);
2. serves it through the process's one :class:`soppu_serving.Session` (made at registration from
   the ``SOPPU_*`` environment, vLLM wording) with the server's token (``SOPPU_REGISTRY_TOKEN``:
   the resolver sees only the adapter name, so that token decides what this server may serve):
   resolve, verify once (owner key, signature, expiry, rollback), then the engine check
   :meth:`SoppuLoRAResolver.base_model_ok` (the bundle's ``base_model`` is the served model: its
   path, or ``SOPPU_SERVED_BASE_MODEL``) before any download, then materialize (digests, tensors,
   one download per blob however many requests race). An adapter the registry does not have ->
   ``None``, which vLLM answers with 404;
3. returns a ``LoRARequest`` on the served dir (``SOPPU_SERVE_FORMAT``: vLLM's stock loader reads
   the PEFT form; the compressed form is loaded by the hooks the plugin installs in every vLLM
   process with ``SOPPU_SERVE_FORMAT=compressed``, :mod:`vllm_lora_resolver.compressed`).

A refusal (verification, base model, registry) raises :class:`SoppuResolveError`, a vLLM error
that the API server turns into a JSON error response carrying the message; it is logged too,
nothing is cached, no rollback mark is raised and the server keeps serving.

vLLM remembers a resolved name for the life of the server: ask for ``owner/name@version`` to pin
a version; a plain ``owner/name`` is the latest at its first request.
"""

from __future__ import annotations

import asyncio
import hashlib
from http import HTTPStatus

from vllm.exceptions import GracefulHTTPError
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from soppu_client.format.errors import InputError, RegistryError, SoppuError, VerificationError
from soppu_serving import VLLM, AdapterRef, Served, Session, Settings, VerifiedVersion

__all__ = ["RESOLVER_NAME", "SoppuLoRAResolver", "SoppuResolveError", "lora_int_id", "register_resolver"]

RESOLVER_NAME = "soppu"
log = init_logger("vllm.soppu_resolver")  # under "vllm": vLLM's log handlers and level


class SoppuResolveError(GracefulHTTPError):
    """A refused adapter, answered to the client with ``http_status`` and the message."""


def lora_int_id(ref: AdapterRef, version: int) -> int:
    """A stable id > 0 for ``owner/name`` at ``version`` (vLLM's API server renumbers it; the
    engine API keeps it)."""
    digest = hashlib.sha256(f"{ref.owner}/{ref.name}@{version}".encode()).digest()
    return int.from_bytes(digest[:7], "big") + 1


def _status(err: SoppuError) -> HTTPStatus:
    if isinstance(err, RegistryError):
        if err.status in (401, 403):
            return HTTPStatus.FORBIDDEN
        return HTTPStatus.BAD_GATEWAY if err.status is None or err.status >= 500 else HTTPStatus.BAD_REQUEST
    if isinstance(err, VerificationError):
        return HTTPStatus.UNPROCESSABLE_ENTITY
    return HTTPStatus.BAD_REQUEST


class SoppuLoRAResolver(LoRAResolver):
    """Resolves ``owner/name[@version]`` through a SOPPU registry (see the module docstring)."""

    def __init__(self, settings: Settings, session: Session | None = None):
        self.settings = settings
        # SOPPU_SERVE_FORMAT picks the form (default peft: vLLM's stock loader reads PEFT dirs)
        self.session = session or Session(settings, wording=VLLM)
        self.cache = self.session.cache
        self._announced = False

    def base_model_ok(self, served: str, bundle_base: str) -> bool:
        """Whether a bundle made for ``bundle_base`` may be served on the model at ``served``."""
        return bundle_base in {served, self.settings.served_base_model} - {None}

    def engine_check(self, base_model_name: str):
        """The session's engine check for this server: the bundle's base model is the served one."""
        def check(verified: VerifiedVersion) -> None:
            base = verified.statement.get("base_model")
            if not self.base_model_ok(base_model_name, base):
                raise InputError(
                    f"{verified.label} was made for base model {base!r}, but this server serves {base_model_name!r}; "
                    f"serve it on that base model, or set SOPPU_SERVED_BASE_MODEL={base} if {base_model_name!r} is "
                    "that model")
        return check

    def serve(self, base_model_name: str, ref: AdapterRef) -> Served | None:
        """One request's adapter through the session; None when the registry has no such adapter."""
        try:
            return self.session.serve(ref, self.settings.registry_token, check=self.engine_check(base_model_name))
        except RegistryError as e:
            if e.status == 404:
                log.info("soppu resolver: %s: no such adapter at %s", ref, self.settings.registry_url)
                return None
            raise

    def resolve_sync(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """The blocking part of :meth:`resolve_lora` (run in a worker thread)."""
        try:
            ref = AdapterRef.parse(lora_name)
        except InputError:
            return None  # not an `owner/name[@version]`: not ours
        if not self._announced:  # once per process, in the API server (plugins load everywhere)
            self._announced = True
            log.info("soppu resolver: adapters owner/name[@version] from %s, %s dirs in %s",
                     self.settings.registry_url, self.session.form, self.cache.root)
        try:
            served = self.serve(base_model_name, ref)
        except SoppuError as e:
            log.error("soppu resolver: refused %s: %s", lora_name, e)
            raise SoppuResolveError(str(e), _status(e)) from None
        if served is None:
            return None
        stats = served.stats
        if stats.materialized:
            log.info("soppu resolver: materialized %s in %s: downloaded %s (%d bytes), reused %s", served.label,
                     served.path, ", ".join(stats.blobs_downloaded) or "nothing", stats.bytes_downloaded,
                     ", ".join(stats.blobs_reused) or "nothing")
        return LoRARequest(lora_name=lora_name, lora_int_id=lora_int_id(ref, served.version),
                           lora_path=str(served.path), base_model_name=base_model_name)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        return await asyncio.to_thread(self.resolve_sync, base_model_name, lora_name)


def register_resolver() -> SoppuLoRAResolver | None:
    """Register a :class:`SoppuLoRAResolver` built from the ``SOPPU_*`` environment (once per
    process). Without ``SOPPU_REGISTRY_URL`` nothing is registered (a warning says so); a bad
    setting stops the server at start with the variable named."""
    if RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
        existing = LoRAResolverRegistry.get_resolver(RESOLVER_NAME)
        return existing if isinstance(existing, SoppuLoRAResolver) else None
    settings = Settings.from_env()
    if not settings.registry_url:
        log.warning("soppu resolver: SOPPU_REGISTRY_URL is not set, so the `soppu` LoRA resolver is not registered")
        return None
    resolver = SoppuLoRAResolver(settings)
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)
    return resolver
