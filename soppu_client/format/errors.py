"""One exception tree for the whole project.

    SoppuError                 root; every message names its subject and, where there is one, the fix
    ├── InputError             bad user input: adapter dirs, options, files (CLI exit 2)
    │   └── AdapterValidationError   every problem found in a set of adapters, raised once
    ├── BundleError            a bundle on disk is malformed or inconsistent (exit 2)
    ├── SafetensorsFormatError a safetensors file fails validation (exit 2)
    ├── VerificationError      a check ran and failed: error above threshold, digest mismatch (exit 1)
    │   └── SignatureError     signature, key, expiry or signed-statement mismatch (exit 1)
    └── RegistryError          the registry refused or could not be reached (exit 1)

The CLI maps ``exit_code`` to the process exit status: 0 ok, 1 failed check, 2 bad usage or input.
``VerificationError.code`` (and so ``SignatureError.code``) names the failed check for programs, e.g.
the registry maps it to its HTTP error code; see :class:`SignatureError` for the values.
"""

from __future__ import annotations


class SoppuError(Exception):
    """Root of every error SOPPU raises on purpose."""

    exit_code: int = 1


class InputError(SoppuError):
    """The user gave something unusable: a path, an option, an adapter."""

    exit_code = 2


class AdapterValidationError(InputError):
    """All problems found in a collection of adapters, collected and raised together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} with the input adapters:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class BundleError(SoppuError):
    """A bundle directory is missing files, malformed, or inconsistent with its manifest."""

    exit_code = 2


class SafetensorsFormatError(SoppuError):
    """A safetensors file failed structural or value validation."""

    exit_code = 2


class VerificationError(SoppuError):
    """A verification ran and failed (reconstruction error, digest, output agreement).

    ``code``: a machine-readable name of the failed check (None where there is none)."""

    exit_code = 1

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.code = code


class SignatureError(VerificationError):
    """A signature, key, expiry or signed statement did not verify.

    ``code`` is one of: ``unsigned`` (no signature.json), ``malformed`` (signature document),
    ``wrong_key`` (signed by another key than the trusted one), ``bad_signature`` (Ed25519 check
    failed), ``bad_statement`` (statement schema), ``expired``, ``owner_mismatch``,
    ``name_mismatch``, ``version_mismatch``, ``files_mismatch`` (files on disk differ from the
    statement), ``bad_manifest`` (manifest.json malformed or disagreeing with the statement),
    ``untrusted_key`` (not one of the owner's pinned keys), ``unknown_key`` (not a key the registry
    lists for the owner). ``VerificationError`` alone uses ``rollback`` (the serving host was
    offered a version below the highest it has verified for that adapter).
    """


class RegistryError(SoppuError):
    """The registry answered with an error or could not be reached."""

    exit_code = 1

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 url: str | None = None):
        super().__init__(message)
        self.status = status  # HTTP status, None when the registry could not be reached
        self.code = code      # the server's error code, e.g. "rollback", "bad_signature"
        self.url = url
