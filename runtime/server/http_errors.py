"""Why a request was refused, as an HTTP status and a message that names the problem. Every endpoint
answers these as JSON `{"error": {"message", "type", "code"}}` (the shape OpenAI-style clients read)."""

from __future__ import annotations


class RequestRefused(Exception):
    status = 500
    kind = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


class BadRequest(RequestRefused):
    status, kind = 400, "invalid_request_error"


class NonFiniteOutput(RequestRefused):
    """A tower returned NaN or Inf for an input of a protocol without per-item errors. Not a 5xx: the
    same input fails the same way again, and clients (the openai one) retry 5xx answers."""

    status, kind = 422, "non_finite_output"


class Unauthorized(RequestRefused):
    status, kind = 401, "authentication_error"

    def __init__(self, message: str = "missing or invalid API key (send `Authorization: Bearer KEY`)"):
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class PayloadTooLarge(RequestRefused):
    status, kind = 413, "payload_too_large"


class Unavailable(RequestRefused):
    """Not ready yet, draining, or the queue is full: the client should come back after Retry-After."""

    status, kind = 503, "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, {"Retry-After": str(max(1, int(retry_after_s)))})


class TimedOut(RequestRefused):
    status, kind = 504, "timeout"
