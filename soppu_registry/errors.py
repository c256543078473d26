"""The registry's refusals, in the project's one exception tree (``SoppuError``).

    SoppuError
    └── ApiError        HTTP ``status``, machine ``code`` and ``message``: the API's error body
        └── RateLimited 429 ``rate_limited`` with a ``Retry-After`` header

The HTTP layer turns an ApiError into ``{"error": {"code", "message"}}`` with its status; the
admin CLI prints its message and exits 2 for bad input (400, 404: unknown owner, token) and 1 for a
refusal (403, 409, ...).
"""

from __future__ import annotations

from soppu_client.format.errors import SoppuError


class ApiError(SoppuError):
    """A refusal from the registry; ``status`` and ``code`` map onto the API's error body."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.exit_code = 2 if status in (400, 404) else 1

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers for this refusal."""
        return {}


class RateLimited(ApiError):
    """The token's request budget is spent; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        self.retry_after = max(1, retry_after)
        super().__init__(429, "rate_limited", f"rate limit exceeded; retry after {self.retry_after} s")

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}
